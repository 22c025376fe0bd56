"""LLaVA: CLIP vision tower (frozen, under stop_gradient) -> projector -> LLaMA decoder.

Batch layout (static shapes): `input_ids` [B, L] hold `num_image_tokens` copies of `image_token_id`
per image (llava-hf style); `images` [B, M, S, S, 3] hold up to M images per row, uint8 (normalised
here with the CLIP mean/std) or float (already normalised). The k-th image token of a row, counted
left to right, receives the k-th feature vector of that row's images, so a row may hold no image
(text-only, its image slots are ignored) or several (packed samples).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from llava_jax.models.clip import ClipVisionTower
from llava_jax.models.config import LlavaConfig
from llava_jax.models.llama import KVCache, Llama
from llava_jax.models.projector import Projector


def merge_image_features(text_embeds: jax.Array, features: jax.Array, is_image: jax.Array) -> jax.Array:
    """Write features into the image-token positions.

    text_embeds [B, L, D]; features [B, F, D] (all image tokens of a row, in order); is_image [B, L].
    The k-th True of a row takes features[b, k]; positions beyond F (malformed rows) are clamped.
    """
    index = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, features.shape[1] - 1)
    gathered = jnp.take_along_axis(features, index[..., None], axis=1)
    return jnp.where(is_image[..., None], gathered.astype(text_embeds.dtype), text_embeds)


class Llava(nnx.Module):
    def __init__(self, cfg: LlavaConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.vision_tower = ClipVisionTower(cfg.vision, rngs=rngs)
        self.multi_modal_projector = Projector(
            cfg.projector,
            cfg.vision.hidden_size,
            cfg.llm.hidden_size,
            dtype=cfg.llm.dtype,
            param_dtype=cfg.llm.param_dtype,
            rngs=rngs,
        )
        self.language_model = Llama(cfg.llm, rngs=rngs)

    def normalize(self, images: jax.Array) -> jax.Array:
        """uint8 pixels -> CLIP-normalised float; float input is taken as already normalised."""
        if images.dtype != jnp.uint8:
            return images
        v = self.cfg.vision
        mean = jnp.asarray(v.image_mean, jnp.float32)
        std = jnp.asarray(v.image_std, jnp.float32)
        return (images.astype(jnp.float32) / 255.0 - mean) / std

    def encode_images(self, images: jax.Array) -> jax.Array:
        """[B, M, S, S, 3] -> projected features [B, M * num_image_tokens, D]. No gradient reaches
        the vision tower; the projector is trained."""
        b, m = images.shape[:2]
        pixels = self.normalize(images.reshape(b * m, *images.shape[2:]))
        feats = jax.lax.stop_gradient(self.vision_tower(pixels))
        feats = self.multi_modal_projector(feats.astype(self.cfg.llm.dtype))
        return feats.reshape(b, m * feats.shape[1], feats.shape[2])

    def embed(self, input_ids: jax.Array, images: jax.Array | None = None) -> jax.Array:
        """Token embeddings [B, L, D] with image features written at image-token positions."""
        is_image = input_ids == self.cfg.image_token_id
        text = self.language_model.embed(jnp.where(is_image, 0, input_ids))
        if images is None:
            return text
        if images.ndim == 4:  # one image per row: [B, S, S, 3]
            images = images[:, None]
        return merge_image_features(text, self.encode_images(images), is_image)

    def __call__(
        self,
        input_ids: jax.Array,
        images: jax.Array | None = None,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        cache: KVCache | None = None,
        dropout_key: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """input_ids [B, L], images [B, M, S, S, 3] or None -> (logits [B, L, V] float32, cache).
        dropout_key: PRNG key for the LoRA dropout (training); None: no dropout."""
        return self.language_model(
            embeddings=self.embed(input_ids, images),
            positions=positions,
            segment_ids=segment_ids,
            cache=cache,
            dropout_key=dropout_key,
        )
