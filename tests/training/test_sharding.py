"""Sharded equals unsharded: the same steps on 1 device and on 8 fake devices give the same losses."""

import jax
import numpy as np
import pytest
from train_fixtures import build, random_batch, run_steps

BATCHES = [random_batch(8, seed=i) for i in range(3)]


@pytest.fixture(scope="module")
def single_device_losses():
    return run_steps(build((1, 1, 1)), BATCHES)[0]


@pytest.mark.parametrize("mesh", [(2, 2, 2), (1, 8, 1)])
def test_losses_match_single_device(mesh, single_device_losses):
    got, _ = run_steps(build(mesh, jax.devices()[:8]), BATCHES)
    np.testing.assert_allclose(got, single_device_losses, rtol=2e-5, atol=2e-5)


def test_parameters_are_actually_sharded():
    s = build((2, 2, 2), jax.devices()[:8])
    q = s.state.params["language_model"]["layers"]["q_proj"]["kernel"]  # [layers, embed, heads]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert q.addressable_shards[0].data.shape == (2, 32, 32)
    # Adam moments follow their parameter's layout
    moments = [
        x
        for p, x in jax.tree_util.tree_leaves_with_path(s.state.opt_state)
        if "['q_proj']['kernel']" in jax.tree_util.keystr(p)
    ]
    assert len(moments) == 2 and all(x.sharding.spec == q.sharding.spec for x in moments)
