"""Attention through one entry point with an `implementation` switch.

Call sites build a boolean mask with `make_mask` (or pass None when nothing beyond causality is masked)
and call `attend`; the kernel is chosen by name:

- `xla`: explicit einsum + float32 softmax; runs everywhere (CPU tests, GPU, TPU).
- `cudnn`: `jax.nn.dot_product_attention(implementation='cudnn')` (NVIDIA GPUs, bf16/fp16). With no
  mask, the fused kernel's own causal mask is the whole mask; with a mask (segment ids given: packing or
  padding), the mask is passed too, and jax hands it to cuDNN as an additive bias (jax 0.10 and 0.11),
  so packed samples and padding stay apart. See `cudnn_arguments`.
- `auto`: `cudnn` on GPU only for calls it takes natively (bf16/fp16, self-attention, head dim a
  multiple of 8 up to 128, and no mask beyond causality); `xla` otherwise. A masked call goes to `xla`
  because the bias route costs a [B, T, S] bias per layer, needs even lengths in training and has
  known gradient bugs in jax's cuDNN wrapper (jax#30593). The table in README.md says the same.

Shapes: q [B, T, N, H]; k, v [B, S, K, H] with N % K == 0 (grouped-query attention); mask
[B, T, S] bool (True = may attend) or None; output [B, T, N, H] in q.dtype.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla", "cudnn", "auto")
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def make_mask(
    q_segment_ids: jax.Array,
    kv_segment_ids: jax.Array,
    *,
    causal: bool,
    q_offset: jax.Array | int = 0,
) -> jax.Array:
    """[B, T] x [B, S] segment ids -> [B, T, S] bool.

    Query t may see key s when both belong to the same non-zero segment and, if causal, the key's slot
    s is not after the query's slot `q_offset + t` (slots index the key/value buffer, e.g. a KV cache).
    Segment 0 marks padding; a padding query sees nothing (its output is finite and unused).
    """
    same = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]) & (kv_segment_ids[:, None, :] != 0)
    if not causal:
        return same
    t = q_segment_ids.shape[1]
    s = kv_segment_ids.shape[1]
    q_slot = q_offset + jnp.arange(t)[:, None]
    kv_slot = jnp.arange(s)[None, :]
    return same & (kv_slot <= q_slot)[None]


def choose(implementation: str, q: jax.Array, k: jax.Array, *, masked: bool, backend: str | None = None) -> str:
    """The kernel `attend` runs: `implementation` itself, or for `auto` a decision from static facts
    only (platform, dtype, shapes, and whether a mask beyond causality is given)."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r}; choose one of {IMPLEMENTATIONS}")
    if implementation != "auto":
        return implementation
    backend = jax.default_backend() if backend is None else backend
    head_dim = q.shape[-1]
    native = (
        backend == "gpu"
        and q.dtype in _CUDNN_DTYPES
        and q.shape[1] == k.shape[1]
        and head_dim % 8 == 0
        and head_dim <= 128
        and not masked
    )
    return "cudnn" if native else "xla"


def cudnn_arguments(q, k, v, mask, *, causal: bool, scale: float) -> dict[str, Any]:
    """Keyword arguments for `jax.nn.dot_product_attention` that describe the whole mask: causality as
    `is_causal` (the kernel skips the blocks above the diagonal) and, when given, the segment/padding
    mask as a [B, 1, T, S] boolean `mask` (broadcast over heads)."""
    args = {"query": q, "key": k, "value": v, "scale": scale, "is_causal": causal}
    if mask is not None:
        args["mask"] = mask[:, None]
    return args


def _xla(q, k, v, mask, scale, causal):
    b, t, n, h = q.shape
    s, kvh = k.shape[1], k.shape[2]
    if mask is None and causal:
        mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, s), bool)), (b, t, s))
    q = q.reshape(b, t, kvh, n // kvh, h)
    scores = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v)
    return out.reshape(b, t, n, h)


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None,
    *,
    implementation: str = "xla",
    scale: float | None = None,
    causal: bool = False,
) -> jax.Array:
    """Scaled dot-product attention.

    mask: None when nothing beyond `causal` is masked (one sequence per row, every token real), else
    the full [B, T, S] mask (built by `make_mask`, causality included). Every kernel honours both."""
    implementation = choose(implementation, q, k, masked=mask is not None)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if implementation == "cudnn":
        args = cudnn_arguments(q, k, v, mask, causal=causal, scale=scale)
        return jax.nn.dot_product_attention(**args, implementation="cudnn")
    return _xla(q, k, v, mask, scale, causal)
