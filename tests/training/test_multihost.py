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


def _run(nproc: int, ndev: int, log_dir: pathlib.Path) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["LOG_DIR"] = str(log_dir)
    proc = subprocess.run(["bash", str(LAUNCH), str(nproc), str(ndev), "python", str(WORKER)],
                          env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    logs = "".join((log_dir / f"process_{i}.log").read_text() for i in range(nproc))
    assert proc.returncode == 0, logs[-4000:]
    return [json.loads(line.split("LOSSES ", 1)[1]) for line in logs.splitlines() if line.startswith("LOSSES ")]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    multi = _run(2, 2, tmp_path / "multi")
    single = _run(1, 4, tmp_path / "single")
    assert sorted(r["process"] for r in multi) == [0, 1]
    assert all(r["of"] == 2 and r["devices"] == 4 for r in multi)
    assert single[0]["devices"] == 4
    np.testing.assert_allclose(multi[0]["losses"], single[0]["losses"], rtol=2e-5)
    np.testing.assert_allclose(multi[1]["losses"], single[0]["losses"], rtol=2e-5)
