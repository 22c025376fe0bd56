"""AdamW with warmup + cosine, gradient clipping, and frozen partitions as optax masks.

`optax.multi_transform` routes trainable leaves to clip+AdamW and frozen leaves to `set_to_zero`,
which keeps no state: frozen parameters get no Adam moments and no weight decay. The train step then
applies updates to trainable leaves only, so frozen leaves stay bit-identical.

With `optim.mm_projector_lr > 0` (the original's `--mm_projector_lr`, used by its LoRA recipe) the
projector gets an AdamW of its own with that peak learning rate and the same schedule shape; the
gradient is then clipped once over all trainable leaves before the split, as HF Trainer does.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import optax

from llava_jax.training import trainable


def warmup_steps(ratio: float, total_steps: int) -> int:
    """Warmup length as HF Trainer counts it (`TrainingArguments.get_warmup_steps`): rounded up."""
    return math.ceil(total_steps * ratio)


def schedule(optim, total_steps: int, peak: float | None = None) -> optax.Schedule:
    """Linear warmup over `warmup_ratio` of the steps to `lr`, then cosine decay to `end_lr_ratio*lr`.

    The value at step s is the learning rate of update s (0-based), as in HF Trainer's
    `get_cosine_schedule_with_warmup`. `peak`: a learning rate other than `optim.lr` (same shape)."""
    total_steps = max(int(total_steps), 1)
    lr_peak = optim.lr if peak is None else peak
    warmup = warmup_steps(optim.warmup_ratio, total_steps)
    if optim.schedule == "constant":
        return (
            optax.join_schedules(
                [optax.linear_schedule(0.0, lr_peak, max(warmup, 1)), optax.constant_schedule(lr_peak)], [warmup]
            )
            if warmup
            else optax.constant_schedule(lr_peak)
        )
    if optim.schedule != "cosine":
        raise ValueError(f"optim.schedule={optim.schedule!r}: use 'cosine' or 'constant'")
    return optax.warmup_cosine_decay_schedule(
        0.0,
        lr_peak,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=lr_peak * optim.end_lr_ratio,
    )


def _adamw(optim, lr, decay_mask) -> optax.GradientTransformation:
    return optax.adamw(lr, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay, mask=decay_mask)


def make(optim, params: Any, mask: Any, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimizer for one stage. `mask`: True for trainable leaves (see trainable)."""
    lr = schedule(optim, total_steps)
    decay = trainable.decay_mask(params, mask)
    clip = [optax.clip_by_global_norm(optim.clip_norm)] if optim.clip_norm else []
    projector_peak = optim.get("mm_projector_lr", 0.0)
    if projector_peak < 0:
        raise ValueError(f"optim.mm_projector_lr={projector_peak}: use 0 (same as lr) or a learning rate")
    labels = trainable.labels(mask, separate=("projector",) if projector_peak else ())
    if not projector_peak or "projector" not in jax.tree.leaves(labels):
        tx = optax.multi_transform(
            {"trainable": optax.chain(*clip, _adamw(optim, lr, decay)), "frozen": optax.set_to_zero()},
            trainable.labels(mask),
        )
        return tx, lr
    projector_lr = schedule(optim, total_steps, peak=projector_peak)
    transforms = {
        "trainable": _adamw(optim, lr, decay),
        "projector": _adamw(optim, projector_lr, decay),
        "frozen": optax.set_to_zero(),
    }
    return optax.chain(*clip, optax.multi_transform(transforms, labels)), lr
