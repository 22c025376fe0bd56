"""Architecture configs for the three model parts and the LLaVA composite.

Frozen dataclasses, so a config is hashable and can be a static argument of `jax.jit`. Each part's
config also carries the runtime choices that change how (not what) it computes: `dtype` (compute),
`param_dtype` (storage at init), `attention` (kernel, see `attention.py`) and `remat` (policy name,
see `remat.py`). `LlavaConfig.with_runtime(...)` sets them on every part at once.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax.numpy as jnp

from llava_jax.data.image import CLIP_MEAN, CLIP_STD
from llava_jax.data.tokenizer import IMAGE_TOKEN_ID, PAD_TOKEN_ID  # "<image>", "<pad>": the llava-hf ids
from llava_jax.models.lora import DEFAULT_TARGETS, NF4_BLOCK, check_settings
from llava_jax.models.rope import check_rope_type


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """CLIP ViT vision tower (transformers `CLIPVisionConfig` names in comments)."""

    image_size: int = 224
    patch_size: int = 14
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24  # num_hidden_layers
    num_heads: int = 16  # num_attention_heads
    layer_norm_eps: float = 1e-5
    # LLaVA's use of the tower: hidden_states[select_layer]; 'patch' drops CLS, 'cls_patch' keeps it.
    select_layer: int = -2
    select_feature: Literal["patch", "cls_patch"] = "patch"
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    attention: str = "xla"
    remat: str = "none"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_positions(self) -> int:
        return self.num_patches + 1  # + CLS

    @property
    def num_image_tokens(self) -> int:
        """Tokens one image occupies in the LLM sequence."""
        return self.num_patches + (1 if self.select_feature == "cls_patch" else 0)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def layers_needed(self) -> int:
        """Encoder blocks that must run to produce hidden_states[select_layer] (25 entries for 24 blocks)."""
        n = self.num_layers + 1
        if not -n <= self.select_layer < n:
            raise ValueError(f"vision select_layer={self.select_layer} out of range for {self.num_layers} layers")
        return self.select_layer % n


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """LLaMA / Vicuna decoder (transformers `LlamaConfig` names in comments)."""

    vocab_size: int = 32064
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32  # num_hidden_layers
    num_heads: int = 32  # num_attention_heads
    num_kv_heads: int = 32  # num_key_value_heads (< num_heads: grouped-query attention)
    head_dim_override: int | None = None  # head_dim when not hidden_size // num_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # RoPE scaling (transformers `rope_scaling` / `rope_parameters`): 'default' (none), 'linear' or
    # 'dynamic' (NTK, beyond max_position_embeddings), stretched by rope_factor; see `rope.py`.
    rope_type: str = "default"
    rope_factor: float = 1.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    # LoRA adapters on the block linears (see `lora.py`): rank 0 = none; scaling lora_alpha / lora_rank;
    # lora_targets is a regex fully matching the linear names (q_proj ... down_proj; never lm_head).
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: str = DEFAULT_TARGETS
    # Storage of the block linears' (frozen) kernels: 'none' (param dtype), 'int8' (per-output-channel)
    # or 'nf4' (4-bit NormalFloat, blocks of 64 along the input, as bitsandbytes / QLoRA).
    quantized_base: str = "none"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    attention: str = "xla"
    remat: str = "none"

    def __post_init__(self):
        check_rope_type(self.rope_type, self.rope_factor)
        check_settings(self.lora_rank, self.lora_alpha, self.lora_dropout, self.lora_targets, self.quantized_base)
        if self.quantized_base == "nf4":
            sizes = {"hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size}
            sizes["num_heads * head_dim"] = self.num_heads * self.head_dim
            if bad := [f"{k}={v}" for k, v in sizes.items() if v % NF4_BLOCK]:
                raise ValueError(
                    f"quantized_base='nf4' quantises blocks of {NF4_BLOCK} inputs, but {', '.join(bad)} is not a "
                    f"multiple of {NF4_BLOCK}: use quantized_base='int8' or 'none' for this model"
                )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")

    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.hidden_size // self.num_heads

    @property
    def context_length(self) -> int:
        """Longest sequence the model is meant for: max_position_embeddings, stretched by the RoPE
        scaling factor (e.g. 4096 x 4 for a linear-scaled 16k Vicuna)."""
        return int(self.max_position_embeddings * self.rope_factor)


ProjectorType = Literal["linear", "mlp2x_gelu"]


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
    vision: VisionConfig = VisionConfig()
    llm: LlamaConfig = LlamaConfig()
    projector: ProjectorType = "linear"
    image_token_id: int = IMAGE_TOKEN_ID
    pad_token_id: int = PAD_TOKEN_ID

    def __post_init__(self):
        if self.projector not in ("linear", "mlp2x_gelu"):
            raise ValueError(f"projector={self.projector!r}: use 'linear' (paper) or 'mlp2x_gelu' (v1.5)")
        if not 0 <= self.image_token_id < self.llm.vocab_size:
            raise ValueError(f"image_token_id={self.image_token_id} outside vocab_size={self.llm.vocab_size}")

    @property
    def num_image_tokens(self) -> int:
        return self.vision.num_image_tokens

    def with_lora(self, **kw) -> LlavaConfig:
        """Set the LLM's adapter fields (lora_rank, lora_alpha, lora_dropout, lora_targets, quantized_base)."""
        if bad := set(kw) - set(ADAPTER_FIELDS):
            raise ValueError(f"with_lora got {sorted(bad)}; allowed: {sorted(ADAPTER_FIELDS)}")
        return dataclasses.replace(self, llm=dataclasses.replace(self.llm, **kw))

    def with_runtime(self, **kw) -> LlavaConfig:
        """Set runtime fields (dtype, param_dtype, attention, remat) on both towers."""
        allowed = {"dtype", "param_dtype", "attention", "remat"}
        if bad := set(kw) - allowed:
            raise ValueError(f"with_runtime got {sorted(bad)}; allowed: {sorted(allowed)}")
        return dataclasses.replace(
            self, vision=dataclasses.replace(self.vision, **kw), llm=dataclasses.replace(self.llm, **kw)
        )


