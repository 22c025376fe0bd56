"""Translate Hugging Face `config.json` dicts into llava_jax configs.

Architectures this code does not implement (rope scaling, attention biases, other activations) are
refused with the field named, rather than loaded into a model that would compute something else.
"""

from __future__ import annotations

import json

from llava_jax.models.config import IMAGE_TOKEN_ID, PAD_TOKEN_ID, LlamaConfig, LlavaConfig, VisionConfig
from llava_jax.paths import as_path


def _require(d: dict, key: str, allowed, what: str):
    value = d.get(key)
    if value not in allowed:
        raise ValueError(f"{what}: {key}={value!r} is not supported (supported: {allowed})")


def read_config(path) -> dict:
    path = as_path(path)
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


# ----------------------------------------------------------------------------- llava_jax -> HF

def vision_config_to_hf(v: VisionConfig) -> dict:
    """transformers CLIPVisionConfig fields of a vision tower."""
    return {
        "model_type": "clip_vision_model", "hidden_act": "quick_gelu", "image_size": v.image_size,
        "patch_size": v.patch_size, "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
        "num_hidden_layers": v.num_layers, "num_attention_heads": v.num_heads, "layer_norm_eps": v.layer_norm_eps,
        "num_channels": 3, "attention_dropout": 0.0, "projection_dim": 768,
    }


def llama_config_to_hf(c: LlamaConfig, *, dtype: str = "float32", pad_token_id: int | None = PAD_TOKEN_ID) -> dict:
    """transformers LlamaConfig fields (read by transformers 4.x and 5.x: RoPE theta is written both
    as `rope_theta` and as 5.x's `rope_parameters`)."""
    return {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim,
        "hidden_act": "silu", "rms_norm_eps": c.rms_norm_eps, "max_position_embeddings": c.max_position_embeddings,
        "rope_theta": c.rope_theta, "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
        "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0, "pretraining_tp": 1,
        "tie_word_embeddings": c.tie_word_embeddings, "bos_token_id": 1, "eos_token_id": 2,
        "pad_token_id": pad_token_id if pad_token_id is not None and pad_token_id < c.vocab_size else None,
        "initializer_range": 0.02, "use_cache": True, "torch_dtype": dtype,
    }


def llava_config_to_hf(cfg: LlavaConfig, *, dtype: str = "float32", image_aspect_ratio: str | None = None) -> dict:
    """transformers LlavaConfig (llava-hf) fields. A `linear` projector is declared as
    `projector_hidden_act='linear'`: two layers with the identity between them (the exporter writes
    the second as the identity matrix), which `llava_config_from_hf` reads back as `linear`.
    `image_aspect_ratio` (the original LLaVA config field) is kept for importers; transformers
    ignores it."""
    v = cfg.vision
    text = llama_config_to_hf(cfg.llm, dtype=dtype, pad_token_id=cfg.pad_token_id)
    text.pop("architectures")
    out = {
        "model_type": "llava", "architectures": ["LlavaForConditionalGeneration"],
        "vision_config": vision_config_to_hf(v), "text_config": text,
        "image_token_index": cfg.image_token_id, "pad_token_id": cfg.pad_token_id, "ignore_index": -100,
        "projector_hidden_act": "gelu" if cfg.projector == "mlp2x_gelu" else "linear",
        "multimodal_projector_bias": True,
        "vision_feature_layer": v.select_layer,
        "vision_feature_select_strategy": "default" if v.select_feature == "patch" else "full",
        "image_seq_length": v.num_image_tokens, "tie_word_embeddings": cfg.llm.tie_word_embeddings,
        "torch_dtype": dtype,
    }
    if image_aspect_ratio is not None:
        out["image_aspect_ratio"] = image_aspect_ratio
    return out


# ----------------------------------------------------------------------------- original LLaVA

