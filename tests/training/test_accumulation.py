"""Gradient accumulation: 4 micro-batches of B give the same update as one batch of 4B."""

import jax
import numpy as np
from train_fixtures import build, random_batch, run_steps

# Adam divides each gradient by its own running RMS, so where a gradient is ~0 (rarely used embedding
# rows) summation-order rounding can flip that element's update by up to lr. With eps=1 the update is
# ~lr * g, linear in the gradient, so comparing parameters compares the accumulated gradients.
LINEAR_ADAM = dict(eps=1.0, lr=1.0)
PARAM_ATOL = 1e-6


def test_four_micro_batches_equal_one_big_batch():
    batches = [random_batch(8, seed=10 + i) for i in range(2)]
    big = build((1, 1, 1), **LINEAR_ADAM)
    acc = build((1, 1, 1), micro_batches=4, **LINEAR_ADAM)
    with jax.set_mesh(big.mesh):
        s1, m1 = big.step(big.state, big.put(batches[0]))
        s4, m4 = acc.step(acc.state, acc.put(batches[0]))
    np.testing.assert_allclose(float(m4["grad_norm"]), float(m1["grad_norm"]), rtol=1e-5)
    np.testing.assert_allclose(float(m4["target_tokens"]), float(m1["target_tokens"]))
    big_losses, big_state = run_steps(big, batches)
    acc_losses, acc_state = run_steps(acc, batches)
    np.testing.assert_allclose(acc_losses, big_losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(acc_state.params), jax.tree.leaves(big_state.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=PARAM_ATOL)


def test_accumulation_on_a_sharded_mesh():
    batches = [random_batch(8, seed=20)]
    ref, _ = run_steps(build((1, 1, 1)), batches)
    got, _ = run_steps(build((2, 2, 1), jax.devices()[:4], micro_batches=2), batches)
    np.testing.assert_allclose(got, ref, rtol=2e-5)


def test_gathered_targets_equal_full_logits():
    """targets_per_row > 0 computes logits at target positions only: same loss and update."""
    batches = [random_batch(8, seed=30 + i) for i in range(2)]
    ref, ref_state = run_steps(build((1, 1, 1), **LINEAR_ADAM), batches)
    got, got_state = run_steps(build((1, 1, 1), targets_per_row=12, **LINEAR_ADAM), batches)
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(got_state.params), jax.tree.leaves(ref_state.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=PARAM_ATOL)
