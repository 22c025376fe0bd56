"""The jitted train step: micro-batched gradients of the trainable leaves, masked AdamW update.

Gradients are taken with respect to the trainable leaves only (the frozen ones enter as constants),
summed over micro-batches, and divided once by the loss denominator of the whole global batch
(`loss.reduce_sums`: the number of target tokens, or with the original's reduction the number of
(micro-batch, device) groups), so accumulation gives the same update as one big batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from llava_jax.parallel.rules import constrain
from llava_jax.training.contrastive import OBJECTIVES, clip_lm_loss
from llava_jax.training.loss import gather_targets, reduce_sums, shifted_targets
from llava_jax.training.state import TrainState

MODEL_KEYS = ("input_ids", "labels", "positions", "segment_ids", "images")


def _split(params, mask):
    trainable = jax.tree.map(lambda t, p: p if t else None, mask, params)
    frozen = jax.tree.map(lambda t, p: None if t else p, mask, params)
    return trainable, frozen


def _join(mask, trainable, frozen):
    return jax.tree.map(lambda t, a, b: a if t else b, mask, trainable, frozen, is_leaf=lambda x: x is None)


def _zero_like(p):
    return jnp.zeros((), p.dtype if jnp.issubdtype(p.dtype, jnp.floating) else jnp.float32)


def _micro_batches(batch: dict, n: int) -> dict:
    """[B, ...] -> [n, B/n, ...], micro-batch i = rows i, i+n, ...: every micro-batch spans all the
    devices the batch is sharded over."""

    def split(x):
        if x.shape[0] % n:
            raise ValueError(f"batch of {x.shape[0]} rows does not split into {n} micro-batches")
        return x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)

    return jax.tree.map(split, batch)


def loss_fn(
    graphdef,
    params: Any,
    batch: dict,
    targets_per_row: int = 0,
    reduction: str = "global_token_mean",
    loss_groups: int = 1,
    dropout_key: jax.Array | None = None,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """(numerator, (denominator, number of target tokens)) of the loss of one (micro-)batch, see
    `loss.reduce_sums`; `loss_groups` device groups per micro-batch for the original's reduction.

    targets_per_row > 0: logits only at the first that-many target positions of each row (rows with
    more must have been refused on the host); 0: logits at every position. dropout_key: PRNG key of
    the LoRA dropout (models without adapters ignore it); None: no dropout."""
    model = nnx.merge(graphdef, params)
    batch = {k: constrain(v, ("batch",) + (None,) * (v.ndim - 1)) for k, v in batch.items()}
    embeddings = model.embed(batch["input_ids"], batch["images"])
    hidden, _ = model.language_model.hidden(
        embeddings, positions=batch["positions"], segment_ids=batch["segment_ids"], dropout_key=dropout_key
    )
    targets = shifted_targets(batch["labels"])
    if 0 < targets_per_row < targets.shape[1]:
        hidden, targets = gather_targets(hidden, targets, targets_per_row)
    num, denom, count = reduce_sums(model.language_model.logits(hidden), targets, reduction, loss_groups)
    return num, (denom, count)


def make_train_step(
    graphdef,
    tx: optax.GradientTransformation,
    mask: Any,
    lr_schedule: Callable,
    micro_batches: int = 1,
    targets_per_row: int = 0,
    loss_reduction: str = "global_token_mean",
    loss_groups: int = 1,
    objective: str = "lm",
    caption_prefix: float = 0.0,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """Returns step(state, batch) -> (state, metrics). `batch` holds the MODEL_KEYS arrays.

    loss_reduction / loss_groups: see `loss.reduce_sums`; with "original", each micro-batch's rows
    form `loss_groups` consecutive groups (the data-parallel devices' shares of it).
    objective: "lm" (LLaVA's next-token loss on the conversation) or "clip_lm" (stage 0, see
    `contrastive.py`: caption LM + image-caption InfoNCE; its parts are added to the metrics).
    caption_prefix: with "clip_lm", the fraction of rows whose image slots hold their caption."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective={objective!r}: use one of {OBJECTIVES}")

    def grads_and_sums(trainable, frozen, batch, key):
        def f(tr):
            params = _join(mask, tr, frozen)
            if objective == "clip_lm":
                return clip_lm_loss(graphdef, params, batch, targets_per_row, caption_prefix)
            total, (denom, count) = loss_fn(graphdef, params, batch, targets_per_row, loss_reduction, loss_groups, key)
            return total, (denom, count, {})

        (total, (denom, count, parts)), g = jax.value_and_grad(f, has_aux=True)(trainable)
        return g, total, denom, count, parts

    def step(state: TrainState, batch: dict):
        batch = {k: batch[k] for k in MODEL_KEYS}
        trainable, frozen = _split(state.params, mask)
        # Dropout (LoRA adapters only) draws from the run's key, the step and the micro-batch, so a
        # resumed run repeats the same masks.
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        if micro_batches == 1:
            g, total, denom, count, parts = grads_and_sums(trainable, frozen, batch, key)
        else:

            def body(acc, xs):
                mb, i = xs
                return jax.tree.map(
                    jnp.add, acc, grads_and_sums(trainable, frozen, mb, jax.random.fold_in(key, i))
                ), None

            zero = jnp.zeros((), jnp.float32)
            part_names = ("lm_loss", "clip_loss") if objective == "clip_lm" else ()
            zeros = (jax.tree.map(jnp.zeros_like, trainable), zero, zero, zero, {k: zero for k in part_names})
            xs = (_micro_batches(batch, micro_batches), jnp.arange(micro_batches))
            (g, total, denom, count, parts), _ = jax.lax.scan(body, zeros, xs)
            parts = {k: v / micro_batches for k, v in parts.items()}  # mean over micro-batches
        denom = jnp.maximum(denom, 1.0)
        g = jax.tree.map(lambda x: x / denom, g)
        # Frozen leaves enter the optax masks as zeros; set_to_zero ignores them (and XLA drops them).
        # An int8 base's zeros are float32, so that a clip over every leaf can scale them.
        full_grads = _join(mask, g, jax.tree.map(_zero_like, frozen))
        updates, opt_state = tx.update(full_grads, state.opt_state, state.params)
        params = jax.tree.map(lambda t, p, u: (p + u).astype(p.dtype) if t else p, mask, state.params, updates)
        metrics = {
            "loss": total / denom,
            "target_tokens": count,
            "tokens": jnp.sum(batch["segment_ids"] != 0),
            "grad_norm": optax.global_norm(g),
            "lr": lr_schedule(state.step),
            **parts,
        }
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return step
