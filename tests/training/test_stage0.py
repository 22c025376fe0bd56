"""Stage 0 (`objective="clip_lm"`): the vision tower and LLM learn from captions (InfoNCE + caption LM),
the projector stays as initialised; the run's next stage starts from the towers stage 0 trained."""

import jax
import numpy as np
from train_fixtures import IMAGE_TOKEN, P, build, random_batch

from llava_jax.training.contrastive import info_nce, last_target_index


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