# Original `mm_vision_tower` names whose architecture is known without their config.json.
KNOWN_VISION_TOWERS = {
    "openai/clip-vit-large-patch14": dict(image_size=224, patch_size=14, hidden_size=1024, intermediate_size=4096,
                                          num_layers=24, num_heads=16),
    "openai/clip-vit-large-patch14-336": dict(image_size=336, patch_size=14, hidden_size=1024,
                                              intermediate_size=4096, num_layers=24, num_heads=16),
}
ORIGINAL_ASPECT_RATIOS = ("square", "pad")


def is_original_llava(d: dict) -> bool:
    """An original LLaVA (`LlavaLlamaForCausalLM`) config: LLaMA fields plus `mm_*` fields, no
    `text_config` (its `model_type` is 'llava' or 'llava_llama', the first clashing with llava-hf)."""
    return "text_config" not in d and (
        "mm_vision_tower" in d or "mm_hidden_size" in d
        or any("LlavaLlama" in a for a in d.get("architectures") or ()))


def original_vision_config(d: dict, vision: dict | None) -> VisionConfig:
    """The tower's architecture: from its config.json (`vision`, a CLIP or CLIP-vision config dict),
    else from the known `mm_vision_tower` names."""
    if vision is not None:
        return vision_config_from_hf(vision)
    name = str(d.get("mm_vision_tower", "")).rstrip("/")
    if name in KNOWN_VISION_TOWERS:
        return VisionConfig(**KNOWN_VISION_TOWERS[name])
    raise ValueError(
        f"original LLaVA config: mm_vision_tower={d.get('mm_vision_tower')!r} is not a known tower and no "
        "vision config was given; pass the CLIP directory it names (--vision DIR)"
    )


def original_llava_config(d: dict, vision: VisionConfig, *, vocab_size: int) -> tuple[LlavaConfig, str]:
    """An original LLaVA config dict -> (LlavaConfig with the llava-hf vocabulary of `vocab_size`
    rows, image_aspect_ratio). Fields read: the LLaMA ones, `mm_hidden_size`, `mm_projector_type`
    (absent: `linear`, the paper's), `mm_vision_select_layer` (absent: -1, the original's default),
    `mm_vision_select_feature`, `image_aspect_ratio`."""
    import dataclasses

    what = "original LLaVA config"
    projector = d.get("mm_projector_type") or "linear"
    if projector not in ("linear", "mlp2x_gelu"):
        raise ValueError(f"{what}: mm_projector_type={projector!r} is not supported (linear or mlp2x_gelu)")
    feature = d.get("mm_vision_select_feature") or "patch"
    if feature not in ("patch", "cls_patch"):
        raise ValueError(f"{what}: mm_vision_select_feature={feature!r} is not supported (patch or cls_patch)")
    layer = d.get("mm_vision_select_layer", -1)
    if not isinstance(layer, int):
        raise ValueError(f"{what}: mm_vision_select_layer={layer!r} must be an integer")
    aspect = d.get("image_aspect_ratio") or "square"
    if aspect not in ORIGINAL_ASPECT_RATIOS:
        raise ValueError(f"{what}: image_aspect_ratio={aspect!r} is not supported ({ORIGINAL_ASPECT_RATIOS})")
    hidden = d.get("mm_hidden_size")
    if hidden is not None and hidden != vision.hidden_size:
        raise ValueError(f"{what}: mm_hidden_size={hidden} but the vision tower is {vision.hidden_size} wide; "
                         "is --vision the tower named by mm_vision_tower?")
    vision = dataclasses.replace(vision, select_layer=layer, select_feature=feature)
    vision.layers_needed()  # range check of select_layer
    llm = dataclasses.replace(llama_config_from_hf(d), vocab_size=vocab_size)
    cfg = LlavaConfig(vision=vision, llm=llm, projector=projector, image_token_id=IMAGE_TOKEN_ID,
                      pad_token_id=PAD_TOKEN_ID)
    return cfg, aspect
