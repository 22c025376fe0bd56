"""LoRA adapters and a weight-only int8 or 4-bit NF4 base for the LLM's linear layers.

`AdaptedLinear` replaces `nnx.Linear` (no bias) inside the decoder blocks when `LlamaConfig.lora_rank
> 0` or `LlamaConfig.quantized_base != "none"`. Its parameters, per block (the scanned stack adds a
leading `layers` axis of size L to each, with the logical axis `layers`):

| name | shape (one block) | stacked | dtype | present when |
| --- | --- | --- | --- | --- |
| `kernel` | [in, out] | [L, in, out] | param dtype, or int8 when quantized | always (same name as `nnx.Linear`) |
| `kernel` (nf4) | [in / 2, out] | [L, in / 2, out] | uint8, two 4-bit codes per byte | `quantized_base == "nf4"` |
| `kernel_scale` | [out] | [L, out] | float32 | `quantized_base == "int8"` |
| `kernel_absmax` | [in / 64, out] | [L, in / 64, out] | float32 | `quantized_base == "nf4"` |
| `lora_a` | [in, r] | [L, in, r] | param dtype | the linear's name matches `lora_targets` |
| `lora_b` | [r, out] | [L, r, out] | param dtype | idem |

Logical axes: `kernel` keeps the linear's (e.g. ("embed", "heads")), `lora_a` is (in_axis, "lora_rank"),
`lora_b` ("lora_rank", out_axis), `kernel_scale` (out_axis,), `kernel_absmax` the kernel's; `lora_rank` is
never sharded.

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
materialising a scaled copy of the weight. Float checkpoints are quantised as they are loaded
(`quantize_arrays`, called by `checkpoint.hf_load.convert_arrays`); exporters get float kernels back
with `dequantize_kernel` / `merged_kernel`.

The NF4 base is QLoRA's 4-bit NormalFloat as bitsandbytes stores it (`quant_type="nf4"`, blocksize 64,
no double quantisation of the absmax): each output column's input dimension is cut into blocks of 64;
`kernel_absmax[b, o] = max_i |W[64 b + i, o]|` (float32); each weight becomes the index of the nearest
of the 16 values `NF4_CODE`, found as bitsandbytes' `dQuantizeNF4` does: x = W * (1 / absmax) in float32,
code = the number of midpoints between neighbouring values (`NF4_MIDPOINTS`, float32) that x exceeds
(a value equal to a midpoint takes the lower code). Codes of inputs 2j and 2j + 1 share byte j, the
first in the high nibble. For a torch weight [out, in] flattened row-major (bitsandbytes' layout) these
are the same blocks and the same byte order: bitsandbytes' packed bytes are `kernel` moved to [out,
in / 2] and flattened, its absmax `kernel_absmax` moved to [out, in / 64] and flattened (so every input
size must be a multiple of 64, which all LLaMA / Vicuna sizes are). An all-zero block stores absmax 0
and code 7 (the value 0; bitsandbytes' 0 * (1 / 0) is NaN there and takes code 0, also dequantised to 0). `dequantize_kernel` gives `NF4_CODE[code] * absmax` in float32, the value
bitsandbytes' `dequantize_4bit` gives. In the matmul the dequantisation runs inside the jitted step,
one linear at a time (unpack nibbles, look the 16 values up, scale, cast to the compute dtype, dot):
only the packed bytes and absmax stay resident (0.5625 bytes per weight against 2 for bf16).

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
QUANTIZED_BASES = ("none", "int8", "nf4")
INT8_MAX = 127
NF4_BLOCK = 64
# The 16 NF4 values: QLoRA (Dettmers et al. 2023, arXiv:2305.14314) appendix E, and bitsandbytes'
# `get_4bit_type("nf4")` (bitsandbytes/functional.py) / `dDequantizeNF4` (csrc/kernels.cu).
NF4_CODE = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    np.float32,
)
# Decision thresholds of bitsandbytes' `dQuantizeNF4`: the midpoints of neighbouring values, as float32.
NF4_MIDPOINTS = ((NF4_CODE[:-1].astype(np.float64) + NF4_CODE[1:]) / 2).astype(np.float32)
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


def nf4_quantize(w):
    """Float kernel [..., in, out] -> (uint8 packed codes [..., in / 2, out], float32 absmax [..., in / 64, out]).

    Blocks of `NF4_BLOCK` along `in` per output column; codes as bitsandbytes' `dQuantizeNF4` (see the
    module docstring). Works on numpy and jax arrays (numpy in, numpy out)."""
    xp = np if isinstance(w, np.ndarray) else jnp
    *lead, din, dout = w.shape
    if din % NF4_BLOCK:
        raise ValueError(f"nf4 needs an input size that is a multiple of {NF4_BLOCK}; this kernel has {din}")
    blocks = w.astype(xp.float32).reshape(*lead, din // NF4_BLOCK, NF4_BLOCK, dout)
    absmax = xp.max(xp.abs(blocks), axis=-2)  # [..., in / 64, out]
    inv = xp.where(absmax > 0, xp.float32(1.0) / xp.where(absmax > 0, absmax, 1.0), 0.0).astype(xp.float32)
    x = blocks * inv[..., None, :]
    codes = xp.zeros(x.shape, xp.uint8)
    for m in NF4_MIDPOINTS:  # code = how many thresholds x exceeds (strictly)
        codes = codes + (x > m).astype(xp.uint8)
    codes = codes.reshape(*lead, din // 2, 2, dout)
    packed = (codes[..., 0, :] << 4) | codes[..., 1, :]
    return packed.astype(xp.uint8), absmax.astype(xp.float32)


def nf4_dequantize(packed, absmax, dtype=jnp.float32):
    """uint8 packed codes [..., in / 2, out] and float32 absmax [..., in / 64, out] -> float kernel
    [..., in, out] in `dtype`: NF4_CODE[code] * absmax in float32, then one cast."""
    xp = np if isinstance(packed, np.ndarray) else jnp
    *lead, half, dout = packed.shape
    codes = xp.stack([packed >> 4, packed & 0x0F], axis=-2).reshape(*lead, 2 * half, dout)
    values = xp.asarray(NF4_CODE)[codes.astype(xp.int32)]
    blocks = values.reshape(*lead, absmax.shape[-2], NF4_BLOCK, dout) * absmax.astype(xp.float32)[..., None, :]
    return blocks.reshape(*lead, 2 * half, dout).astype(dtype)


def dequantize_kernel(kernel, scale, dtype=jnp.float32):
    """A quantised kernel -> float kernel [..., in, out] in `dtype`: int8 [..., in, out] with its
    per-channel `kernel_scale` [..., out], or NF4 (uint8 [..., in / 2, out]) with its `kernel_absmax`
    [..., in / 64, out]."""
    if kernel.dtype == np.uint8:
        return nf4_dequantize(kernel, scale, dtype)
    xp = np if isinstance(kernel, np.ndarray) else jnp
    return (kernel.astype(xp.float32) * scale.astype(xp.float32)[..., None, :]).astype(dtype)


def merged_kernel(kernel, lora_a, lora_b, alpha: float, rank: int, scale=None, dtype=jnp.float32):
    """The float kernel [..., in, out] with the adapter folded in: W + lora_a @ lora_b * alpha / rank,
    in float32 before the cast to `dtype`. `scale`: the int8 base's kernel_scale, the NF4 base's
    kernel_absmax, or None (a float kernel)."""
    xp = np if isinstance(kernel, np.ndarray) else jnp
    w = dequantize_kernel(kernel, scale, xp.float32) if scale is not None else kernel.astype(xp.float32)
    delta = xp.matmul(lora_a.astype(xp.float32), lora_b.astype(xp.float32)) * (alpha / rank)
    return (w + delta).astype(dtype)


def quantize_arrays(arrays: dict, dtypes: dict) -> dict:
    """Fit float checkpoint arrays to a model with a quantised base: every float `.../kernel` whose
    parameter (by '/'-path in `dtypes`, path -> dtype) is int8 is quantised per channel and its
    `.../kernel_scale` added; uint8 (NF4): packed, and its `.../kernel_absmax` added. Other entries
    pass through unchanged."""
    out = dict(arrays)
    for key, a in arrays.items():
        if not key.endswith("/kernel") or not np.issubdtype(np.asarray(a).dtype, np.floating):
            continue
        if dtypes.get(key) == np.int8:
            out[key], out[key + "_scale"] = quantize_kernel(np.asarray(a))
        elif dtypes.get(key) == np.uint8:
            out[key], out[key + "_absmax"] = _nf4_by_layer(np.asarray(a))
    return out


def _nf4_by_layer(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`nf4_quantize` of a stacked kernel [L, in, out] one layer at a time (a 7B stack is GBs in float32)."""
    if w.ndim != 3:
        return nf4_quantize(w)
    packed = np.empty((w.shape[0], w.shape[1] // 2, w.shape[2]), np.uint8)
    absmax = np.empty((w.shape[0], w.shape[1] // NF4_BLOCK, w.shape[2]), np.float32)
    for i in range(w.shape[0]):
        packed[i], absmax[i] = nf4_quantize(w[i])
    return packed, absmax


def float_kernel_shape(shape: tuple[int, ...], dtype) -> tuple[int, ...]:
    """The float [..., in, out] shape of a stored kernel: an NF4 kernel (uint8) holds in / 2 rows."""
    return (*shape[:-2], 2 * shape[-2], shape[-1]) if np.dtype(dtype) == np.uint8 else tuple(shape)


class AdaptedLinear(nnx.Module):
    """A bias-free linear with an optional LoRA adapter and an optional int8 / NF4 base. [..., in] -> [..., out]."""

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
            self.kernel_absmax = None
        elif quantized_base == "nf4":
            packed, absmax = nf4_quantize(w)
            self.kernel = nnx.Param(packed, axes=axes)
            self.kernel_absmax = nnx.Param(absmax, axes=axes)
            self.kernel_scale = None
        else:
            self.kernel = nnx.Param(w, axes=axes)
            self.kernel_scale = self.kernel_absmax = None
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
        if self.kernel_absmax is not None:  # NF4: dequantised here, inside the jitted step, one linear at a time
            y = x @ nf4_dequantize(self.kernel[...], self.kernel_absmax[...], self.dtype)
        else:
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
