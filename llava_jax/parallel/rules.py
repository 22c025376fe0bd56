"""One table of logical-axis rules: logical dimension name -> mesh axes.

Parameters carry logical names in their metadata (`axes=('embed', 'mlp')`, plus a leading `layers`
for scanned stacks); activations are constrained with names too (`batch`, `length`, `act_embed`).
`spec()` turns names into a `PartitionSpec` for a concrete shape, replicating a dimension whose size
the mesh axes do not divide (logged once) and never using a mesh axis twice in one spec.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

Rules = Sequence[tuple[str, Any]]

LOGICAL_RULES: Rules = (
    # activations
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_vocab", "tensor"),
    # parameters
    ("embed", "fsdp"),
    ("vision_embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("norm", None),
    ("lora_rank", None),  # LoRA adapters' rank dimension (small): never split
)

_warned: set = set()


def _mesh_axes(name: str | None, rules: Rules) -> tuple[str, ...]:
    if name is None:
        return ()
    for logical, mesh_axes in rules:
        if logical == name:
            if mesh_axes is None:
                return ()
            return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
    raise KeyError(f"logical axis {name!r} has no rule; add it to LOGICAL_RULES")


def spec(
    axes: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh, rules: Rules = LOGICAL_RULES
) -> PartitionSpec:
    """PartitionSpec for an array of `shape` whose dimensions have logical names `axes`."""
    if axes is None:
        return PartitionSpec()
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {tuple(axes)} do not match shape {tuple(shape)}")
    used: set[str] = set()
    out = []
    for name, size in zip(axes, shape, strict=True):
        mesh_axes = tuple(a for a in _mesh_axes(name, rules) if a not in used and mesh.shape.get(a, 1) > 1)
        n = math.prod(mesh.shape[a] for a in mesh_axes)
        if mesh_axes and size % n:
            key = (name, size, mesh_axes)
            if key not in _warned:
                _warned.add(key)
                log.info("dimension %s of size %d is not divisible by mesh axes %s: replicated", name, size, mesh_axes)
            mesh_axes = ()
        used.update(mesh_axes)
        out.append(mesh_axes[0] if len(mesh_axes) == 1 else (mesh_axes or None))
    return PartitionSpec(*out)


def named(axes, shape, mesh: Mesh, rules: Rules = LOGICAL_RULES) -> NamedSharding:
    return NamedSharding(mesh, spec(axes, shape, mesh, rules))


def batch_axes(rules: Rules = LOGICAL_RULES) -> tuple[str, ...]:
    """The mesh axes that split the rows of a batch: the `batch` rule."""
    return _mesh_axes("batch", rules)


def batch_shards(mesh: Mesh, rules: Rules = LOGICAL_RULES) -> int:
    """Into how many parts the `batch` rule splits the rows on this mesh."""
    return math.prod(mesh.shape[a] for a in batch_axes(rules))


def batch_sharding(mesh: Mesh, rules: Rules = LOGICAL_RULES) -> NamedSharding:
    """Sharding of an input batch (rows split by the `batch` rule, other dimensions whole); the
    global batch size must be a multiple of `batch_shards(mesh)`."""
    return NamedSharding(mesh, PartitionSpec(batch_axes(rules) or None))


def constrain(x: jax.Array, axes: Sequence[str | None], rules: Rules = LOGICAL_RULES) -> jax.Array:
    """with_sharding_constraint by logical names under the mesh set with `jax.set_mesh`; a no-op
    without one (single-device use, tests of the bare model)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, spec(axes, x.shape, mesh, rules))
