"""Attention through one entry point with an `implementation` switch.

Call sites build a boolean mask with `make_mask` and call `attend`; the kernel is chosen by name:

- `xla`: explicit einsum + float32 softmax; runs everywhere (CPU tests, GPU, TPU).
- `cudnn`: `jax.nn.dot_product_attention(implementation='cudnn')` (NVIDIA GPUs, bf16/fp16, causal,
  no packing); the fused kernel derives causality and padding itself, so the mask is not passed.
- `auto`: `cudnn` on GPU when the call fits it, else `xla`.

Shapes: q [B, T, N, H]; k, v [B, S, K, H] with N % K == 0 (grouped-query attention); mask
[B, T, S] bool (True = may attend); output [B, T, N, H] in q.dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla", "cudnn", "auto")


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


def _xla(q, k, v, mask, scale):
    b, t, n, h = q.shape
    kvh = k.shape[2]
    q = q.reshape(b, t, kvh, n // kvh, h)
    scores = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v)
    return out.reshape(b, t, n, h)


def _cudnn(q, k, v, *, causal, kv_lengths, scale):
    return jax.nn.dot_product_attention(
        q, k, v, scale=scale, is_causal=causal, key_value_seq_lengths=kv_lengths, implementation="cudnn"
    )


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None,
    *,
    implementation: str = "xla",
    scale: float | None = None,
    causal: bool = False,
    kv_lengths: jax.Array | None = None,
) -> jax.Array:
    """Scaled dot-product attention. `causal`/`kv_lengths` describe the mask for fused kernels that
    build their own (cudnn); `mask` is what the xla kernel applies and must agree with them."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r}; choose one of {IMPLEMENTATIONS}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if implementation == "auto":
        fits = jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16) and q.shape[1] == k.shape[1]
        implementation = "cudnn" if fits else "xla"
    if implementation == "cudnn":
        return _cudnn(q, k, v, causal=causal, kv_lengths=kv_lengths, scale=scale)
    return _xla(q, k, v, mask, scale)
