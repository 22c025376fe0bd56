"""llava_jax: LLaVA (Visual Instruction Tuning, Liu et al. 2023) in JAX/Flax.

Folders follow the data flow: `data` (records -> fixed-shape batches), `models` (CLIP ViT, projector,
LLaMA, LLaVA), `parallel` (meshes and sharding rules), `training` (masks, optimizer, loop,
checkpoints), `convert` (Hugging Face <-> llava_jax), `inference`, `eval`, `datagen`, `bench`.
"""

__version__ = "0.1.0"
