"""Vision-to-language projector: `linear` (paper) or `mlp2x_gelu` (v1.5, exact-erf GELU).

features [B, N, Dv] -> [B, N, D]. Parameter names follow llava-hf (`linear_1`, `linear_2`).
"""

import jax
import jax.numpy as jnp
from flax import nnx


class Projector(nnx.Module):
    def __init__(self, kind: str, din: int, dout: int, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        if kind not in ("linear", "mlp2x_gelu"):
            raise ValueError(f"projector {kind!r}: use 'linear' or 'mlp2x_gelu'")
        self.kind = kind

        def dense(i, o, axes):
            return nnx.Linear(
                i,
                o,
                dtype=dtype,
                param_dtype=param_dtype,
                rngs=rngs,
                kernel_metadata={"axes": axes},
                bias_metadata={"axes": (axes[1],)},
            )

        self.linear_1 = dense(din, dout, ("vision_embed", "embed"))
        self.linear_2 = dense(dout, dout, ("mlp", "embed")) if kind == "mlp2x_gelu" else None

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.linear_1(x)
        if self.linear_2 is not None:
            x = self.linear_2(jax.nn.gelu(x, approximate=False))
        return x
