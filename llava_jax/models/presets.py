"""Named model presets: the paper's, LLaVA-1.5's, and `tiny` for tests and the demo.

| preset | vision | projector | LLM |
| --- | --- | --- | --- |
| vicuna-7b / vicuna-13b | ViT-L/14, 224 px (256 tokens) | linear | Vicuna v1.1-1.3 (LLaMA-1: rms 1e-6, 2048 ctx) |
| llava-v1.5-7b / -13b | ViT-L/14, 336 px (576 tokens) | mlp2x_gelu | Vicuna v1.5 (Llama-2: rms 1e-5, 4096 ctx) |
| tiny | 64 px, patch 8, 3 x 64 wide | mlp2x_gelu | 2 x 128 wide, GQA 4/2 |

The vocabulary is the llava-hf one: LLaMA's 32000 pieces + `<image>` (32000) + `<pad>` (32001),
padded to 32064 rows.
"""

from __future__ import annotations

import dataclasses

from llava_jax.models.config import LlamaConfig, LlavaConfig, VisionConfig

VIT_L14_224 = VisionConfig(
    image_size=224, patch_size=14, hidden_size=1024, intermediate_size=4096, num_layers=24, num_heads=16
)
VIT_L14_336 = dataclasses.replace(VIT_L14_224, image_size=336)

VOCAB = 32064
_LLAMA_7B = dict(
    vocab_size=VOCAB, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32, num_kv_heads=32
)
_LLAMA_13B = dict(
    vocab_size=VOCAB, hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40, num_kv_heads=40
)
_LLAMA1 = dict(rms_norm_eps=1e-6, max_position_embeddings=2048)
_LLAMA2 = dict(rms_norm_eps=1e-5, max_position_embeddings=4096)

PRESETS: dict[str, LlavaConfig] = {
    "vicuna-7b": LlavaConfig(VIT_L14_224, LlamaConfig(**_LLAMA_7B, **_LLAMA1), "linear"),
    "vicuna-13b": LlavaConfig(VIT_L14_224, LlamaConfig(**_LLAMA_13B, **_LLAMA1), "linear"),
    "llava-v1.5-7b": LlavaConfig(VIT_L14_336, LlamaConfig(**_LLAMA_7B, **_LLAMA2), "mlp2x_gelu"),
    "llava-v1.5-13b": LlavaConfig(VIT_L14_336, LlamaConfig(**_LLAMA_13B, **_LLAMA2), "mlp2x_gelu"),
    "tiny": LlavaConfig(
        VisionConfig(image_size=64, patch_size=8, hidden_size=64, intermediate_size=128, num_layers=3, num_heads=4),
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=128,
            intermediate_size=256,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            rms_norm_eps=1e-5,
            max_position_embeddings=1024,
        ),
        "mlp2x_gelu",
    ),
}


def get_preset(name: str, **runtime) -> LlavaConfig:
    """Preset by name, with optional runtime fields (dtype, param_dtype, attention, remat)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; available: {', '.join(PRESETS)}")
    cfg = PRESETS[name]
    return cfg.with_runtime(**runtime) if runtime else cfg
