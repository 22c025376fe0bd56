"""AdamW with warmup + cosine, gradient clipping, and frozen partitions as optax masks.

`optax.multi_transform` routes trainable leaves to clip+AdamW and frozen leaves to `set_to_zero`,
which keeps no state: frozen parameters get no Adam moments and no weight decay. The train step then
applies updates to trainable leaves only, so frozen leaves stay bit-identical.
"""

from __future__ import annotations

import math
from typing import Any

import optax

from llava_jax.training import trainable


def warmup_steps(ratio: float, total_steps: int) -> int:
    """Warmup length as HF Trainer counts it (`TrainingArguments.get_warmup_steps`): rounded up."""
    return math.ceil(total_steps * ratio)


def schedule(optim, total_steps: int) -> optax.Schedule:
    """Linear warmup over `warmup_ratio` of the steps to `lr`, then cosine decay to `end_lr_ratio*lr`.

    The value at step s is the learning rate of update s (0-based), as in HF Trainer's
    `get_cosine_schedule_with_warmup`."""
    total_steps = max(int(total_steps), 1)
    warmup = warmup_steps(optim.warmup_ratio, total_steps)
    if optim.schedule == "constant":
        return (
            optax.join_schedules(
                [optax.linear_schedule(0.0, optim.lr, max(warmup, 1)), optax.constant_schedule(optim.lr)], [warmup]
            )
            if warmup
            else optax.constant_schedule(optim.lr)
        )
    if optim.schedule != "cosine":
        raise ValueError(f"optim.schedule={optim.schedule!r}: use 'cosine' or 'constant'")
    return optax.warmup_cosine_decay_schedule(
        0.0,
        optim.lr,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=optim.lr * optim.end_lr_ratio,
    )


def make(optim, params: Any, mask: Any, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimizer for one stage. `mask`: True for trainable leaves (see trainable)."""
    lr = schedule(optim, total_steps)
    inner = [optax.clip_by_global_norm(optim.clip_norm)] if optim.clip_norm else []
    inner.append(
        optax.adamw(
            lr,
            b1=optim.b1,
            b2=optim.b2,
            eps=optim.eps,
            weight_decay=optim.weight_decay,
            mask=trainable.decay_mask(params, mask),
        )
    )
    tx = optax.multi_transform(
        {"trainable": optax.chain(*inner), "frozen": optax.set_to_zero()}, trainable.labels(mask)
    )
    return tx, lr
