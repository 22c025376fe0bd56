"""The platform a traced computation is compiled for."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def platform() -> str:
    """'cpu', 'gpu' or 'tpu': the devices of the mesh set with `jax.set_mesh` (also inside `jit`, and
    for compile-only devices, e.g. a TPU topology on a CPU host), else jax's default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    name = getattr(device, "platform", None) or jax.default_backend()
    return "gpu" if name in ("cuda", "rocm") else name


# XLA:CPU hands matrix products to YNNPACK fusions by default; at LLaMA widths these ran 1.4x slower
# than XLA's own (Eigen) dot emitter in the train step, the [B*T, D] x [D, 32064] vocabulary product up
# to 6x (profiled with jax.profiler at width 512 x 4 layers, sequence 512, batch 4, fp32; README,
# Benchmarks). Same results, other kernels; no effect on other platforms.
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


def cpu_compiler_options(platform_name: str) -> dict[str, str] | None:
    """XLA options for compiling a program for `platform_name` ('cpu', 'gpu', 'tpu'): the CPU ones
    above, or None (the defaults) on other platforms and on a CPU whose XLA does not know them."""
    if platform_name != "cpu" or not _cpu_accepts_options():
        return None
    return dict(CPU_COMPILER_OPTIONS)


@functools.cache
def _cpu_accepts_options() -> bool:
    try:
        jax.jit(jnp.sin, compiler_options=CPU_COMPILER_OPTIONS).lower(jnp.zeros((), jnp.float32)).compile()
    except Exception:  # an XLA without YNNPACK rejects the unknown option name
        return False
    return True
