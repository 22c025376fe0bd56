"""A killed run resumes exactly: 6 uninterrupted steps == 3 steps, SIGKILL, resume for 3.

Runs the real entry point (`python -m llava_jax.train`) on a small synthetic data set, so the data
iterator position, optimizer state and step restored from the orbax checkpoint are all exercised.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys

import pytest

ARGS = [
    "--config.stages=stage1",
    "--config.synthetic.num_pretrain=96",
    "--config.synthetic.num_instruct=8",
    "--config.synthetic.num_eval=4",
    "--config.stage1.num_steps=6",
    "--config.stage1.batch_size=8",
    "--config.stage1.checkpoint_every=3",
    "--config.stage1.data.max_length=96",
    "--config.stage1.targets_per_row=0",
    "--config.log_every=1",
    "--config.eval.json_path=",
]


ROOT = pathlib.Path(__file__).resolve().parents[2]
PREEMPTED = pathlib.Path(__file__).with_name("preempted_train.py")


# The same for stage 2 with LoRA adapters (dropout on), an int8 base and the projector's own lr.
LORA_ARGS = [
    "--config.stages=stage2",
    "--config.synthetic.num_pretrain=8",
    "--config.synthetic.num_instruct=96",
    "--config.synthetic.num_eval=4",
    "--config.lora.rank=4",
    "--config.lora.alpha=8.0",
    "--config.lora.dropout=0.1",
    "--config.lora.quantized_base=int8",
    "--config.stage2.trainable=projector,lora",
    "--config.stage2.optim.mm_projector_lr=1e-4",
    "--config.stage2.num_steps=6",
    "--config.stage2.batch_size=8",
    "--config.stage2.checkpoint_every=3",
    "--config.log_every=1",
    "--config.eval.json_path=",
]


# The same on an NF4 base (packed uint8 kernels and float32 absmax in the checkpoint).
NF4_ARGS = [a.replace("quantized_base=int8", "quantized_base=nf4") for a in LORA_ARGS]


def _train(workdir, kill_after_step=0, args=ARGS):
    """The entry point; with `kill_after_step`, the same run SIGKILLed after that step's checkpoint."""
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    command = (
        [sys.executable, str(PREEMPTED), str(kill_after_step)]
        if kill_after_step
        else [sys.executable, "-m", "llava_jax.train"]
    )
    return subprocess.run(
        [*command, f"--workdir={workdir}", *args], env=env, capture_output=True, text=True, timeout=900
    )


def _losses(workdir, stage="stage1") -> dict[int, float]:
    out = {}
    for line in (workdir / stage / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        out[row["step"]] = row["loss"]  # a resumed run's rows come later and win
    return out


@pytest.mark.slow
@pytest.mark.parametrize(
    "args,stage",
    [(ARGS, "stage1"), (LORA_ARGS, "stage2"), (NF4_ARGS, "stage2")],
    ids=["full", "lora_int8", "lora_nf4"],
)
def test_killed_run_resumes_exactly(tmp_path, args, stage):
    whole = _train(tmp_path / "whole", args=args)
    assert whole.returncode == 0, whole.stderr[-3000:]

    killed = _train(tmp_path / "killed", kill_after_step=3, args=args)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (tmp_path / "killed" / stage / "DONE").exists()
    assert sorted(_losses(tmp_path / "killed", stage)) == [1, 2, 3]

    resumed = _train(tmp_path / "killed", args=args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from step 3" in resumed.stderr
    a, b = _losses(tmp_path / "whole", stage), _losses(tmp_path / "killed", stage)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    assert [a[s] for s in range(1, 7)] == [b[s] for s in range(1, 7)]  # bit-identical


@pytest.mark.slow
def test_stage2_starts_from_stage1_projector(tmp_path):
    """With stage 2's lr at 0 its final parameters are its initial ones: the projector must be stage 1's
    trained one, the vision tower and LLM the same base weights stage 1 had (frozen there)."""
    import numpy as np

    from llava_jax.inference import load_model

    args = [
        "--config.stages=stage1,stage2",
        "--config.synthetic.num_pretrain=64",
        "--config.synthetic.num_instruct=32",
        "--config.synthetic.num_eval=4",
        "--config.stage1.num_steps=3",
        "--config.stage1.batch_size=8",
        "--config.stage2.num_steps=1",
        "--config.stage2.batch_size=8",
        "--config.stage2.optim.lr=0.0",
        "--config.eval.json_path=",
    ]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    r = subprocess.run(
        [sys.executable, "-m", "llava_jax.train", f"--workdir={tmp_path}", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    s1 = load_model(tmp_path / "stage1").model
    s2 = load_model(tmp_path / "stage2").model
    k1 = np.asarray(s1.multi_modal_projector.linear_1.kernel[...])
    k2 = np.asarray(s2.multi_modal_projector.linear_1.kernel[...])
    np.testing.assert_array_equal(k1, k2)
    np.testing.assert_array_equal(
        np.asarray(s1.language_model.layers.q_proj.kernel[...]), np.asarray(s2.language_model.layers.q_proj.kernel[...])
    )
    np.testing.assert_array_equal(
        np.asarray(s1.vision_tower.layers.fc1.kernel[...]), np.asarray(s2.vision_tower.layers.fc1.kernel[...])
    )
