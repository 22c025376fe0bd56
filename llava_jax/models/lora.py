"""LoRA adapters and a weight-only int8 base for the LLM's linear layers.

`AdaptedLinear` replaces `nnx.Linear` (no bias) inside the decoder blocks when `LlamaConfig.lora_rank
> 0` or `LlamaConfig.quantized_base != "none"`. Its parameters, per block (the scanned stack adds a
leading `layers` axis of size L to each, with the logical axis `layers`):

| name | shape (one block) | stacked | dtype | present when |
| --- | --- | --- | --- | --- |
| `kernel` | [in, out] | [L, in, out] | param dtype, or int8 when quantized | always (same name as `nnx.Linear`) |
| `kernel_scale` | [out] | [L, out] | float32 | `quantized_base == "int8"` |
| `lora_a` | [in, r] | [L, in, r] | param dtype | the linear's name matches `lora_targets` |
| `lora_b` | [r, out] | [L, r, out] | param dtype | idem |

Logical axes: `kernel` keeps the linear's (e.g. ("embed", "heads")), `lora_a` is (in_axis, "lora_rank"),
`lora_b` ("lora_rank", out_axis), `kernel_scale` (out_axis,); `lora_rank` is never sharded.

    y = x @ W + dropout(x) @ lora_a @ lora_b * (lora_alpha / lora_rank)
    W = dequantize_kernel(kernel, kernel_scale) = kernel * kernel_scale[..., None, :]   (int8 base)

The adapter maths is PEFT's `LoraLayer` (scaling alpha / r, not rsLoRA): PEFT's `lora_A.weight` [r, in]
is `lora_a.T`, `lora_B.weight` [out, r] is `lora_b.T`. Initialisation is PEFT's default: `lora_a`
uniform in +-1/sqrt(in) (kaiming-uniform with a=sqrt(5), as `torch.nn.Linear` initialises [r, in]),
`lora_b` zeros, so a fresh adapter leaves the model unchanged. Merging into a float kernel:
`merged_kernel(...)`.

The int8 base is per-output-channel symmetric: `kernel_scale[o] = max_i |W[i, o]| / 127` and
`kernel = round(W / kernel_scale)` (`quantize_kernel`). In the matmul the int8 kernel is converted to
the compute dtype (exact: |q| <= 127) and the per-channel scale multiplies the output,
`(x @ kernel) * kernel_scale`, which equals `x @ dequantize_kernel(...)` up to rounding without
materialising a scaled copy of the weight.

`lora_targets` is a regex matched with `re.fullmatch` against the linear's attribute name in the
block (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj); `lm_head`, the embeddings, the
vision tower and the projector never take adapters.
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# Every linear of a LLaMA block: the names `lora_targets` is matched against.
BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_TARGETS = r"(q|k|v|o|gate|up|down)_proj"
QUANTIZED_BASES = ("none", "int8")
INT8_MAX = 127
_KERNEL_INIT = nnx.initializers.normal(0.02)  # the decoder's linear init (llama.py)


def check_settings(rank: int, alpha: float, dropout: float, targets: str, quantized_base: str) -> None:
    """Clear errors for bad LoRA / quantisation settings (called by `LlamaConfig`)."""
    if rank < 0:
        raise ValueError(f"lora_rank={rank}: use 0 (no adapters) or a positive rank such as 128")
    if rank and alpha <= 0:
        raise ValueError(f"lora_alpha={alpha}: must be positive (the original's recipe: 2 * rank)")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"lora_dropout={dropout}: must be in [0, 1)")
    if quantized_base not in QUANTIZED_BASES:
        raise ValueError(f"quantized_base={quantized_base!r}: use one of {QUANTIZED_BASES}")
    try:
        pattern = re.compile(targets)
    except re.error as e:
        raise ValueError(f"lora_targets={targets!r} is not a regex: {e}") from None
    if rank and not any(pattern.fullmatch(n) for n in BLOCK_LINEARS):
        raise ValueError(f"lora_targets={targets!r} matches none of the block linears {BLOCK_LINEARS}")


def is_target(name: str, targets: str) -> bool:
    """Whether the block linear `name` (e.g. 'q_proj') takes an adapter under `targets`."""
    return re.fullmatch(targets, name) is not None


def quantize_kernel(w):
    """Float kernel [..., in, out] -> (int8 kernel [..., in, out], float32 scale [..., out]).

    Symmetric per output channel; an all-zero channel gets scale 1. Works on numpy and jax arrays
    (numpy in, numpy out: checkpoints are quantised on the host before they are placed)."""
    xp = np if isinstance(w, np.ndarray) else jnp
    w32 = w.astype(xp.float32)
    amax = xp.max(xp.abs(w32), axis=-2)
    scale = xp.where(amax > 0, amax / INT8_MAX, 1.0).astype(xp.float32)
    q = xp.clip(xp.round(w32 / scale[..., None, :]), -INT8_MAX, INT8_MAX).astype(xp.int8)
    return q, scale


def dequantize_kernel(kernel, scale, dtype=jnp.float32):
    """int8 kernel [..., in, out] and scale [..., out] -> float kernel [..., in, out] in `dtype`."""
    xp = np if isinstance(kernel, np.ndarray) else jnp
    return (kernel.astype(xp.float32) * scale.astype(xp.float32)[..., None, :]).astype(dtype)


def merged_kernel(kernel, lora_a, lora_b, alpha: float, rank: int, scale=None, dtype=jnp.float32):
    """The float kernel [..., in, out] with the adapter folded in: W + lora_a @ lora_b * alpha / rank,
    in float32 before the cast to `dtype`. `scale`: the int8 base's kernel_scale, or None."""
    xp = np if isinstance(kernel, np.ndarray) else jnp
    w = dequantize_kernel(kernel, scale, xp.float32) if scale is not None else kernel.astype(xp.float32)
    delta = xp.matmul(lora_a.astype(xp.float32), lora_b.astype(xp.float32)) * (alpha / rank)
    return (w + delta).astype(dtype)


