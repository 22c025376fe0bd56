"""Translate Hugging Face `config.json` files into llava_jax configs, and back.

Hub configs are written by transformers as a diff against its own defaults (llava-hf's
`text_config` names little more than the vocabulary), so every config is first read through
transformers' config classes (`LlavaConfig`, `LlamaConfig`, `CLIPConfig`, `CLIPVisionConfig`, as
`AutoConfig` maps them), which fill in the defaults of the installed transformers; only then are
the values translated. Architectures this code does not implement (RoPE scalings other than linear
and dynamic, attention biases, other activations, other towers) are refused with the field named,
rather than loaded into a model that would compute something else.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from llava_jax.data.tokenizer import IGNORE_INDEX, IMAGE_TOKEN_ID, PAD_TOKEN_ID
from llava_jax.models.config import LlamaConfig, LlavaConfig, VisionConfig
from llava_jax.models.rope import ROPE_TYPES
from llava_jax.paths import as_path

HfConfig = Any  # a transformers PretrainedConfig, or a config.json dict (read into one)


def read_config(path) -> dict:
    path = as_path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.exists():
        raise FileNotFoundError(f"{file} not found: a Hugging Face model directory needs a config.json")
    return json.loads(file.read_text())


def transformers_config(d: HfConfig):
    """A config.json dict -> the transformers config object that `AutoConfig` would build from it
    (defaults filled in). Original LLaVA configs (`LlavaLlamaForCausalLM`, whose model_type 'llava'
    clashes with llava-hf's) are LLaMA configs with extra `mm_*` attributes."""
    if not isinstance(d, dict):
        return d
    from transformers import CONFIG_MAPPING
    from transformers import LlamaConfig as HfLlamaConfig

    if is_original_llava(d):
        return HfLlamaConfig.from_dict(d)
    model_type = d.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"config.json: model_type={model_type!r} is not known to transformers")
    return CONFIG_MAPPING[model_type].from_dict(d)


def _require(c, key: str, allowed, what: str):
    value = getattr(c, key, None)
    if value not in allowed:
        raise ValueError(f"{what}: {key}={value!r} is not supported (supported: {allowed})")


def vision_config_from_hf(d: HfConfig) -> VisionConfig:
    """transformers CLIPVisionConfig (or a CLIPConfig holding one)."""
    c = transformers_config(d)
    if c.model_type == "clip":
        c = c.vision_config
    if c.model_type != "clip_vision_model":
        raise ValueError(f"vision config: model_type={c.model_type!r} is not supported (a CLIP vision tower)")
    _require(c, "hidden_act", ("quick_gelu",), "CLIP vision config")
    _require(c, "num_channels", (3,), "CLIP vision config")
    return VisionConfig(
        image_size=c.image_size,
        patch_size=c.patch_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_layers=c.num_hidden_layers,
        num_heads=c.num_attention_heads,
        layer_norm_eps=c.layer_norm_eps,
    )


def rope_from_hf(c) -> tuple[float, str, float]:
    """(rope_theta, rope_type, factor) of a transformers LLaMA config: 5.x keeps them in
    `rope_parameters`, 4.x in `rope_theta` + `rope_scaling` (`type` or `rope_type`)."""
    params = getattr(c, "rope_parameters", None)
    if not params:
        params = {**(getattr(c, "rope_scaling", None) or {}), "rope_theta": getattr(c, "rope_theta", 10000.0)}
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type not in ROPE_TYPES:
        raise ValueError(
            f"LLaMA config: RoPE scaling type {rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})"
        )
    factor = float(params.get("factor", 1.0)) if rope_type != "default" else 1.0
    return float(params["rope_theta"]), rope_type, factor


def llama_config_from_hf(d: HfConfig) -> LlamaConfig:
    """transformers LlamaConfig."""
    c = transformers_config(d)
    if c.model_type not in ("llama", "llava", "llava_llama"):
        raise ValueError(f"language model config: model_type={c.model_type!r} is not supported (a LLaMA decoder)")
    _require(c, "hidden_act", ("silu",), "LLaMA config")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(c, flag, False):
            raise ValueError(f"LLaMA config: {flag}=True is not supported")
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None)
    theta, rope_type, factor = rope_from_hf(c)
    return LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_layers=c.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=c.num_key_value_heads or heads,
        head_dim_override=head_dim if head_dim and head_dim != c.hidden_size // heads else None,
        rms_norm_eps=c.rms_norm_eps,
        rope_theta=theta,
        rope_type=rope_type,
        rope_factor=factor,
        max_position_embeddings=c.max_position_embeddings,
        tie_word_embeddings=bool(c.tie_word_embeddings),
    )


