"""Checkpoint formats and the stage directory, below training, conversion and inference.

Hugging Face / original LLaVA weights: `from_pretrained` / `load_weights` (llava-hf, LLaMA, CLIP
directories, through one mapping table per format), `load_original` and `load_pair` (original LLaVA
checkpoints; LLaMA + CLIP + stage-1 projector), `load_projector` (a stage-1 `mm_projector` file),
`load_original_lora` (an original LoRA checkpoint onto its base; PEFT adapter files: `adapters.py`).
The orbax parameter store: `save_params` / `restore_params` (`params.py`). The stage directory
(`model.json` + `final_params/`): `save_stage`, `write_model_info`, `load_model` (`stage_dir.py`).
"""

from llava_jax.checkpoint.files import DictSource, open_checkpoint
from llava_jax.checkpoint.hf_load import CheckpointMismatch, convert_arrays, from_pretrained, load_weights
from llava_jax.checkpoint.mapping import FORMATS, detect_format
from llava_jax.checkpoint.original import load_original, load_original_lora, load_pair, load_projector
from llava_jax.checkpoint.params import restore_params, save_params
from llava_jax.checkpoint.stage_dir import Loaded, load_model, save_stage, write_model_info

__all__ = [
    "FORMATS",
    "CheckpointMismatch",
    "DictSource",
    "Loaded",
    "convert_arrays",
    "detect_format",
    "from_pretrained",
    "load_model",
    "load_original",
    "load_original_lora",
    "load_pair",
    "load_projector",
    "load_weights",
    "open_checkpoint",
    "restore_params",
    "save_params",
    "save_stage",
    "write_model_info",
]
