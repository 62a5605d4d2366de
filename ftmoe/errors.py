"""User-facing errors.

Every mistake a user can make (a wrong path, a truncated file, a bad flag) raises
`FtmoeError` with a message that names the file, tensor or field and says what was
expected and what was found. The CLI prints that message as one line and exits 1;
anything else is a bug and keeps its traceback.
"""


class FtmoeError(Exception):
    """An error caused by user input, with a one-line explanation."""


class CheckpointError(FtmoeError):
    """The input Megatron-DeepSpeed checkpoint is missing, malformed or inconsistent."""


class ModelFormatError(FtmoeError):
    """A FasterTransformer model folder is missing files or has mis-sized ones."""


class RequestError(FtmoeError):
    """A generation request is invalid (prompt too long, bad sampling parameter...)."""
