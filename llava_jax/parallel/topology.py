"""TPU topologies without TPU hardware: device descriptions from libtpu's compiler, for AOT checks.

`devices("v5p:2x2x2", slices=2)` returns compile-only devices (16 chips in two slices) to build a mesh
from; `jax.jit(...).lower(...).compile()` on that mesh runs the real TPU compiler on this host and
returns a TPU executable with its memory and cost analysis. Needs libtpu (`pip install -e
.[tpu-compile]`) and nothing else: no TPU, no network. `prepare_environment()` must run before jax is
imported, so jax stays on the CPU and libtpu never queries a cloud metadata server.

Names are `<chip>:<AxB[xC]>` in chips, as in Cloud TPU topologies: v4 and v5p are 3-D (`v5p:2x2x2`
= 8 chips), v5e and v6e 2-D (`v5e:4x4` = 16 chips). One device per chip (v4/v5p as megacore).

NVIDIA GPUs the same way: `h100:8` / `a100:8` (GPUs of one host) compile with the GPU compiler of
jax's CUDA plugin (`pip install -e .[gpu-compile]`: the plugin without the CUDA libraries), given a
device description (`gpu_target_config`) instead of a GPU.
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
    """One TPU generation or NVIDIA GPU: memory per chip and the peak dense bf16 matmul rate (Cloud
    TPU documentation, NVIDIA data sheets)."""

    name: str
    hbm_gib: float
    bf16_tflops: float
    dims: int  # topology dimensions: 3 (torus), 2, or 1 (GPUs of one host)
    chip_config: str  # libtpu chip configuration (one device per chip); '' for GPUs
    platform: str = "tpu"
    gpu: dict | None = None  # GPUs: the compiler's device description (GpuDeviceInfoProto fields)


def _gpu(cc, sms, fpus, smem_core, smem_optin, l2_mib, bandwidth_gbs, clock_ghz, memory_gib) -> dict:
    return {
        "cuda_compute_capability": cc,
        "core_count": sms,
        "fpus_per_core": fpus,
        "shared_memory_per_core": smem_core * 1024,
        "shared_memory_per_block_optin": smem_optin * 1024,
        "l2_cache_size": l2_mib * 1024**2,
        "memory_bandwidth": bandwidth_gbs * 10**9,
        "clock_rate_ghz": clock_ghz,
        "device_memory_size": memory_gib * 1024**3,
    }


CHIPS = {
    "v4": Chip("TPU v4", 32, 275, 3, "megacore"),
    "v5e": Chip("TPU v5e", 16, 197, 2, "default"),
    "v5p": Chip("TPU v5p", 95, 459, 3, "megacore"),
    "v6e": Chip("TPU v6e", 32, 918, 2, "default"),
    # NVIDIA data sheets (SXM, 80 GB): compute capability, SMs, FP32 lanes per SM, shared memory per SM
    # and per block (KiB), L2 (MiB), memory bandwidth (GB/s), boost clock (GHz), memory (GiB).
    "a100": Chip("NVIDIA A100 80GB", 80, 312, 1, "", "gpu", _gpu((8, 0), 108, 64, 164, 163, 40, 2039, 1.41, 80)),
    "h100": Chip("NVIDIA H100 80GB", 80, 989, 1, "", "gpu", _gpu((9, 0), 132, 128, 228, 227, 50, 3352, 1.98, 80)),
}

_NAME = re.compile(r"^([a-z]\d+[a-z]*):(\d+(?:x\d+){0,2})$")


def parse(name: str) -> tuple[Chip, tuple[int, ...]]:
    """'v5p:2x2x2' -> (CHIPS['v5p'], (2, 2, 2)), 'h100:8' -> (CHIPS['h100'], (8,)); a clear error for
    anything else."""
    m = _NAME.match(name.strip())
    if not m or m.group(1) not in CHIPS:
        raise ValueError(
            f"topology {name!r}: expected <chip>:<AxBxC> (TPU) or <gpu>:<N> (N GPUs of one host) with chip one "
            f"of {sorted(CHIPS)}, e.g. v5p:2x2x2, v4:2x2x1, v5e:4x4, v6e:2x4, h100:8"
        )
    chip = CHIPS[m.group(1)]
    shape = tuple(int(d) for d in m.group(2).split("x"))
    if len(shape) != chip.dims:
        raise ValueError(f"topology {name!r}: {m.group(1)} topologies have {chip.dims} dimension(s)")
    return chip, shape


def gpu_target_config(chip: Chip) -> str:
    """The GPU compiler's target description (GpuTargetConfigProto, text format) for `chip`."""
    info = dict(chip.gpu)
    major, minor = info.pop("cuda_compute_capability")
    fixed = {
        "threads_per_block_limit": 1024,
        "threads_per_warp": 32,
        "shared_memory_per_block": 48 * 1024,
        "threads_per_core_limit": 2048,
        "registers_per_core_limit": 65536,
        "registers_per_block_limit": 65536,
        "block_dim_limit_x": 2**31 - 1,
        "block_dim_limit_y": 65535,
        "block_dim_limit_z": 65535,
    }
    fields = "\n".join(f"  {k}: {v}" for k, v in {**fixed, **info}.items())
    return (
        f"gpu_device_info {{\n  cuda_compute_capability {{ major: {major} minor: {minor} }}\n{fields}\n}}\n"
        'platform_name: "CUDA"\n'
        "dnn_version_info { major: 9 minor: 1 patch: 0 }\n"
        f'device_description_str: "{chip.name}"\n'
    )


