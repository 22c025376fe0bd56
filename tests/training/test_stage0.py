"""Stage 0 (`objective="clip_lm"`): the vision tower and LLM learn from captions (InfoNCE + caption LM),
the projector stays as initialised; the run's next stage starts from the towers stage 0 trained."""

import json
import os
import pathlib
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from train_fixtures import IMAGE_TOKEN, P, build, random_batch

from llava_jax.training.contrastive import caption_prefix_ids, info_nce, last_target_index


def _log_softmax(x, axis):
    x = x - x.max(axis=axis, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


def test_info_nce_matches_a_numpy_reference():
    rng = np.random.default_rng(0)
    img, txt = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
    a = img / np.linalg.norm(img, axis=1, keepdims=True)
    b = txt / np.linalg.norm(txt, axis=1, keepdims=True)
    logits = (a @ b.T) / 0.07
    want = -(np.trace(_log_softmax(logits, 1)) + np.trace(_log_softmax(logits, 0))) / (2 * 6)
    np.testing.assert_allclose(float(info_nce(img, txt)), want, rtol=1e-5)


def test_last_target_index():
    labels = np.full((3, 7), -100)
    labels[0, 2:5] = 1
    labels[1, 6] = 1
    np.testing.assert_array_equal(np.asarray(last_target_index(labels)), [4, 6, 0])


def test_caption_prefix_fills_the_image_slots_with_the_rows_caption():
    """Each image slot holds one of its row's caption tokens, every caption token is there, nothing
    else changes; a row without targets holds token 0 in its slots."""
    image = 99
    ids = np.array([[1] + [image] * 12 + [5, 6, 7, 2], [1] + [image] * 12 + [8, 8, 3, 3], [1] + [image] * 12 + [4] * 4])
    labels = np.full_like(ids, -100)
    labels[0, 13:] = ids[0, 13:]
    labels[1, 15:] = ids[1, 15:]  # targets 3, 3; the 8s are prompt
    got = np.asarray(caption_prefix_ids(ids, labels, ids == image))
    slots = ids == image
    np.testing.assert_array_equal(got[~slots], ids[~slots])
    assert set(got[0, slots[0]]) == {5, 6, 7, 2}
    assert set(got[1, slots[1]]) == {3}
    assert set(got[2, slots[2]]) == {0}


def test_stage0_step_learns_and_leaves_the_projector_alone():
    """12 steps on one batch of (image, caption) rows: both losses fall, the loss is their sum, the
    tower and LLM move, the projector (not trained in stage 0) stays bit-identical."""
    setup = build(trainable="vision,llm", objective="clip_lm", lr=3e-3, total_steps=100)
    batch = random_batch(8, seed=0)
    batch["input_ids"][1::2, 1 : 1 + P] = IMAGE_TOKEN  # every row has its image, as stage-0 rows do
    before = jax.device_get(setup.state.params)
    state, rows = setup.state, []
    with jax.set_mesh(setup.mesh):
        for _ in range(12):
            state, m = setup.step(state, setup.put(batch))
            rows.append(jax.device_get(m))
    first, last = rows[0], rows[-1]
    np.testing.assert_allclose(first["loss"], first["lm_loss"] + first["clip_loss"], rtol=1e-5)
    assert last["lm_loss"] < 0.8 * first["lm_loss"], (first, last)
    assert last["clip_loss"] < 0.8 * first["clip_loss"], (first, last)
    after = jax.device_get(state.params)
    for a, b in zip(
        jax.tree.leaves(before["multi_modal_projector"]), jax.tree.leaves(after["multi_modal_projector"]), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    for part in ("vision_tower", "language_model"):
        assert any(
            not np.array_equal(a, b)
            for a, b in zip(jax.tree.leaves(before[part]), jax.tree.leaves(after[part]), strict=True)
        ), part


ROOT = pathlib.Path(__file__).resolve().parents[2]
PREEMPTED = pathlib.Path(__file__).with_name("preempted_train.py")
ARGS = [
    "--config.stages=stage0,stage1",
    "--config.synthetic.num_pretrain=64",
    "--config.synthetic.num_instruct=8",
    "--config.synthetic.num_eval=4",
    "--config.stage0.num_steps=4",
    "--config.stage0.batch_size=8",
    "--config.stage0.checkpoint_every=2",
    "--config.stage1.num_steps=1",
    "--config.stage1.batch_size=8",
    "--config.stage1.optim.lr=0.0",
    "--config.stage0.targets_per_row=0",  # one step variant per stage: half the compilations
    "--config.stage1.targets_per_row=0",
    "--config.stage0.data.max_length=96",
    "--config.stage1.data.max_length=96",
    "--config.log_every=1",
    "--config.eval.json_path=",
]


def _train(workdir, kill_after_step=0):
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
        [*command, f"--workdir={workdir}", *ARGS], env=env, capture_output=True, text=True, timeout=1800
    )


def _losses(workdir) -> dict[int, float]:
    rows = [json.loads(line) for line in (workdir / "stage0" / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


@pytest.mark.slow
def test_stage0_resumes_and_stage1_starts_from_its_towers(tmp_path):
    """stage0 killed after step 2 resumes to the same losses; stage 1 (lr 0, so its final weights are
    its initial ones) holds stage 0's trained tower and LLM and the untouched initial projector."""
    from llava_jax.inference import load_model

    whole = _train(tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = _train(tmp_path / "killed", kill_after_step=2)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = _train(tmp_path / "killed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "stage0: resuming from step 2" in resumed.stderr
    a, b = _losses(tmp_path / "whole"), _losses(tmp_path / "killed")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert [a[s] for s in a] == [b[s] for s in a]
    assert a[4] < a[1]

    s0 = jax.device_get(nnx.state(load_model(tmp_path / "whole" / "stage0").model, nnx.Param).to_pure_dict())
    s1 = jax.device_get(nnx.state(load_model(tmp_path / "whole" / "stage1").model, nnx.Param).to_pure_dict())
    for x, y in zip(jax.tree.leaves(s0), jax.tree.leaves(s1), strict=True):
        np.testing.assert_array_equal(x, y)  # stage 1 = stage 0's tower + LLM, and the same initial projector
