"""Small random transformers (PyTorch) models, the independent reference for parity tests."""

from __future__ import annotations

import numpy as np
import torch
import transformers as tf


def perturb_(model: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Add noise to every parameter so norm scales/biases are not at their trivial init values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return model.eval()


def clip_vision(image_size: int, seed: int = 0, layers: int = 3) -> tf.CLIPVisionModel:
    torch.manual_seed(seed)
    cfg = tf.CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=14,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )
    return perturb_(tf.CLIPVisionModel(cfg), seed)


def llama(
    *,
    kv_heads: int = 4,
    tied: bool = False,
    theta: float = 10000.0,
    seed: int = 0,
    vocab: int = 512,
    layers: int = 3,
    rope_scaling: dict | None = None,
    max_positions: int = 256,
) -> tf.LlamaForCausalLM:
    """rope_scaling: a 4.x-style `{"type": ..., "factor": ...}` dict (None: plain RoPE)."""
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        rms_norm_eps=1e-6,
        rope_theta=theta,
        max_position_embeddings=max_positions,
        tie_word_embeddings=tied,
        attn_implementation="eager",
        **({"rope_scaling": rope_scaling} if rope_scaling else {}),
    )
    return perturb_(tf.LlamaForCausalLM(cfg), seed)


LLAVA_IMAGE_TOKEN = 500


def llava(*, projector_act: str = "gelu", feature_layer: int = -2, seed: int = 0) -> tf.LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    vision = tf.CLIPVisionConfig(
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=56,
        patch_size=14,
        hidden_act="quick_gelu",
    )
    text = tf.LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    cfg = tf.LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=LLAVA_IMAGE_TOKEN,
        projector_hidden_act=projector_act,
        vision_feature_layer=feature_layer,
        vision_feature_select_strategy="default",
        image_seq_length=16,
    )
    cfg._attn_implementation = "eager"
    return perturb_(tf.LlavaForConditionalGeneration(cfg), seed)


def to_v4_keys(state_dict: dict) -> dict:
    """transformers 5.x llava keys -> the 4.x (llava-hf on the Hub) layout, by the documented renames."""
    out = {}
    for k, v in state_dict.items():
        if k.startswith("model.language_model."):
            k = "language_model.model." + k[len("model.language_model.") :]
        elif k.startswith("lm_head."):
            k = "language_model." + k
        elif k.startswith("model.vision_tower.") or k.startswith("model.multi_modal_projector."):
            k = k[len("model.") :]
        out[k] = v
    return out


def np_(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().numpy()
