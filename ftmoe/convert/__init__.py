"""Megatron-DeepSpeed checkpoint -> FasterTransformer c-model folder."""
from .megatron_ds import MegatronCheckpoint, open_checkpoint
from .writer import convert

__all__ = ["MegatronCheckpoint", "convert", "open_checkpoint"]