def num_chips(name: str, slices: int = 1) -> int:
    return math.prod(parse(name)[1]) * slices


def prepare_environment(name: str = "") -> None:
    """Keep jax on the CPU, stop libtpu from querying a cloud metadata server and from locking out other
    processes (call before jax's import). For a GPU topology `name`: GEMMs as cuBLAS calls, since XLA's
    Triton GEMM tiling is chosen by autotuning on a device, which a compile-only target does not have."""
    if name and parse(name)[0].platform == "gpu":
        flag = "--xla_gpu_enable_triton_gemm=false"
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
    os.environ["JAX_PLATFORMS"] = "cpu"
    # The CUDA plugin checks the CUDA runtime's version when it loads unless the platforms exclude CUDA,
    # and jax may already be imported (by the config file) before this runs; a compile-only target
    # needs no CUDA runtime.
    os.environ["JAX_SKIP_CUDA_CONSTRAINTS_CHECK"] = "1"
    os.environ["TPU_SKIP_MDS_QUERY"] = "1"
    # Compile-only use touches no TPU, so several processes may load libtpu at once (it otherwise
    # takes /tmp/libtpu_lockfile and refuses a second process).
    os.environ["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"


def available(platform: str = "tpu") -> bool:
    """Whether the compiler for `platform` is installed: libtpu, or jax's CUDA plugin for GPUs."""
    return importlib.util.find_spec("libtpu" if platform == "tpu" else "jax_cuda12_plugin") is not None


def devices(name: str, slices: int = 1) -> list:
    """Compile-only devices of `slices` slices of topology `name` (slice-major order)."""
    chip, shape = parse(name)
    if slices < 1:
        raise ValueError(f"slices={slices}: need at least 1")
    if not available(chip.platform):
        extra, what = ("tpu-compile", "libtpu") if chip.platform == "tpu" else ("gpu-compile", "jax's CUDA plugin")
        raise RuntimeError(
            f"compiling for {chip.name} needs {what}, which is not installed: pip install -e '.[{extra}]' "
            "(best in its own virtual environment; CPU runs do not need it)"
        )
    from jax.experimental import topologies

    if chip.platform == "gpu":
        if slices > 1:
            raise ValueError(f"topology {name!r}: GPU targets compile for one host (--slices 1)")
        # No GPU needed: the CUDA plugin's compiler takes the target description instead of a device.
        desc = topologies.get_topology_desc(
            platform="cuda",
            topology_name=name.strip(),
            target_config=gpu_target_config(chip),
            topology=f"1x1x{shape[0]}",
        )
    else:
        kwargs = {"num_slices": slices} if slices > 1 else {}
        desc = topologies.get_topology_desc(
            platform="tpu", topology_name=name.strip(), chip_config_name=chip.chip_config, **kwargs
        )
    devs = list(desc.devices)
    want = num_chips(name, slices)
    if len(devs) != want:
        raise RuntimeError(
            f"topology {name!r} x {slices} slices: the compiler gave {len(devs)} devices, expected {want}"
        )
    return devs
