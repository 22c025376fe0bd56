"""Checkpoint interop: Hugging Face / original LLaVA <-> llava_jax, one mapping table per format."""

from llava_jax.convert.files import DictSource, open_checkpoint
from llava_jax.convert.load import CheckpointMismatch, convert_arrays, from_pretrained, load_weights
from llava_jax.convert.mapping import FORMATS, detect_format

__all__ = ["FORMATS", "CheckpointMismatch", "DictSource", "convert_arrays", "detect_format", "from_pretrained",
           "load_weights", "open_checkpoint"]
