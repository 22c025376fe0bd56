"""Next-token choice from logits: greedy, or sampling with temperature, top-k and top-p (nucleus).

`Sampling` holds the settings. Inside jitted code they split in two: a static `mode` (greedy or
not, which filters are on; changing it recompiles) and a float32 vector of values (temperature, k,
p; changing them does not recompile), so a server can vary temperature per request for free.

Filters apply in the order temperature -> top-k -> top-p (as transformers does). Top-p keeps the
smallest set of most likely tokens whose probability mass reaches p (the most likely token is always
kept). Ties at a filter's threshold keep every tied token.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0 = greedy (argmax; top_k/top_p ignored). top_k: keep the k most likely tokens
    (None = off). top_p: nucleus mass in (0, 1] (None = off)."""

    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None

    def __post_init__(self):
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1], or None to disable it")
        if self.top_k is not None and (int(self.top_k) != self.top_k or self.top_k < 1):
            raise ValueError(f"top_k={self.top_k} must be an integer >= 1, or None to disable it")

    @property
    def mode(self) -> SamplingMode:
        """Static part: what the compiled program does."""
        if self.temperature == 0.0:
            return SamplingMode(greedy=True, top_k=False, top_p=False)
        return SamplingMode(greedy=False, top_k=self.top_k is not None, top_p=self.top_p is not None)

    @property
    def values(self) -> jax.Array:
        """Dynamic part: float32 [3] = (temperature, k, p); unused entries are 1."""
        t = self.temperature if self.temperature > 0 else 1.0
        k = float(self.top_k) if self.top_k is not None else 1.0
        p = float(self.top_p) if self.top_p is not None else 1.0
        return jnp.asarray([t, k, p], jnp.float32)


GREEDY = Sampling()


class SamplingMode(NamedTuple):
    greedy: bool
    top_k: bool
    top_p: bool


def _order_keys(x: jax.Array) -> jax.Array:
    """float32 -> uint32 keys with the same order (-inf lowest), so thresholds can be searched exactly."""
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    negative = (bits >> 31) == 1
    return jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))


def _largest_threshold(keys: jax.Array, holds) -> jax.Array:
    """Largest uint32 threshold T [B] such that `holds(keys >= T)` ([B, V] bool mask -> [B] bool) is
    True; 0 (keep everything) when none is. `holds` must be monotone: True for all T below some point.
    Bisection over the 2^32 key values: 32 passes over the vocabulary, no sort."""
    b = keys.shape[0]

    def step(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2 + 1  # in (lo, hi] while lo < hi; no overflow
        ok = holds(keys >= mid[:, None]) & (lo < hi)
        return jnp.where(ok, mid, lo), jnp.where(ok | (lo >= hi), hi, mid - 1)

    lo = jnp.zeros((b,), jnp.uint32)
    hi = jnp.full((b,), 0xFFFFFFFF, jnp.uint32)
    return jax.lax.fori_loop(0, 32, step, (lo, hi))[0]


def filter_logits(logits: jax.Array, mode: SamplingMode, values: jax.Array) -> jax.Array:
    """Temperature-scaled logits with filtered-out tokens at -inf. logits [B, V] -> [B, V] float32.
    Not for greedy mode (use argmax).

    The k-th largest logit and the nucleus boundary are found by bisection on the logits' bit order
    (exact, O(32 V) per row) rather than a vocabulary sort, which is far slower on some backends."""
    x = logits.astype(jnp.float32) / values[0]
    if not (mode.top_k or mode.top_p):
        return x
    keys = _order_keys(x)
    threshold = jnp.zeros(x.shape[:1], jnp.uint32)
    if mode.top_k:
        k = jnp.clip(values[1], 1, x.shape[-1])
        threshold = _largest_threshold(keys, lambda keep: jnp.sum(keep, axis=-1) >= k)
    if mode.top_p:
        probs = jax.nn.softmax(jnp.where(keys >= threshold[:, None], x, -jnp.inf), axis=-1)
        p = values[2]
        mass_threshold = _largest_threshold(keys, lambda keep: jnp.sum(jnp.where(keep, probs, 0.0), axis=-1) >= p)
        threshold = jnp.maximum(threshold, mass_threshold)
    return jnp.where(keys >= threshold[:, None], x, -jnp.inf)


def sample_tokens(logits: jax.Array, key: jax.Array, mode: SamplingMode, values: jax.Array) -> jax.Array:
    """logits [B, V] -> next tokens [B] int32. `key` is unused in greedy mode."""
    if mode.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filter_logits(logits, mode, values), axis=-1).astype(jnp.int32)
