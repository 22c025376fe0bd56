"""Details of a training run: evaluation prepares images like the stage that trained the model,
a data state from another process count is refused with the fix, `checkpoint_every=0` keeps only the
final checkpoint, the console carries progress and llava_jax's own lines (library chatter goes to
train.log), the full-logits step is compiled before step 1, and a non-finite loss is caught before
any checkpoint is written."""

import json
import os
import re
import subprocess
import sys

import grain
import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from llava_jax.training.config_schema import base_config

# The original's expand2square background: tuple(int(x * 255) for x in CLIPImageProcessor.image_mean).
ORIGINAL_PAD = (122, 116, 104)


def test_evaluation_uses_the_stage_image_aspect_ratio(tmp_path, monkeypatch):
    from llava_jax import experiment as job
    from llava_jax.eval import heldout as evaluate_mod
    from llava_jax.models import Llava
    from llava_jax.training import loop

    Image.new("RGB", (64, 32), (255, 0, 0)).save(tmp_path / "wide.png")  # wide: pad adds bands top and bottom
    record = {
        "id": "q0",
        "image": "wide.png",
        "answer": "red",
        "conversations": [{"from": "human", "value": "<image>\nWhat colour?"}],
    }
    (tmp_path / "eval.json").write_text(json.dumps([record]))
    config = base_config()
    with config.unlocked():
        config.stages = "stage1,stage2"
        config.stage2.data.image_aspect_ratio = "pad"
        config.eval.json_path = str(tmp_path / "eval.json")
    seen = []

    def fake_generate(model, prompts, images, **kw):
        seen.append(np.asarray(images))
        return [[2] for _ in prompts]

    monkeypatch.setattr(evaluate_mod, "generate", fake_generate)
    shapes = nnx.state(nnx.eval_shape(lambda: Llava(loop.model_config(config), rngs=nnx.Rngs(0))))
    params = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), shapes)  # weights do not matter here
    job.evaluate(config, params, "stage2")
    image = seen[-1][0, 0]  # [S, S, 3] uint8
    np.testing.assert_array_equal(image[0, image.shape[1] // 2], ORIGINAL_PAD)
    np.testing.assert_array_equal(image[image.shape[0] // 2, image.shape[1] // 2], (255, 0, 0))
    job.evaluate(config, params, "stage1")  # stage 1 trained with `square`: a centre crop, all red
    assert (seen[-1][0, 0] == np.array([255, 0, 0], np.uint8)).all()


def test_resume_with_another_process_count_is_refused_with_the_fix(tmp_path, monkeypatch):
    from grain._src.core import sharding

    from llava_jax.training.train_checkpoint import Checkpointer

    state = {"w": jax.numpy.arange(4.0)}
    it = iter(grain.MapDataset.range(100).to_iter_dataset())
    next(it)
    ckpt = Checkpointer(tmp_path, every=1, keep=2)
    monkeypatch.setattr(sharding, "get_process_index_and_count", lambda: (1, 2))  # as process 1 of 2 writes it
    ckpt.save(3, state, it)
    ckpt.wait()
    monkeypatch.undo()
    assert (tmp_path / "3" / "data" / "process_1-of-2.json").exists()
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
    with pytest.raises(ValueError, match=r"written by 2 processes.*Resume this stage with 2 processes"):
        ckpt.restore(3, abstract, iter(grain.MapDataset.range(100).to_iter_dataset()))
    ckpt.close()


def _train(workdir, *args, timeout=1200):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "llava_jax.train",
            f"--workdir={workdir}",
            "--config.stages=stage1",
            "--config.synthetic.num_pretrain=64",
            "--config.synthetic.num_instruct=8",
            "--config.synthetic.num_eval=4",
            "--config.stage1.batch_size=8",
            "--config.stage1.data.max_length=96",
            "--config.eval.json_path=",
            *args,
        ],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _checkpoints(workdir) -> list[int]:
    d = workdir / "stage1" / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


LIBRARY_LINE = re.compile(r"^[IWE]\d{4} \d\d:\d\d:\d\d")  # absl's format, used by orbax, grain, jax


@pytest.mark.slow
def test_checkpoint_every_zero_clean_console_and_full_logits_step_up_front(tmp_path):
    r = _train(
        tmp_path,
        "--config.stage1.num_steps=3",
        "--config.stage1.checkpoint_every=0",
        "--config.log_every=1",
        "--config.stage1.targets_per_row=90",
        "--config.stage1.eager_fallback=True",  # the default (the demo config turns it off)
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert _checkpoints(tmp_path) == [3]  # only the final one
    console = (r.stdout + r.stderr).splitlines()
    assert not [line for line in console if LIBRARY_LINE.match(line) or "orbax" in line.lower()]
    log_file = (tmp_path / "train.log").read_text()
    assert "orbax" in log_file.lower() or "checkpoint_manager" in log_file
    text = "\n".join(console)
    # no row has more than 90 targets here, yet the full-logits step was compiled before step 1
    assert "compiled the full-logits fallback step" in text
    assert text.index("compiled the full-logits fallback step") < text.index("stage1: done")
    assert "more than targets_per_row" not in text


@pytest.mark.slow
@pytest.mark.parametrize("cap", [90, 2])
def test_full_logits_step_on_demand_without_eager_fallback(tmp_path, cap):
    r = _train(
        tmp_path,
        "--config.stage1.num_steps=2",
        "--config.stage1.checkpoint_every=0",
        f"--config.stage1.targets_per_row={cap}",
        "--config.stage1.eager_fallback=False",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    text = r.stdout + r.stderr
    assert "compiled the train step" in text
    if cap == 90:  # no caption row has 90 targets: the fallback is never needed, never compiled
        assert "compiled the full-logits fallback step" not in text
        assert "more than targets_per_row" not in text
    else:  # every caption row has more than 2 targets: compiled when the first batch needs it
        assert text.index("more than targets_per_row") < text.index("compiled the full-logits fallback step")
        assert text.index("compiled the full-logits fallback step") < text.index("stage1: done")


@pytest.mark.slow
def test_non_finite_loss_is_caught_before_the_first_checkpoint(tmp_path):
    r = _train(
        tmp_path,
        "--config.stage1.optim.lr=1e38",
        "--config.stage1.optim.warmup_ratio=0.0",
        "--config.stage1.optim.clip_norm=0.0",
        "--config.stage1.num_steps=6",
        "--config.stage1.checkpoint_every=4",
        "--config.log_every=100",
    )
    assert r.returncode != 0
    assert "NonFiniteLoss" in r.stderr and "No checkpoint of this stage was written" in r.stderr, r.stderr[-2000:]
    assert _checkpoints(tmp_path) == []
    assert not (tmp_path / "stage1" / "DONE").exists()


@pytest.mark.slow
def test_aot_report_includes_the_full_logits_step():
    from llava_jax.training import aot

    config = base_config()
    with config.unlocked():
        config.stages = "stage2"
        config.stage2.batch_size = 8
        config.stage2.data.max_length = 256
        config.stage2.targets_per_row = 8
    (row,) = aot.report(config)
    assert row["full_logits_peak_GiB"] > 0 and row["peak_GiB"] > 0
    assert row["full_logits_temps_GiB"] > row["temps_GiB"]  # logits at 256 positions, not 8
