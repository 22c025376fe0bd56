"""Device meshes with axes ('data', 'fsdp', 'tensor').

`data` replicates the model and splits the batch; `fsdp` splits the batch *and* the parameters and
optimizer state (gathered per layer when used); `tensor` splits heads / MLP / vocab dimensions.
Sizes come from config: `ici` within a slice or node (-1 = fill with the remaining devices) and
`dcn` across slices or nodes (multi-slice TPU, multi-node GPU), multiplied per axis.

All axes are `Auto`: shardings are set on jit inputs/outputs and by `with_sharding_constraint`, and
XLA's partitioner propagates them (the model code never handles explicit sharding types).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

AXES = ("data", "fsdp", "tensor")


def resolve_shape(shape: Sequence[int], num_devices: int, what: str = "mesh") -> tuple[int, ...]:
    """Replace one -1 by whatever makes the product equal num_devices; check the product."""
    shape = [int(s) for s in shape]
    if len(shape) != len(AXES):
        raise ValueError(f"{what} needs {len(AXES)} sizes for {AXES}, got {shape}")
    if shape.count(-1) > 1:
        raise ValueError(f"{what} {shape}: at most one size may be -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise ValueError(f"{what} {shape}: {num_devices} devices are not divisible by {known}")
        shape[shape.index(-1)] = num_devices // known
    if math.prod(shape) != num_devices:
        raise ValueError(
            f"{what} {dict(zip(AXES, shape, strict=True))} uses {math.prod(shape)} devices but {num_devices} are available"
        )
    return tuple(shape)


def make_mesh(ici: Sequence[int] = (1, -1, 1), dcn: Sequence[int] = (1, 1, 1), devices=None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh over `devices` (default: all devices of all processes)."""
    devices = list(jax.devices() if devices is None else devices)
    # dcn -1 = one slice/node per process (multi-node GPU: every process is a node)
    dcn = resolve_shape(dcn, jax.process_count() if -1 in dcn else math.prod(dcn), "mesh.dcn")
    num_granules = math.prod(dcn)
    if num_granules == 1:
        ici = resolve_shape(ici, len(devices), "mesh.ici")
        if devices == list(jax.devices()):
            return jax.make_mesh(ici, AXES, axis_types=(AxisType.Auto,) * len(AXES))
        grid = np.asarray(devices).reshape(ici)
        if devices[0].platform == "tpu":  # e.g. compile-only TPU devices: follow the physical torus
            from jax.experimental import mesh_utils

            # A shape the helper cannot lay out on this torus keeps the plain device order.
            with contextlib.suppress(ValueError, NotImplementedError, AssertionError):
                grid = mesh_utils.create_device_mesh(ici, devices)
        return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))
    from jax.experimental import mesh_utils

    if len(devices) % num_granules:
        raise ValueError(f"mesh.dcn {dcn}: {len(devices)} devices do not split into {num_granules} slices/nodes")
    ici = resolve_shape(ici, len(devices) // num_granules, "mesh.ici")
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=devices[0].platform != "tpu")
    return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def describe(mesh: Mesh) -> str:
    return " x ".join(f"{name}={size}" for name, size in mesh.shape.items()) + f" ({mesh.size} devices)"
