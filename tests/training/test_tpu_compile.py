"""Compiling for TPU topologies without a TPU (libtpu's compiler), and the will-it-fit search.

The TPU compiles run `python -m llava_jax.train --aot --topology ...` in a subprocess with the
interpreter named by LLAVA_JAX_TPU_PYTHON (set by .ci/run to a virtual environment with the
`tpu-compile` extra), so the CPU tests never load libtpu. Without it they are skipped, except under CI.
"""

import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import jax
import pytest

from llava_jax.parallel import topology
from llava_jax.parallel.mesh import make_mesh
from llava_jax.training import aot
from llava_jax.training.stage_setup import model_config
from llava_jax.training.state import ModelSpec


def test_topology_names():
    chip, shape = topology.parse("v5p:2x2x2")
    assert chip.hbm_gib == 95 and shape == (2, 2, 2)
    assert topology.num_chips("v5e:4x4", slices=2) == 32
    assert topology.parse("v6e:2x4")[0].hbm_gib == 32
    for bad in ["v5p", "v5p:2x2", "v5e:2x2x2", "v9:2x2", "v5p-8"]:
        with pytest.raises(ValueError, match=re.escape(repr(bad))):
            topology.parse(bad)


REPO = pathlib.Path(__file__).resolve().parents[2]


