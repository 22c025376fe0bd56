"""Model parts: CLIP ViT vision tower, projector, LLaMA decoder, the LLaVA composite, presets."""

from llava_jax.models.attention import attend, make_mask
from llava_jax.models.clip import ClipVisionTower
from llava_jax.models.config import IMAGE_TOKEN_ID, PAD_TOKEN_ID, LlamaConfig, LlavaConfig, VisionConfig
from llava_jax.models.llama import KVCache, Llama
from llava_jax.models.llava import Llava, merge_image_features
from llava_jax.models.presets import PRESETS, get_preset
from llava_jax.models.projector import Projector

__all__ = [
    "IMAGE_TOKEN_ID",
    "PAD_TOKEN_ID",
    "PRESETS",
    "ClipVisionTower",
    "KVCache",
    "Llama",
    "LlamaConfig",
    "Llava",
    "LlavaConfig",
    "Projector",
    "VisionConfig",
    "attend",
    "get_preset",
    "make_mask",
    "merge_image_features",
]
