"""The platform a traced computation is compiled for."""

from __future__ import annotations

import jax


def platform() -> str:
    """'cpu', 'gpu' or 'tpu': the devices of the mesh set with `jax.set_mesh` (also inside `jit`, and
    for compile-only devices, e.g. a TPU topology on a CPU host), else jax's default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    name = getattr(device, "platform", None) or jax.default_backend()
    return "gpu" if name in ("cuda", "rocm") else name