def llava_config_from_hf(d: HfConfig) -> LlavaConfig:
    """transformers LlavaConfig (llava-hf). llava-hf always has two projector layers; the paper's
    `linear` projector is stored as two layers with the identity activation
    (`projector_hidden_act='linear'`), which the loader folds back into one."""
    c = transformers_config(d)
    act = c.projector_hidden_act
    if act not in ("gelu", "linear"):
        raise ValueError(f"llava config: projector_hidden_act={act!r} is not supported (gelu or linear)")
    if not getattr(c, "multimodal_projector_bias", True):
        raise ValueError("llava config: multimodal_projector_bias=False is not supported (the projector has biases)")
    strategy = c.vision_feature_select_strategy
    if strategy not in ("default", "full"):
        raise ValueError(f"llava config: vision_feature_select_strategy={strategy!r} (default or full)")
    layer = c.vision_feature_layer
    if not isinstance(layer, int):
        raise ValueError(f"llava config: vision_feature_layer={layer!r}; only a single layer is supported")
    vision = dataclasses.replace(
        vision_config_from_hf(c.vision_config),
        select_layer=layer,
        select_feature="patch" if strategy == "default" else "cls_patch",
    )
    image_token = getattr(c, "image_token_id", None)
    if image_token is None:
        image_token = getattr(c, "image_token_index", IMAGE_TOKEN_ID)
    pad = getattr(c, "pad_token_id", None)
    return LlavaConfig(
        vision=vision,
        llm=llama_config_from_hf(c.text_config),
        projector="mlp2x_gelu" if act == "gelu" else "linear",
        image_token_id=image_token,
        pad_token_id=PAD_TOKEN_ID if pad is None else pad,
    )


# ----------------------------------------------------------------------------- llava_jax -> HF


def vision_config_to_hf(v: VisionConfig) -> dict:
    """transformers CLIPVisionConfig fields of a vision tower."""
    return {
        "model_type": "clip_vision_model",
        "hidden_act": "quick_gelu",
        "image_size": v.image_size,
        "patch_size": v.patch_size,
        "hidden_size": v.hidden_size,
        "intermediate_size": v.intermediate_size,
        "num_hidden_layers": v.num_layers,
        "num_attention_heads": v.num_heads,
        "layer_norm_eps": v.layer_norm_eps,
        "num_channels": 3,
        "attention_dropout": 0.0,
        "projection_dim": 768,
    }


def llama_config_to_hf(c: LlamaConfig, *, dtype: str = "float32", pad_token_id: int | None = PAD_TOKEN_ID) -> dict:
    """transformers LlamaConfig fields (read by transformers 4.x and 5.x: RoPE is written both as
    4.x's `rope_theta` + `rope_scaling` and as 5.x's `rope_parameters`)."""
    scaling = (
        None if c.rope_type == "default" else {"rope_type": c.rope_type, "type": c.rope_type, "factor": c.rope_factor}
    )
    params = {"rope_type": c.rope_type, "rope_theta": c.rope_theta}
    if scaling:
        params["factor"] = c.rope_factor
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": c.rms_norm_eps,
        "max_position_embeddings": c.max_position_embeddings,
        "rope_theta": c.rope_theta,
        "rope_scaling": scaling,
        "rope_parameters": params,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "pretraining_tp": 1,
        "tie_word_embeddings": c.tie_word_embeddings,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": pad_token_id if pad_token_id is not None and pad_token_id < c.vocab_size else None,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": dtype,
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
        "model_type": "llava",
        "architectures": ["LlavaForConditionalGeneration"],
        "vision_config": vision_config_to_hf(v),
        "text_config": text,
        "image_token_index": cfg.image_token_id,
        "pad_token_id": cfg.pad_token_id,
        "ignore_index": IGNORE_INDEX,
        "projector_hidden_act": "gelu" if cfg.projector == "mlp2x_gelu" else "linear",
        "multimodal_projector_bias": True,
        "vision_feature_layer": v.select_layer,
        "vision_feature_select_strategy": "default" if v.select_feature == "patch" else "full",
        "image_seq_length": v.num_image_tokens,
        "tie_word_embeddings": cfg.llm.tie_word_embeddings,
        "torch_dtype": dtype,
    }
    if image_aspect_ratio is not None:
        out["image_aspect_ratio"] = image_aspect_ratio
    return out


# ----------------------------------------------------------------------------- original LLaVA

# Original `mm_vision_tower` names whose architecture is known without their config.json.
KNOWN_VISION_TOWERS = {
    "openai/clip-vit-large-patch14": dict(
        image_size=224, patch_size=14, hidden_size=1024, intermediate_size=4096, num_layers=24, num_heads=16
    ),
    "openai/clip-vit-large-patch14-336": dict(
        image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096, num_layers=24, num_heads=16
    ),
}
ORIGINAL_ASPECT_RATIOS = ("square", "pad")


def is_original_llava(d: dict) -> bool:
    """An original LLaVA (`LlavaLlamaForCausalLM`) config: LLaMA fields plus `mm_*` fields, no
    `text_config` (its `model_type` is 'llava' or 'llava_llama', the first clashing with llava-hf)."""
    return "text_config" not in d and (
        "mm_vision_tower" in d or "mm_hidden_size" in d or any("LlavaLlama" in a for a in d.get("architectures") or ())
    )


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
        raise ValueError(
            f"{what}: mm_hidden_size={hidden} but the vision tower is {vision.hidden_size} wide; "
            "is --vision the tower named by mm_vision_tower?"
        )
    vision = dataclasses.replace(vision, select_layer=layer, select_feature=feature)
    vision.layers_needed()  # range check of select_layer
    llm = dataclasses.replace(llama_config_from_hf(d), vocab_size=vocab_size)
    cfg = LlavaConfig(
        vision=vision, llm=llm, projector=projector, image_token_id=IMAGE_TOKEN_ID, pad_token_id=PAD_TOKEN_ID
    )
    return cfg, aspect
