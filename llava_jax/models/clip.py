"""CLIP ViT vision tower, as LLaVA uses it (transformers `CLIPVisionModel` semantics).

pixels [B, S, S, 3] (normalised, NHWC) -> patch conv (no bias) -> prepend CLS -> + learned position
embeddings [S/p * S/p + 1, D] -> pre_layrnorm -> pre-LN blocks (quick-GELU MLP) -> hidden state of
`select_layer`, with CLS dropped (`patch`) or kept (`cls_patch`): [B, P(+1), D].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from llava_jax.models import attention
from llava_jax.models.config import VisionConfig
from llava_jax.models.norms import LayerNorm
from llava_jax.models.stacking import scan, stacked
from llava_jax.parallel.rules import constrain


def _dense(cfg: VisionConfig, din: int, dout: int, axes: tuple[str, str], rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(
        din,
        dout,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        rngs=rngs,
        kernel_init=nnx.initializers.normal(0.02),
        kernel_metadata={"axes": axes},
        bias_metadata={"axes": (axes[1],)},
    )


def quick_gelu(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(1.702 * x)


class ClipBlock(nnx.Module):
    """Pre-LN encoder block: x + attn(ln1(x)); x + mlp(ln2(x)). [B, N, D] -> [B, N, D]."""

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.cfg = cfg
        self.layer_norm1 = LayerNorm(d, eps=cfg.layer_norm_eps, param_dtype=cfg.param_dtype)
        self.q_proj = _dense(cfg, d, d, ("embed", "heads"), rngs)
        self.k_proj = _dense(cfg, d, d, ("embed", "heads"), rngs)
        self.v_proj = _dense(cfg, d, d, ("embed", "heads"), rngs)
        self.out_proj = _dense(cfg, d, d, ("heads", "embed"), rngs)
        self.layer_norm2 = LayerNorm(d, eps=cfg.layer_norm_eps, param_dtype=cfg.param_dtype)
        self.fc1 = _dense(cfg, d, f, ("embed", "mlp"), rngs)
        self.fc2 = _dense(cfg, f, d, ("mlp", "embed"), rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, d = x.shape
        nh, hd = self.cfg.num_heads, self.cfg.head_dim
        h = self.layer_norm1(x)
        q = self.q_proj(h).reshape(b, n, nh, hd)
        k = self.k_proj(h).reshape(b, n, nh, hd)
        v = self.v_proj(h).reshape(b, n, nh, hd)
        a = attention.attend(q, k, v, None, implementation=self.cfg.attention, causal=False)
        x = x + self.out_proj(a.reshape(b, n, d))
        return x + self.fc2(quick_gelu(self.fc1(self.layer_norm2(x))))


class ClipVisionTower(nnx.Module):
    """CLIP vision transformer. Parameter names follow transformers' `vision_model.*` keys."""

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, p = cfg.hidden_size, cfg.patch_size
        self.patch_embedding = nnx.Conv(
            3,
            d,
            kernel_size=(p, p),
            strides=(p, p),
            padding="VALID",
            use_bias=False,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            rngs=rngs,
            kernel_init=nnx.initializers.normal(0.02),
            kernel_metadata={"axes": (None, None, None, "embed")},
        )
        self.class_embedding = nnx.Param(
            nnx.initializers.normal(0.02)(rngs.params(), (d,), cfg.param_dtype), axes=("embed",)
        )
        self.position_embedding = nnx.Param(
            nnx.initializers.normal(0.02)(rngs.params(), (cfg.num_positions, d), cfg.param_dtype),
            axes=(None, "embed"),
        )
        self.pre_layrnorm = LayerNorm(d, eps=cfg.layer_norm_eps, param_dtype=cfg.param_dtype)
        self.layers = stacked(lambda r: ClipBlock(cfg, rngs=r), cfg.num_layers, rngs)
        # Unused by LLaVA (it reads an intermediate layer); kept so checkpoints round-trip.
        self.post_layernorm = LayerNorm(d, eps=cfg.layer_norm_eps, param_dtype=cfg.param_dtype)

    def embed(self, pixels: jax.Array) -> jax.Array:
        """[B, S, S, 3] -> pre-layernormed embeddings [B, P + 1, D] (hidden_states[0])."""
        cfg = self.cfg
        if pixels.shape[1:] != (cfg.image_size, cfg.image_size, 3):
            raise ValueError(
                f"vision tower expects [B, {cfg.image_size}, {cfg.image_size}, 3] pixels, got {pixels.shape}"
            )
        x = self.patch_embedding(pixels.astype(cfg.dtype))
        b = x.shape[0]
        x = x.reshape(b, -1, cfg.hidden_size)
        cls = jnp.broadcast_to(self.class_embedding[...].astype(x.dtype), (b, 1, cfg.hidden_size))
        x = jnp.concatenate([cls, x], axis=1) + self.position_embedding[...].astype(x.dtype)
        return self.pre_layrnorm(x)

    def hidden_states(self, pixels: jax.Array, num_layers: int | None = None) -> list[jax.Array]:
        """All hidden states up to block `num_layers` (default all): list of num_layers + 1 [B, P+1, D]."""

        def body(blk, c, _):
            y = blk(c)
            return y, y

        x = self.embed(pixels)
        _, ys = scan(self.layers, body, x, num=num_layers)
        return [x] + list(ys)

    def __call__(self, pixels: jax.Array) -> jax.Array:
        """LLaVA features: hidden_states[select_layer] with `select_feature` applied. [B, P(+1), D]."""
        cfg = self.cfg
        x = self.embed(pixels)

        def body(blk, c, _):
            return constrain(blk(c), ("batch", "length", "act_embed")), None

        x, _ = scan(self.layers, body, x, num=cfg.layers_needed(), policy=cfg.remat)
        return x[:, 1:] if cfg.select_feature == "patch" else x
