"""Layer stacks: N identical blocks stored with a leading `layers` axis and run with `jax.lax.scan`.

Scanning keeps compile time flat in depth. The body sees one block at a time as a regular NNX module
(`nnx.merge` of that layer's slice), so block code reads like an unrolled model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from llava_jax.models.remat import remat


def stacked(make: Callable[[nnx.Rngs], nnx.Module], num: int, rngs: nnx.Rngs) -> nnx.Module:
    """Create `num` blocks with every parameter stacked on a new leading axis named 'layers'."""

    @nnx.split_rngs(splits=num)
    @nnx.vmap(in_axes=0, out_axes=0)
    def create(r: nnx.Rngs) -> nnx.Module:
        return make(r)

    module = create(rngs)
    for _, var in nnx.iter_graph(module):
        if isinstance(var, nnx.Variable):
            axes = var.get_metadata().get("axes")
            if axes is not None:
                var.set_metadata(axes=("layers", *axes))
    return module


def scan(
    blocks: nnx.Module,
    body: Callable[[nnx.Module, Any, Any], tuple[Any, Any]],
    carry: Any,
    xs: Any = None,
    *,
    num: int | None = None,
    policy: str = "none",
) -> tuple[Any, Any]:
    """Run `body(block, carry, x) -> (carry, y)` over the first `num` (default all) stacked blocks.

    `xs` (optional) is a pytree of per-layer inputs with a leading layer axis (e.g. KV-cache slices);
    returns the final carry and the stacked per-layer outputs `ys`.
    """
    graphdef, state = nnx.split(blocks)
    if num is not None:
        state = jax.tree.map(lambda a: a[:num], state)

    def step(c, inputs):
        layer_state, x = inputs
        return body(nnx.merge(graphdef, layer_state), c, x)

    return jax.lax.scan(remat(step, policy), carry, (state, xs))
