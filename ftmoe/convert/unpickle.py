"""Load Megatron/DeepSpeed `.pt` files without Megatron or DeepSpeed installed.

In:  a path to a torch checkpoint whose pickled `args` may reference classes from
     modules we do not have (`megatron.model.enums.ModelType`, DeepSpeed enums...).
Out: the unpickled object, with such classes replaced by inert placeholders whose
     `str()` matches what the real class would print (so args.txt is byte-identical).
"""
from __future__ import annotations

import pickle
import types
import zipfile

import torch

from ..errors import CheckpointError

# Megatron's enums (megatron/model/enums.py): value -> member name, for str() fidelity.
_KNOWN_ENUMS = {
    "ModelType": {1: "encoder_or_decoder", 2: "encoder_and_decoder", 3: "retro_encoder", 4: "retro_decoder"},
    "LayerType": {1: "encoder", 2: "decoder", 3: "retro_encoder", 4: "retro_decoder",
                  5: "retro_decoder_with_retriever"},
    "AttnType": {1: "self_attn", 2: "cross_attn"},
    "AttnMaskType": {1: "padding", 2: "causal", 3: "prefix"},
    "PositionEmbeddingType": {1: "rotary", 2: "absolute", 3: "alibi"},
}
_placeholders: dict[tuple[str, str], type] = {}


def _placeholder(module: str, name: str) -> type:
    key = (module, name)
    if key not in _placeholders:
        def __init__(self, *args, **kwargs):
            self._args, self._kwargs = args, kwargs

        def __setstate__(self, state):
            self._state = state

        def __str__(self):
            members = _KNOWN_ENUMS.get(name)
            if members is not None and len(self._args) == 1 and self._args[0] in members:
                return f"{name}.{members[self._args[0]]}"
            inner = ", ".join(repr(a) for a in self._args)
            return f"{name}({inner})"

        _placeholders[key] = type(name, (), {"__init__": __init__, "__setstate__": __setstate__,
                                             "__str__": __str__, "__repr__": __str__,
                                             "__module__": module, "placeholder_for": f"{module}.{name}"})
    return _placeholders[key]


class _TolerantUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return _placeholder(module, name)


tolerant_pickle = types.SimpleNamespace(__name__="ftmoe_tolerant_pickle", Unpickler=_TolerantUnpickler,
                                        load=lambda f, **kw: _TolerantUnpickler(f, **kw).load(),
                                        loads=pickle.loads, dump=pickle.dump, dumps=pickle.dumps)


def load_pt(path: str):
    """torch.load on the CPU, memory-mapped when the file allows it, tolerant of missing classes."""
    kw = dict(map_location="cpu", weights_only=False, pickle_module=tolerant_pickle)
    try:
        if zipfile.is_zipfile(path):
            return torch.load(path, mmap=True, **kw)
        return torch.load(path, **kw)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found") from None
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: cannot read torch checkpoint ({msg}); is the file truncated?") from None