_RUNTIME_FIELDS = ("dtype", "param_dtype", "attention", "remat")
# Adapters and base storage: a fine-tuning choice on top of an architecture, not part of it.
ADAPTER_FIELDS = ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "quantized_base")


def architecture_differences(a: LlavaConfig, b: LlavaConfig) -> list[str]:
    """Fields (other than the runtime ones) where two configs differ, e.g. ['llm.hidden_size: 4096 != 5120']."""
    out = []
    for part in ("vision", "llm"):
        pa, pb = getattr(a, part), getattr(b, part)
        for f in dataclasses.fields(pa):
            if f.name not in _RUNTIME_FIELDS + ADAPTER_FIELDS and getattr(pa, f.name) != getattr(pb, f.name):
                out.append(f"{part}.{f.name}: {getattr(pa, f.name)!r} != {getattr(pb, f.name)!r}")
    for name in ("projector", "image_token_id"):
        if getattr(a, name) != getattr(b, name):
            out.append(f"{name}: {getattr(a, name)!r} != {getattr(b, name)!r}")
    return out


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _encode(name: str, v):
    if name in ("dtype", "param_dtype"):
        return jnp.dtype(v).name
    return list(v) if isinstance(v, tuple) else v


def config_to_dict(cfg: LlavaConfig) -> dict:
    """JSON-able dict of a LlavaConfig (dtypes by name)."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = (
            {k.name: _encode(k.name, getattr(v, k.name)) for k in dataclasses.fields(v)}
            if dataclasses.is_dataclass(v)
            else v
        )
    return out


def config_from_dict(d: dict) -> LlavaConfig:
    def part(cls, values):
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(values) - set(known)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown fields {sorted(unknown)}")
        kw = {}
        for k, v in values.items():
            if k in ("dtype", "param_dtype"):
                v = DTYPES[v]
            elif isinstance(v, list):
                v = tuple(v)
            kw[k] = v
        return cls(**kw)

    return LlavaConfig(
        vision=part(VisionConfig, d["vision"]),
        llm=part(LlamaConfig, d["llm"]),
        **{k: v for k, v in d.items() if k not in ("vision", "llm")},
    )
