"""Stage 0's objective (`objective="clip_lm"`): pretrain the vision tower and the LLM from scratch on
the stage-1 captions, so that stage 1 aligns features to a *pretrained* frozen LLM as in the paper.

Two losses on one batch of (image, caption) rows of the `plain` template (image tokens, then the
caption as targets):

  lm    next-token cross-entropy of the caption, with the LLM reading text only. In most rows the
        image-token positions hold the embedding of token 0 (a constant prefix). With
        `caption_prefix` = f > 0, a fraction f of the rows (every round(1/f)-th) hold the row's own
        caption tokens there instead, repeated in a fixed scrambled order (a bag of the caption's
        words, as the image's patches are a bag of its parts): the LLM learns to take the caption's
        content from what stands in the image slots, which a stage-1 projector can then supply.
  clip  symmetric image-caption InfoNCE over the batch (CLIP's loss): the image side is the mean of
        the tower's LLaVA features (hidden_states[select_layer], patches), the text side the LLM's
        final hidden state at the caption's last target token (it has read the whole caption),
        mapped to the tower's width by a fixed seeded random matrix (no new parameters, so the model's
        parameter tree stays LLaVA's). Both sides are centred on their batch mean and L2-normalised;
        logits = cosine * LOGIT_SCALE.

The step's loss is lm (token mean) + clip; both are reported as metrics (`lm_loss`, `clip_loss`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from llava_jax.data.tokenizer import IGNORE_INDEX
from llava_jax.parallel.rules import constrain
from llava_jax.training.loss import gather_targets, row_loss_sums, shifted_targets

LOGIT_SCALE = 1 / 0.07  # CLIP's initial temperature, kept fixed
OBJECTIVES = ("lm", "clip_lm")


def text_to_vision(d_text: int, d_vision: int) -> jax.Array:
    """The fixed [d_text, d_vision] map from LLM width to tower width (seeded, scaled 1/sqrt(d_text))."""
    return jax.random.normal(jax.random.key(0), (d_text, d_vision), jnp.float32) / jnp.sqrt(d_text)


def info_nce(image: jax.Array, text: jax.Array) -> jax.Array:
    """image [B, D], text [B, D] (row i of each is a pair) -> symmetric InfoNCE, a scalar."""
    image = image / jnp.linalg.norm(image, axis=-1, keepdims=True).clip(1e-6)
    text = text / jnp.linalg.norm(text, axis=-1, keepdims=True).clip(1e-6)
    logits = LOGIT_SCALE * image @ text.T
    labels = jnp.arange(image.shape[0])
    i2t = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    t2i = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels)
    return (jnp.mean(i2t) + jnp.mean(t2i)) / 2


def centred(x: jax.Array) -> jax.Array:
    """[B, D] -> minus its batch mean: randomly initialised towers give nearly the same vector for every
    image (and caption), and that shared part would swamp the cosine similarities."""
    return x - jnp.mean(x, axis=0, keepdims=True)


def last_target_index(labels: jax.Array) -> jax.Array:
    """[B, L] HF-aligned labels -> [B] index of each row's last target token (0 for a row without)."""
    valid = labels != IGNORE_INDEX
    idx = jnp.arange(labels.shape[1])[None, :]
    return jnp.max(jnp.where(valid, idx, 0), axis=1)


def caption_prefix_ids(input_ids: jax.Array, labels: jax.Array, is_image: jax.Array) -> jax.Array:
    """input_ids, labels (HF-aligned), is_image: [B, L] -> [B, L] ids with the k-th image slot of each
    row holding caption token perm[k] mod n (n: the row's target tokens, perm: a fixed permutation of
    the slots); a row without targets keeps token 0 there. Other positions are unchanged."""
    valid = labels != IGNORE_INDEX
    n = jnp.sum(valid, axis=1, keepdims=True)  # [B, 1]
    caption_pos = jnp.argsort(~valid, axis=1, stable=True)  # [B, L]: target positions first, in order
    slot = jnp.cumsum(is_image, axis=1) - 1  # [B, L]: k for the k-th image token
    perm = jax.random.permutation(jax.random.key(1), input_ids.shape[1])
    k = jnp.remainder(perm[jnp.clip(slot, 0, input_ids.shape[1] - 1)], jnp.maximum(n, 1))
    caption = jnp.take_along_axis(input_ids, jnp.take_along_axis(caption_pos, k, axis=1), axis=1)
    return jnp.where(is_image, jnp.where(n > 0, caption, 0), input_ids)


def clip_lm_loss(
    graphdef, params, batch: dict, targets_per_row: int = 0, caption_prefix: float = 0.0
) -> tuple[jax.Array, tuple[jax.Array, jax.Array, dict]]:
    """(numerator, (denominator, target count, {lm_loss, clip_loss})) like `step.loss_fn`, with
    numerator / denominator = lm token mean + clip. One image per row (images [B, 1, S, S, 3]).
    caption_prefix: the fraction of rows whose image slots hold their caption's tokens (see above)."""
    model = nnx.merge(graphdef, params)
    batch = {k: constrain(v, ("batch",) + (None,) * (v.ndim - 1)) for k, v in batch.items()}
    images = batch["images"]
    if images.shape[1] != 1:
        raise ValueError(f"objective 'clip_lm' takes one image per row, got images of shape {images.shape}")
    feats = model.vision_tower(model.normalize(images[:, 0]))  # [B, P, Dv], gradients reach the tower
    image_vec = jnp.mean(feats.astype(jnp.float32), axis=1)

    input_ids = batch["input_ids"]
    if caption_prefix > 0:
        every = max(1, round(1 / caption_prefix))
        chosen = (jnp.arange(input_ids.shape[0]) % every == every - 1)[:, None]
        is_image = input_ids == model.cfg.image_token_id
        input_ids = jnp.where(chosen, caption_prefix_ids(input_ids, batch["labels"], is_image), input_ids)
    embeddings = model.embed(input_ids)  # no images: image tokens embed as token 0
    hidden, _ = model.language_model.hidden(embeddings, positions=batch["positions"], segment_ids=batch["segment_ids"])
    last = last_target_index(batch["labels"])
    text_vec = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0].astype(jnp.float32)
    text_vec = text_vec @ text_to_vision(text_vec.shape[-1], image_vec.shape[-1])
    clip = info_nce(centred(image_vec), centred(text_vec))

    targets = shifted_targets(batch["labels"])
    if 0 < targets_per_row < targets.shape[1]:
        hidden, targets = gather_targets(hidden, targets, targets_per_row)
    row_nll, row_count = row_loss_sums(model.language_model.logits(hidden), targets)
    nll, count = jnp.sum(row_nll), jnp.sum(row_count)
    denom = jnp.maximum(count, 1.0)
    parts = {"lm_loss": nll / denom, "clip_loss": clip}
    return nll + clip * denom, (count, count, parts)
