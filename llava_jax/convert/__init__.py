"""Checkpoint interop: Hugging Face / original LLaVA <-> llava_jax, one mapping table per format.

Import: `from_pretrained` / `load_weights` (llava-hf, LLaMA, CLIP directories), `load_original` and
`load_pair` (original LLaVA checkpoints; LLaMA + CLIP + stage-1 projector), `load_projector` (a
stage-1 `mm_projector` file), `import_checkpoint` (any of these -> a stage directory).
Export: `export_llava_hf`, `export_llama_hf`, `export_checkpoint`. CLI: `python -m llava_jax.convert`.
"""

from llava_jax.convert.export import export_checkpoint, export_llama_hf, export_llava_hf
from llava_jax.convert.files import DictSource, open_checkpoint
from llava_jax.convert.load import CheckpointMismatch, convert_arrays, from_pretrained, load_weights
from llava_jax.convert.mapping import FORMATS, detect_format
from llava_jax.convert.original import load_original, load_pair, load_projector
from llava_jax.convert.stage import import_checkpoint, save_stage

__all__ = ["FORMATS", "CheckpointMismatch", "DictSource", "convert_arrays", "detect_format", "export_checkpoint",
           "export_llama_hf", "export_llava_hf", "from_pretrained", "import_checkpoint", "load_original",
           "load_pair", "load_projector", "load_weights", "open_checkpoint", "save_stage"]
