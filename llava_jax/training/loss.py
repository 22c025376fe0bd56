"""Next-token cross-entropy over label positions only.

labels are HF-aligned (labels[t] is the token at t, -100 where not trained); position t predicts
labels[t + 1] (`shifted_targets`). The loss is returned as (numerator, denominator) sums, so that
micro-batches and data-parallel shards add up and the division is done once per global batch.

Two reductions (`stage.loss_reduction`):
  global_token_mean  sum of target NLL / number of target tokens of the whole global batch: every
                     target token weighs the same, whatever the micro-batching or device count.
  original           what the original (HF Trainer + DeepSpeed) computes: LlamaForCausalLM's token
                     mean over each device's micro-batch, divided by the number of micro-batches
                     (gradient accumulation), averaged over the data-parallel devices. That is the
                     plain mean, over all (micro-batch, device) groups, of each group's token mean;
                     a group without targets adds 0 (the original's would be NaN).
"""

import jax
import jax.numpy as jnp
import optax

from llava_jax.data.tokenizer import IGNORE_INDEX

REDUCTIONS = ("global_token_mean", "original")


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


def row_loss_sums(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """logits [B, K, V] and already-shifted targets [B, K] -> per-row (NLL sum [B], target count [B])."""
    valid = targets != IGNORE_INDEX
    nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), jnp.where(valid, targets, 0))
    return jnp.sum(jnp.where(valid, nll, 0.0), axis=1), jnp.sum(valid, axis=1).astype(jnp.float32)


def group_mean_sums(row_nll: jax.Array, row_count: jax.Array, groups: int) -> tuple[jax.Array, jax.Array]:
    """The original's reduction for one micro-batch: rows [B] split into `groups` consecutive groups
    (one per data-parallel device, B / groups rows each) -> (sum of the groups' token means, groups).
    A group without targets contributes 0 but still counts in the denominator."""
    if row_nll.shape[0] % groups:
        raise ValueError(f"a micro-batch of {row_nll.shape[0]} rows does not split into {groups} device groups")
    nll = jnp.sum(row_nll.reshape(groups, -1), axis=1)
    count = jnp.sum(row_count.reshape(groups, -1), axis=1)
    means = jnp.where(count > 0, nll / jnp.maximum(count, 1.0), 0.0)
    return jnp.sum(means), jnp.asarray(groups, jnp.float32)


def reduce_sums(
    logits: jax.Array, targets: jax.Array, reduction: str = "global_token_mean", groups: int = 1
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """logits [B, K, V], shifted targets [B, K] -> (numerator, denominator, target count) of one
    micro-batch; the loss of a global batch is sum(numerators) / sum(denominators) over its micro-batches."""
    row_nll, row_count = row_loss_sums(logits, targets)
    count = jnp.sum(row_count)
    if reduction == "global_token_mean":
        return jnp.sum(row_nll), count, count
    if reduction == "original":
        return (*group_mean_sums(row_nll, row_count, groups), count)
    raise ValueError(f"loss_reduction={reduction!r}: use one of {REDUCTIONS}")
