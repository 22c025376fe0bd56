"""Translate Hugging Face `config.json` dicts into llava_jax configs.

Architectures this code does not implement (rope scaling, attention biases, other activations) are
refused with the field named, rather than loaded into a model that would compute something else.
"""

from __future__ import annotations

import json
import pathlib

from llava_jax.models.config import IMAGE_TOKEN_ID, PAD_TOKEN_ID, LlamaConfig, LlavaConfig, VisionConfig


def _require(d: dict, key: str, allowed, what: str):
    value = d.get(key)
    if value not in allowed:
        raise ValueError(f"{what}: {key}={value!r} is not supported (supported: {allowed})")


def read_config(path) -> dict:
    path = pathlib.Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.exists():
        raise FileNotFoundError(f"{file} not found: a Hugging Face model directory needs a config.json")
    return json.loads(file.read_text())


def vision_config_from_hf(d: dict) -> VisionConfig:
    """transformers CLIPVisionConfig (or a CLIPConfig holding one)."""
    d = d.get("vision_config", d) if d.get("model_type") == "clip" else d
    _require(d, "hidden_act", ("quick_gelu",), "CLIP vision config")
    return VisionConfig(
        image_size=d.get("image_size", 224), patch_size=d.get("patch_size", 32),
        hidden_size=d.get("hidden_size", 768), intermediate_size=d.get("intermediate_size", 3072),
        num_layers=d.get("num_hidden_layers", 12), num_heads=d.get("num_attention_heads", 12),
        layer_norm_eps=d.get("layer_norm_eps", 1e-5),
    )


def _rope_theta(d: dict) -> float:
    params = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise ValueError(f"LLaMA config: rope type {rope_type!r} is not supported (only plain RoPE)")
    return float(params.get("rope_theta", d.get("rope_theta", 10000.0)))


def llama_config_from_hf(d: dict) -> LlamaConfig:
    """transformers LlamaConfig."""
    _require(d, "hidden_act", ("silu",), "LLaMA config")
    for flag in ("attention_bias", "mlp_bias"):
        if d.get(flag):
            raise ValueError(f"LLaMA config: {flag}=True is not supported")
    heads = d["num_attention_heads"]
    head_dim = d.get("head_dim")
    return LlamaConfig(
        vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
        num_layers=d["num_hidden_layers"], num_heads=heads, num_kv_heads=d.get("num_key_value_heads") or heads,
        head_dim_override=head_dim if head_dim and head_dim != d["hidden_size"] // heads else None,
        rms_norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=_rope_theta(d),
        max_position_embeddings=d.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
    )


def llava_config_from_hf(d: dict) -> LlavaConfig:
    """transformers LlavaConfig (llava-hf). llava-hf always has two projector layers; the paper's
    `linear` projector is stored as two layers with the identity activation
    (`projector_hidden_act='linear'`), which the loader folds back into one."""
    act = d.get("projector_hidden_act", "gelu")
    if act not in ("gelu", "linear"):
        raise ValueError(f"llava config: projector_hidden_act={act!r} is not supported (gelu or linear)")
    strategy = d.get("vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise ValueError(f"llava config: vision_feature_select_strategy={strategy!r} (default or full)")
    layer = d.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise ValueError(f"llava config: vision_feature_layer={layer!r}; only a single layer is supported")
    import dataclasses

    vision = dataclasses.replace(
        vision_config_from_hf(d["vision_config"]), select_layer=layer,
        select_feature="patch" if strategy == "default" else "cls_patch",
    )
    return LlavaConfig(
        vision=vision, llm=llama_config_from_hf(d["text_config"]),
        projector="mlp2x_gelu" if act == "gelu" else "linear",
        image_token_id=d.get("image_token_index", d.get("image_token_id", IMAGE_TOKEN_ID)),
        pad_token_id=d.get("pad_token_id", PAD_TOKEN_ID) if d.get("pad_token_id") is not None else PAD_TOKEN_ID,
    )
