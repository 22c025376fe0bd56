"""TPU topologies without TPU hardware: device descriptions from libtpu's compiler, for AOT checks.

`devices("v5p:2x2x2", slices=2)` returns compile-only devices (16 chips in two slices) to build a mesh
from; `jax.jit(...).lower(...).compile()` on that mesh runs the real TPU compiler on this host and
returns a TPU executable with its memory and cost analysis. Needs libtpu (`pip install -e
.[tpu-compile]`) and nothing else: no TPU, no network. `prepare_environment()` must run before jax is
imported, so jax stays on the CPU and libtpu never queries a cloud metadata server.

Names are `<chip>:<AxB[xC]>` in chips, as in Cloud TPU topologies: v4 and v5p are 3-D (`v5p:2x2x2`
= 8 chips), v5e and v6e 2-D (`v5e:4x4` = 16 chips). One device per chip (v4/v5p as megacore).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re

GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation: HBM per chip and the peak bf16 matmul rate (Cloud TPU documentation)."""

    name: str
    hbm_gib: float
    bf16_tflops: float
    dims: int  # topology dimensions: 3 (torus) or 2
    chip_config: str  # libtpu chip configuration: one device per chip


CHIPS = {
    "v4": Chip("TPU v4", 32, 275, 3, "megacore"),
    "v5e": Chip("TPU v5e", 16, 197, 2, "default"),
    "v5p": Chip("TPU v5p", 95, 459, 3, "megacore"),
    "v6e": Chip("TPU v6e", 32, 918, 2, "default"),
}

_NAME = re.compile(r"^(v\d+[a-z]*):(\d+(?:x\d+){1,2})$")


def parse(name: str) -> tuple[Chip, tuple[int, ...]]:
    """'v5p:2x2x2' -> (CHIPS['v5p'], (2, 2, 2)); a clear error for anything else."""
    m = _NAME.match(name.strip())
    if not m or m.group(1) not in CHIPS:
        raise ValueError(
            f"TPU topology {name!r}: expected <chip>:<AxBxC> with chip one of {sorted(CHIPS)}, "
            "e.g. v5p:2x2x2, v4:2x2x1, v5e:4x4, v6e:2x4"
        )
    chip = CHIPS[m.group(1)]
    shape = tuple(int(d) for d in m.group(2).split("x"))
    if len(shape) != chip.dims:
        raise ValueError(f"TPU topology {name!r}: {m.group(1)} topologies have {chip.dims} dimensions")
    return chip, shape


def num_chips(name: str, slices: int = 1) -> int:
    return math.prod(parse(name)[1]) * slices


def prepare_environment() -> None:
    """Keep jax on the CPU, stop libtpu from querying a cloud metadata server and from locking out other
    processes (call before jax's import)."""
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["TPU_SKIP_MDS_QUERY"] = "1"
    # Compile-only use touches no TPU, so several processes may load libtpu at once (it otherwise
    # takes /tmp/libtpu_lockfile and refuses a second process).
    os.environ["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"


def available() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def devices(name: str, slices: int = 1) -> list:
    """Compile-only devices of `slices` slices of topology `name` (slice-major order)."""
    chip, _ = parse(name)
    if slices < 1:
        raise ValueError(f"slices={slices}: need at least 1")
    if not available():
        raise RuntimeError(
            "compiling for TPU needs libtpu, which is not installed: pip install -e '.[tpu-compile]' "
            "(best in its own virtual environment; CPU runs do not need it)"
        )
    from jax.experimental import topologies

    kwargs = {"num_slices": slices} if slices > 1 else {}
    desc = topologies.get_topology_desc(
        platform="tpu", topology_name=name.strip(), chip_config_name=chip.chip_config, **kwargs
    )
    devs = list(desc.devices)
    want = num_chips(name, slices)
    if len(devs) != want:
        raise RuntimeError(f"TPU topology {name!r} x {slices} slices: libtpu gave {len(devs)} devices, expected {want}")
    return devs
