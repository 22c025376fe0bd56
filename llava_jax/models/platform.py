"""The platform a traced computation is compiled for."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

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


class PlatformJit:
    """`jax.jit(fun, **jit_kwargs)` compiled with the compiler options of the platform its arrays live on
    (`cpu_compiler_options`). One jitted function per platform, made on the first call there: the
    choice (which compiles a probe program once) never runs at import.

    The platform is that of the first `jax.Array` among the call's arguments (e.g. the parameters),
    else `platform()`. `_cache_size()` counts the compiled programs of all platforms."""

    def __init__(self, fun: Callable, **jit_kwargs: Any):
        self._fun = fun
        self._jit_kwargs = jit_kwargs
        self._jitted: dict[str, Any] = {}
        functools.update_wrapper(self, fun)

    def for_platform(self, platform_name: str):
        """The jitted function for `platform_name` ('cpu', 'gpu', 'tpu')."""
        jitted = self._jitted.get(platform_name)
        if jitted is None:
            options = cpu_compiler_options(platform_name)
            jitted = jax.jit(self._fun, **self._jit_kwargs, **({"compiler_options": options} if options else {}))
            self._jitted[platform_name] = jitted
        return jitted

    def __call__(self, *args, **kwargs):
        return self.for_platform(arrays_platform(args))(*args, **kwargs)

    def _cache_size(self) -> int:
        return sum(j._cache_size() for j in self._jitted.values())


def arrays_platform(args) -> str:
    """'cpu', 'gpu' or 'tpu': the platform of the first `jax.Array` in the pytree `args`, else
    `platform()`."""
    for leaf in jax.tree.leaves(args):
        if isinstance(leaf, jax.Array):
            try:
                name = next(iter(leaf.devices())).platform
            except Exception:  # a tracer (called inside a traced function) has no devices
                continue
            return "gpu" if name in ("cuda", "rocm") else name
    return platform()
