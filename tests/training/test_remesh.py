"""Save on 8 devices, restore onto a 2-device mesh, continue: same result as continuing on 8."""

import jax
import numpy as np
from train_fixtures import build, random_batch, run_steps

from llava_jax.checkpoint.params import abstract_with_shardings
from llava_jax.training.state import abstract_state
from llava_jax.training.train_checkpoint import Checkpointer


def test_restore_on_a_different_mesh(tmp_path):
    batches = [random_batch(8, seed=40 + i) for i in range(3)]
    eight = build((2, 2, 2), jax.devices()[:8])
    _, state8 = run_steps(eight, batches[:2])
    ckpt = Checkpointer(tmp_path / "ckpt", every=1, keep=2)
    ckpt.save(2, state8, None, final=True)
    ckpt.close()

    two = build((1, 2, 1), jax.devices()[6:8])
    abstract = abstract_state(two.spec, two.mask, two.tx, jax.numpy.float32)
    restored = Checkpointer(tmp_path / "ckpt", every=1, keep=2).restore(
        2, abstract_with_shardings(abstract, two.shardings), None
    )
    q = restored.params["language_model"]["layers"]["q_proj"]["kernel"]
    assert set(q.sharding.device_set) == set(jax.devices()[6:8])
    assert int(restored.step) == 2
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state8), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    two.state = restored
    cont2, _ = run_steps(two, batches[2:])
    eight.state = state8
    cont8, _ = run_steps(eight, batches[2:])
    np.testing.assert_allclose(cont2, cont8, rtol=2e-5)
