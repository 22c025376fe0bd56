"""Compiling for NVIDIA GPUs without a GPU: the GPU compiler of jax's CUDA plugin, given a device
description (`topology.gpu_target_config`) instead of a device.

The compiles run in a subprocess with the interpreter named by LLAVA_JAX_GPU_PYTHON (set by .ci/run to
a virtual environment with the `gpu-compile` extra), so the CPU tests never load the plugin. Without
it they are skipped, except under CI.
"""

import importlib.util
import os
import re
import subprocess
import sys

import pytest

from llava_jax.parallel import topology


def test_gpu_topology_names():
    chip, shape = topology.parse("h100:8")
    assert chip.platform == "gpu" and chip.hbm_gib == 80 and shape == (8,)
    assert topology.parse("a100:4")[0].name == "NVIDIA A100 80GB"
    for bad in ["h100", "h100:2x4", "b300:8"]:
        with pytest.raises(ValueError, match=re.escape(repr(bad))):
            topology.parse(bad)
    text = topology.gpu_target_config(topology.CHIPS["h100"])
    assert "cuda_compute_capability { major: 9 minor: 0 }" in text and "core_count: 132" in text


def _gpu_python() -> str:
    exe = os.environ.get("LLAVA_JAX_GPU_PYTHON")
    if exe:
        return exe
    if importlib.util.find_spec("jax_cuda12_plugin") is not None:
        return sys.executable
    if os.environ.get("CI"):
        pytest.fail("LLAVA_JAX_GPU_PYTHON is not set: .ci/run installs the gpu-compile extra and sets it")
    pytest.skip("no CUDA plugin: pip install -e '.[gpu-compile]' in a venv and set LLAVA_JAX_GPU_PYTHON")


def _run(repo_root, args, timeout=3000):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["PYTHONPATH"] = str(repo_root)
    res = subprocess.run(
        [_gpu_python(), *args], cwd=repo_root, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout


@pytest.mark.slow
def test_tiny_compiles_for_gpu(repo_root):
    """Both demo stages (tiny preset) compile with the GPU compiler for four A100s and fit."""
    out = _run(repo_root, ["-m", "llava_jax.train", "--config", "configs/demo.py", "--aot", "--topology", "a100:4"])
    assert "NVIDIA A100 80GB, 80 GiB HBM per chip" in out and "(4 devices)" in out, out
    assert len(re.findall(r"peak [\d.]+ GiB: fits", out)) == 2, out


# Forward and backward of `attend` for four H100s (rows over fsdp, heads over tensor), packed segment
# ids, attention='auto' in bf16: the choice must be the Pallas GPU kernel, and it must compile.
_FLASH_PROGRAM = """
from llava_jax.parallel import topology
topology.prepare_environment("h100:4")
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from llava_jax.models import attention
from llava_jax.parallel.mesh import make_mesh

mesh = make_mesh((1, 2, 2), devices=topology.devices("h100:4"))
rows = NamedSharding(mesh, P(("data", "fsdp")))
q = jax.ShapeDtypeStruct((4, 512, 4, 128), jnp.bfloat16, sharding=rows)
kv = jax.ShapeDtypeStruct((4, 512, 2, 128), jnp.bfloat16, sharding=rows)
seg = jax.ShapeDtypeStruct((4, 512), jnp.int32, sharding=rows)

def loss(q, k, v, seg):
    out = attention.attend(q, k, v, attention.Segments(seg), implementation="auto", causal=True)
    return jnp.sum(out.astype(jnp.float32))

with jax.set_mesh(mesh):
    print("choice", attention.choose("auto", q, kv, masked=True))
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv, seg).compile()
print("compiled", compiled.memory_analysis() is not None)
"""


@pytest.mark.slow
def test_flash_gpu_attention_compiles_for_gpu(repo_root):
    """The Pallas GPU kernel with segment ids, in shard_map, forward and backward, compiles for H100."""
    out = _run(repo_root, ["-c", _FLASH_PROGRAM])
    assert "choice flash_gpu" in out and "compiled True" in out, out
