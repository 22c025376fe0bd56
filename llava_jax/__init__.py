"""llava_jax: LLaVA (Visual Instruction Tuning, Liu et al. 2023) in JAX/Flax.

Folders follow the data flow, each importing only those before it (`layers.py`): `data` (records ->
fixed-shape batches) and `parallel` (meshes and sharding rules), `models` (CLIP ViT, projector, LLaMA,
LLaVA), `checkpoint` (checkpoint formats, parameter store, stage directory), then `training` (masks,
optimizer, loop), `convert` (Hugging Face <-> llava_jax) and `inference`, then `eval`, `datagen`,
`bench`, and the entry points (`experiment`, `train`, `chat`, `serve`).
"""

__version__ = "0.1.0"
