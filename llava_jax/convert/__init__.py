"""User-facing conversion between Hugging Face / original LLaVA checkpoints and llava_jax stages.

Import: `import_checkpoint` (an original LLaVA, llava-hf or LLaMA + CLIP + projector directory -> a
stage directory; also an original LoRA checkpoint onto its base). Export: `export_llava_hf`,
`export_llama_hf`, `export_checkpoint` (LoRA adapters merged or as a PEFT adapter: `write_peft_adapter`). CLI:
`python -m llava_jax.convert`. The formats and mapping tables themselves live in `llava_jax.checkpoint`.
"""

from llava_jax.convert.export import export_checkpoint, export_llama_hf, export_llava_hf, write_peft_adapter
from llava_jax.convert.stage import import_checkpoint

__all__ = ["export_checkpoint", "export_llama_hf", "export_llava_hf", "import_checkpoint", "write_peft_adapter"]
