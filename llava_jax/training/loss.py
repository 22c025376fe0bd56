"""Next-token cross-entropy over label positions only.

labels are HF-aligned (labels[t] is the token at t, -100 where not trained); position t predicts
labels[t + 1] (`shifted_targets`). The loss is returned as sums, so that micro-batches and
data-parallel shards add up and the mean is taken once over the real target tokens of the whole
global batch.
"""

import jax
import jax.numpy as jnp
import optax

IGNORE_INDEX = -100


def shifted_targets(labels: jax.Array) -> jax.Array:
    """[B, L] HF-aligned labels -> [B, L] next-token targets (the last position predicts nothing)."""
    pad = jnp.full((labels.shape[0], 1), IGNORE_INDEX, labels.dtype)
    return jnp.concatenate([labels[:, 1:], pad], axis=1)


def gather_targets(hidden: jax.Array, targets: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Keep the first k target positions of each row: hidden [B, L, D] -> [B, k, D], targets -> [B, k].

    Only target positions need logits; in LLaVA most positions (image tokens, prompts) have none, so
    this cuts the vocabulary matmul and the logits memory by L / k. A row with more than k targets
    must be refused by the caller beforehand (`count_targets`), never truncated.
    """
    valid = targets != IGNORE_INDEX
    idx = jax.vmap(lambda v: jnp.nonzero(v, size=k, fill_value=0)[0])(valid)  # [B, k]
    keep = jnp.arange(k)[None, :] < jnp.sum(valid, axis=1, keepdims=True)
    h = jnp.take_along_axis(hidden, idx[..., None], axis=1)
    t = jnp.where(keep, jnp.take_along_axis(targets, idx, axis=1), IGNORE_INDEX)
    return h, t


def max_targets_per_row(labels) -> int:
    """Host-side: the largest number of next-token targets in any row of a numpy label batch."""
    import numpy as np

    return int((np.asarray(labels)[:, 1:] != IGNORE_INDEX).sum(axis=1).max(initial=0))


def target_loss_sums(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """logits [B, K, V] float32 and already-shifted targets [B, K] -> (NLL sum, target count)."""
    valid = targets != IGNORE_INDEX
    nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), jnp.where(valid, targets, 0))
    return jnp.sum(jnp.where(valid, nll, 0.0)), jnp.sum(valid).astype(jnp.float32)
