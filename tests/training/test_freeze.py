"""Freezing as optax masks: frozen leaves bit-identical, and no optimizer state for them."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_fixtures import build, random_batch, run_steps

from llava_jax.parallel.tree_paths import path_str
from llava_jax.training.trainable import PARTS


def _leaves(tree):
    return {path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.parametrize("trainable,frozen_parts", [("projector", ("vision", "llm")), ("projector,llm", ("vision",))])
def test_frozen_bit_identical_and_stateless(trainable, frozen_parts):
    s = build((1, 1, 1), trainable=trainable, frozen_dtype=jnp.bfloat16, weight_decay=0.1)
    before = _leaves(s.state.params)
    _, state = run_steps(s, [random_batch(4, seed=i) for i in range(3)])
    after = _leaves(state.params)
    frozen = [k for k in before if any(re.search(PARTS[p], k) for p in frozen_parts)]
    trained = [k for k in before if k not in frozen]
    assert frozen and trained
    for k in frozen:
        assert after[k].dtype == jnp.bfloat16, k  # frozen weights stored in bf16
        assert after[k].tobytes() == before[k].tobytes(), f"frozen {k} changed"
    for k in trained:
        assert after[k].dtype == np.float32, k  # trainable keep fp32 masters
    assert sum(not np.array_equal(after[k], before[k]) for k in trained) == len(trained)

    # Optimizer state: Adam's two moments for trainable parameters only, plus scalar counters.
    n_trainable = sum(before[k].size for k in trained)
    opt = [x for x in jax.tree.leaves(state.opt_state) if hasattr(x, "size")]
    big = sum(x.size for x in opt if x.ndim > 0)
    assert big == 2 * n_trainable
    assert all(x.size == 1 for x in opt if x.ndim == 0)
    assert sum(x.nbytes for x in opt) < 2 * 4 * n_trainable + 64
