"""Rotary position embedding (RoPE) in the Hugging Face half-split ("rotate_half") layout, with the
frequency scalings of transformers' `rope_type`:

| rope_type | inverse frequencies (theta = rope_theta, d = head_dim, i = 0, 2, ..., d-2) |
| --- | --- |
| default | theta ** (-i / d) |
| linear | theta ** (-i / d) / factor (positions stretched by `factor`) |
| dynamic | NTK-aware: theta is raised to theta * (factor * n / M - (factor - 1)) ** (d / (d - 2)) once the sequence length n = max(positions) + 1 exceeds M = max_position_embeddings; plain RoPE up to M |

`dynamic` follows transformers' per-forward rule: the frequencies of a call depend on the largest
position it sees (over the whole batch), so during cached decoding each step uses the length reached
so far, and keys already in the cache keep the rotation they were written with. transformers also
remembers the largest length seen by a model object across calls; here every call is computed as a
freshly loaded transformers model computes it. Shapes never depend on the length, only values.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

ROPE_TYPES = ("default", "linear", "dynamic")


def check_rope_type(rope_type: str, factor: float) -> None:
    """Refuse RoPE variants this model does not compute (yarn, llama3, longrope, ...)."""
    if rope_type not in ROPE_TYPES:
        raise ValueError(
            f"RoPE scaling type {rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)}); "
            "a model loaded with it would compute different positions than it was trained with"
        )
    if rope_type != "default" and not factor >= 1.0:
        raise ValueError(f"RoPE scaling {rope_type!r} needs factor >= 1, got {factor!r}")


def inverse_frequencies(
    head_dim: int,
    theta: float,
    positions: jax.Array,
    *,
    rope_type: str = "default",
    factor: float = 1.0,
    max_position_embeddings: int = 2048,
) -> jax.Array:
    """[head_dim // 2] float32 inverse frequencies for a call whose positions are `positions` [B, T]."""
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    if rope_type == "default":
        return 1.0 / (theta**exponents)
    if rope_type == "linear":
        return 1.0 / (theta**exponents) / factor
    if rope_type == "dynamic":
        seq_len = jnp.max(positions).astype(jnp.float32) + 1.0
        grown = seq_len > max_position_embeddings
        ratio = factor * jnp.maximum(seq_len, max_position_embeddings) / max_position_embeddings - (factor - 1)
        base = jnp.where(grown, theta * ratio ** (head_dim / (head_dim - 2)), jnp.float32(theta))
        return 1.0 / (base**exponents)
    check_rope_type(rope_type, factor)
    raise AssertionError("unreachable")


def rotation(positions: jax.Array, inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
    """positions [B, T], inv_freq [H/2] -> (cos, sin), each [B, T, H/2] float32."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate x [B, T, N, H] by (cos, sin) [B, T, H/2] (half-split layout) -> [B, T, N, H]."""
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