def quantize_arrays(arrays: dict, dtypes: dict) -> dict:
    """Fit float checkpoint arrays to a model with an int8 base: every `.../kernel` whose parameter
    (by '/'-path in `dtypes`, path -> dtype) is int8 is quantised, and its `.../kernel_scale` added.
    Other entries pass through unchanged."""
    out = dict(arrays)
    for key, a in arrays.items():
        if key.endswith("/kernel") and dtypes.get(key) == np.int8 and np.issubdtype(np.asarray(a).dtype, np.floating):
            out[key], out[key + "_scale"] = quantize_kernel(np.asarray(a))
    return out


class AdaptedLinear(nnx.Module):
    """A bias-free linear with an optional LoRA adapter and an optional int8 base. [..., in] -> [..., out]."""

    def __init__(
        self,
        din: int,
        dout: int,
        axes: tuple[str, str],
        *,
        rank: int = 0,
        alpha: float = 1.0,
        dropout: float = 0.0,
        quantized_base: str = "none",
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        kernel_init=_KERNEL_INIT,
        rngs: nnx.Rngs,
    ):
        self.dtype = dtype
        self.rank, self.alpha, self.dropout = rank, alpha, dropout
        w = kernel_init(rngs.params(), (din, dout), param_dtype)
        if quantized_base == "int8":
            q, scale = quantize_kernel(w)
            self.kernel = nnx.Param(q, axes=axes)
            self.kernel_scale = nnx.Param(scale, axes=(axes[1],))
        else:
            self.kernel = nnx.Param(w, axes=axes)
            self.kernel_scale = None
        if rank:
            bound = 1.0 / math.sqrt(din)
            a = jax.random.uniform(rngs.params(), (din, rank), param_dtype, -bound, bound)
            self.lora_a = nnx.Param(a, axes=(axes[0], "lora_rank"))
            self.lora_b = nnx.Param(jnp.zeros((rank, dout), param_dtype), axes=("lora_rank", axes[1]))
        else:
            self.lora_a = self.lora_b = None

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def __call__(self, x: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        """x [..., in] -> [..., out] in the compute dtype. dropout_key: None (no dropout, inference)
        or a PRNG key for the adapter's input dropout."""
        x = x.astype(self.dtype)
        y = x @ self.kernel[...].astype(self.dtype)
        if self.kernel_scale is not None:
            y = y * self.kernel_scale[...].astype(self.dtype)
        if self.lora_a is None:
            return y
        h = x
        if dropout_key is not None and self.dropout > 0:
            keep = jax.random.bernoulli(dropout_key, 1.0 - self.dropout, x.shape)
            h = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(self.dtype)
        h = (h @ self.lora_a[...].astype(self.dtype)) @ self.lora_b[...].astype(self.dtype)
        return y + h * jnp.asarray(self.scaling, self.dtype)
