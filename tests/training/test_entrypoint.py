"""The entry point refuses bad configs at start (naming the key) and stops on a non-finite loss."""

import os
import subprocess
import sys

import pytest

from llava_jax.training.config_schema import base_config


def _train(*args, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "llava_jax.train", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "XLA_FLAGS": ""},
    )


def test_unknown_key_is_named():
    r = _train("--config.stage1.optim.lrr=0.1", "--workdir=/nonexistent/never")
    assert r.returncode != 0 and "lrr" in r.stderr


def test_wrong_type_is_named():
    r = _train("--config.stage1.batch_size=many", "--workdir=/nonexistent/never")
    assert r.returncode != 0 and "batch_size" in r.stderr


def test_schema_is_locked_in_python_too():
    c = base_config()
    with pytest.raises(AttributeError, match="optimm"):
        c.stage2.optimm = 1
    with pytest.raises(TypeError):
        c.stage2.epochs = "three"


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    r = _train(
        f"--workdir={tmp_path}",
        "--config.stages=stage1",
        "--config.stage1.optim.lr=1e38",
        "--config.stage1.optim.warmup_ratio=0.0",
        "--config.stage1.optim.clip_norm=0.0",
        "--config.synthetic.num_pretrain=64",
        "--config.synthetic.num_instruct=8",
        "--config.synthetic.num_eval=4",
        "--config.stage1.batch_size=8",
        "--config.stage1.num_steps=6",
        "--config.stage1.checkpoint_every=1",
        "--config.log_every=1",
        "--config.eval.json_path=",
    )
    assert r.returncode != 0
    assert "NonFiniteLoss" in r.stderr and "last good checkpoint is step 1" in r.stderr, r.stderr[-2000:]
    steps = sorted(int(p.name) for p in (tmp_path / "stage1" / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [1]
    assert not (tmp_path / "stage1" / "DONE").exists()
