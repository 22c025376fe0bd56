"""Multi-host: 2 processes x 2 CPU devices (gloo, 127.0.0.1) == 1 process x 4 devices."""

import json
import os
import pathlib
import subprocess

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
WORKER = REPO / "tests" / "training" / "multihost_worker.py"
LAUNCH = REPO / "launch" / "local_multiprocess.sh"


def _run(nproc: int, ndev: int, log_dir: pathlib.Path, lora: bool = False) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["LOG_DIR"] = str(log_dir)
    env["LORA"] = "1" if lora else "0"
    proc = subprocess.run(
        ["bash", str(LAUNCH), str(nproc), str(ndev), "python", str(WORKER)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    logs = "".join((log_dir / f"process_{i}.log").read_text() for i in range(nproc))
    assert proc.returncode == 0, logs[-4000:]
    return [json.loads(line.split("LOSSES ", 1)[1]) for line in logs.splitlines() if line.startswith("LOSSES ")]


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora_int8"])
def test_two_processes_match_one(tmp_path, lora):
    multi = _run(2, 2, tmp_path / "multi", lora)
    single = _run(1, 4, tmp_path / "single", lora)
    assert sorted(r["process"] for r in multi) == [0, 1]
    assert all(r["of"] == 2 and r["devices"] == 4 for r in multi)
    assert single[0]["devices"] == 4
    np.testing.assert_allclose(multi[0]["losses"], single[0]["losses"], rtol=2e-5)
    np.testing.assert_allclose(multi[1]["losses"], single[0]["losses"], rtol=2e-5)
    assert multi[0]["dcn_owners"] == [[0, 0], [1, 1]]  # each data-axis slice is one process


@pytest.mark.slow
def test_full_job_under_the_launcher(tmp_path):
    """The real entry point, both stages, 2 processes x 2 devices: per-process data shards, multi-process
    checkpoints, evaluation. targets_per_row=2 forces the agreed fall-back to full logits."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["LOG_DIR"] = str(tmp_path / "logs")
    work = tmp_path / "run"
    args = [
        "--config.stages=stage1,stage2",
        "--config.synthetic.num_pretrain=64",
        "--config.synthetic.num_instruct=64",
        "--config.synthetic.num_eval=8",
        "--config.stage1.num_steps=2",
        "--config.stage2.num_steps=2",
        "--config.stage1.batch_size=8",
        "--config.stage2.batch_size=8",
        "--config.stage2.targets_per_row=2",
        "--config.eval.max_examples=8",
    ]
    proc = subprocess.run(
        ["bash", str(LAUNCH), "2", "2", "python", "-m", "llava_jax.train", f"--workdir={work}", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO,
    )
    logs = "".join((tmp_path / "logs" / f"process_{i}.log").read_text() for i in range(2))
    assert proc.returncode == 0, logs[-4000:]
    assert "use full logits" in logs
    summary = json.loads((work / "summary.json").read_text())
    assert summary["stage2"]["steps"] == 2 and summary["eval"]["n"] == 8
    assert (work / "stage2" / "checkpoints" / "2").exists() and (work / "stage2" / "final_params").exists()


@pytest.mark.parametrize("process", [0, 1])
def test_every_process_meets_at_the_synthetic_data_barrier(tmp_path, monkeypatch, process):
    """Data written by a fast process 0 before another process looks must not let that one skip the barrier
    (it did: process 1 went on to the checkpoint barrier while process 0 waited at this one)."""
    from jax.experimental import multihost_utils
    from ml_collections import ConfigDict

    from llava_jax import experiment

    out = tmp_path / "synthetic"
    out.mkdir()
    (out / "meta.json").write_text("{}")  # already there when this process looks
    barriers, generated = [], []
    monkeypatch.setattr(experiment.jax, "process_index", lambda: process)
    monkeypatch.setattr(experiment.jax, "process_count", lambda: 2)
    monkeypatch.setattr(multihost_utils, "sync_global_devices", barriers.append)
    monkeypatch.setattr(experiment, "generate", lambda *a, **k: generated.append(a))
    experiment.prepare_synthetic(ConfigDict({"synthetic": {"enabled": True, "out": str(out)}}))
    assert barriers == ["synthetic data"] and generated == []