def _demo_config(**stage2):
    spec = importlib.util.spec_from_file_location("demo_config", REPO / "configs" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config().copy_and_resolve_references()
    c.stages = "stage2"
    c.stage2.update(**stage2)
    return c


def test_candidates_cheapest_first():
    c = _demo_config(batch_size=32, micro_batches=1)
    c.remat, c.frozen_dtype, c.mesh.ici = "dots", "float32", (2, 4, 1)
    got = [(s.frozen_dtype, s.ici, s.micro_batches, s.remat) for s in aot.candidates(c, "stage2", 8)]
    free = ("bfloat16", (1, 8, 1))
    want = [(*free, mb, r) for r in ("dots", "qkv_mlp", "qkv_proj", "full") for mb in (1, 2, 4)]
    assert got == want
    # The setting already in force (-1 resolved) is not tried again.
    c.frozen_dtype, c.mesh.ici = "bfloat16", (1, -1, 1)
    assert ("bfloat16", (1, 8, 1), 1, "dots") not in [
        (s.frozen_dtype, s.ici, s.micro_batches, s.remat) for s in aot.candidates(c, "stage2", 8)
    ]


def test_hbm_budget():
    v5e = topology.CHIPS["v5e"]
    assert aot.budget(v5e, None) is v5e
    assert aot.budget(v5e, 14.5).hbm_gib == 14.5 and aot.budget(v5e, 14.5).bf16_tflops == v5e.bf16_tflops
    assert aot.budget(None, 80).hbm_gib == 80
    for bad in (0, -3.0):
        with pytest.raises(ValueError, match=f"--hbm_gib={bad}"):
            aot.budget(v5e, bad)


@pytest.mark.slow
def test_hbm_budget_gives_the_cpu_estimate_a_verdict(capsys):
    """--hbm_gib with the devices jax has (here 8 CPU devices): a verdict against that budget."""
    c = _demo_config()
    c.stages = "stage1"
    rows = aot.report(c, fit_tries=0, hbm_gib=1e-3)
    out = capsys.readouterr().out
    assert rows[0]["fits"] is False and rows[0]["hbm_GiB"] == 1e-3
    assert "cpu device (--hbm_gib), 0.001 GiB HBM per chip" in out, out
    assert re.search(r"does not fit, by [\d.]+ GiB \(0.001 GiB HBM\)", out), out


@pytest.mark.slow
def test_fit_search_finds_a_setting_under_the_budget(capsys):
    """On 8 CPU devices with a made-up HBM budget below the default's peak: the search returns a
    setting whose own compiled peak is within the budget, and every setting tried before it is not."""
    c = _demo_config(batch_size=32, micro_batches=1)
    c.remat = "none"
    devices = jax.devices()[:8]
    mesh = make_mesh(c.mesh.ici, c.mesh.dcn, devices=devices)
    start = aot.compile_stage(c, "stage2", ModelSpec.create(model_config(c)), mesh)
    fixed = start["params_GiB"] + start["opt_state_GiB"]
    budget = fixed + 0.75 * (aot.peak_of(start) - fixed)
    chip = topology.Chip("test chip", budget, 1.0, 2, "default")
    row = aot.fit(c, "stage2", chip, devices, slices=1, tries=12)
    out = capsys.readouterr().out
    assert row is not None, out
    assert aot.peak_of(row) <= budget
    tried = [float(p) for p in re.findall(r"peak ([\d.]+) GiB", out)]
    assert tried and all(p > budget for p in tried[:-1])
    assert "cheapest setting that fits" in out


@pytest.mark.slow
def test_packed_stage_compiles_with_the_pipelines_images_per_row():
    """A packed stage's rows carry several images: the AOT batch has as many as the pipeline puts in a row."""
    from llava_jax.data.pipeline import _batch_spec
    from llava_jax.data.settings import DataSettings

    c = _demo_config(batch_size=8)
    c.stage2.data.packing = True
    spec = ModelSpec.create(model_config(c))
    row = aot.compile_stage(c, "stage2", spec, make_mesh((1, 1, 1), devices=jax.devices()[:1]))
    cfg = spec.cfg
    pipeline = _batch_spec(DataSettings.from_mapping(c.stage2.data), 8, cfg.vision.image_size, cfg.num_image_tokens)
    assert row["images_per_row"] == pipeline.max_images_per_row > 1


def _tpu_python() -> str:
    exe = os.environ.get("LLAVA_JAX_TPU_PYTHON")
    if exe:
        return exe
    if importlib.util.find_spec("libtpu") is not None:
        return sys.executable
    if os.environ.get("CI"):
        pytest.fail("LLAVA_JAX_TPU_PYTHON is not set: .ci/run installs the tpu-compile extra and sets it")
    pytest.skip("no libtpu: pip install -e '.[tpu-compile]' in a venv and set LLAVA_JAX_TPU_PYTHON")


def _aot(repo_root, *args, timeout=3000) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    cmd = [_tpu_python(), "-m", "llava_jax.train", "--config", "configs/demo.py", "--aot", *args]
    res = subprocess.run(cmd, cwd=repo_root, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout


@pytest.mark.slow
def test_tiny_compiles_for_tpu(repo_root):
    """Both demo stages (tiny preset) compile with the TPU compiler for a v5e:2x2 slice and fit."""
    out = _aot(repo_root, "--topology", "v5e:2x2")
    assert "TPU v5e, 16 GiB HBM per chip" in out and "(4 devices)" in out
    assert len(re.findall(r"peak [\d.]+ GiB: fits", out)) == 2, out
    flops = [float(f) for f in re.findall(r"compiled cost analysis ([\d.e+]+)", out)]
    assert len(flops) == 2 and all(f > 0 for f in flops), out


@pytest.mark.slow
def test_tiny_compiles_for_two_slices(repo_root):
    """Multi-slice: two v5e:2x2 slices, data parallel over DCN."""
    out = _aot(repo_root, "--topology", "v5e:2x2", "--slices", "2", "--config.stages=stage1")
    assert "data=2 x fsdp=4 x tensor=1 (8 devices)" in out, out
    assert re.search(r"peak [\d.]+ GiB: fits", out), out


# Forward and backward of `attend` for a v5e:2x2 mesh (rows over fsdp, heads over tensor), packed
# segment ids, attention='auto': the choice must be splash and the executable must hold its kernels.
_SPLASH_PROGRAM = """
import re
from llava_jax.parallel import topology
topology.prepare_environment()
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from llava_jax.models import attention
from llava_jax.parallel.mesh import make_mesh

mesh = make_mesh((1, 2, 2), devices=topology.devices("v5e:2x2"))
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
print("kernels", sorted(set(re.findall(r"splash_mha_[a-z_]+", compiled.as_text()))))
"""


@pytest.mark.slow
def test_splash_attention_compiles_for_tpu(repo_root):
    """Splash attention with segment ids, in shard_map, forward and backward, compiles for v5e:2x2."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["PYTHONPATH"] = str(repo_root)
    res = subprocess.run(
        [_tpu_python(), "-c", _SPLASH_PROGRAM], cwd=repo_root, env=env, capture_output=True, text=True, timeout=1800
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "choice splash" in res.stdout, res.stdout
    kernels = res.stdout.split("kernels", 1)[1]
    for part in ("fwd_segmented", "dq_segmented", "dkv_segmented"):
        assert f"splash_mha_{part}" in kernels, res.stdout


@pytest.mark.slow
def test_hbm_budget_override_for_tpu(repo_root):
    """--hbm_gib replaces the chip's HBM in the verdict: the tiny stage 1 (peak about 0.14 GiB per chip)
    does not fit 0.05 GiB."""
    out = _aot(repo_root, "--topology", "v5e:2x2", "--config.stages=stage1", "--hbm_gib", "0.05", "--fit_tries", "0")
    assert "TPU v5e (--hbm_gib), 0.05 GiB HBM per chip" in out, out
    assert re.search(r"does not fit, by [\d.]+ GiB \(0.05 GiB HBM\)", out), out
