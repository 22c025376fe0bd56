"""LoRA training: adapters + projector train through the same masks; the base (bf16, int8 or nf4) stays
bit-identical and has no optimizer state; the projector's own learning rate; sharding, remat,
accumulation and dropout behave as for full training."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_fixtures import SMALL, build, random_batch, run_steps

from llava_jax.parallel.tree_paths import path_str
from llava_jax.training.trainable import PARTS


def lora_cfg(quantized_base="none", dropout=0.1, remat="none"):
    cfg = SMALL.with_lora(lora_rank=4, lora_alpha=8.0, lora_dropout=dropout, quantized_base=quantized_base)
    return cfg.with_runtime(remat=remat)


def _leaves(tree):
    return {path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.parametrize(
    "quantized_base",
    [pytest.param("none", marks=pytest.mark.slow), "int8", pytest.param("nf4", marks=pytest.mark.slow)],
)
def test_base_bit_identical_and_stateless(quantized_base):
    s = build(
        trainable="projector,lora",
        cfg=lora_cfg(quantized_base),
        frozen_dtype=jnp.bfloat16,
        weight_decay=0.1,
        mm_projector_lr=1e-3,
    )
    before = _leaves(s.state.params)
    _, state = run_steps(s, [random_batch(4, seed=i) for i in range(3)])
    after = _leaves(state.params)
    trained = [k for k in before if re.search(PARTS["lora"], k) or re.search(PARTS["projector"], k)]
    frozen = [k for k in before if k not in trained]
    assert any("lora_b" in k for k in trained) and any("multi_modal_projector" in k for k in trained)
    assert len([k for k in trained if "lora_" in k]) == 14  # 7 linears x (a, b), stacked over layers
    for k in frozen:
        assert after[k].tobytes() == before[k].tobytes(), f"frozen {k} changed"
        if k == "language_model/layers/q_proj/kernel":
            assert after[k].dtype == {"int8": np.int8, "nf4": np.uint8}.get(quantized_base, jnp.bfloat16), k
        if k.endswith(("kernel_scale", "kernel_absmax")):
            assert after[k].dtype == np.float32
    aux = {"int8": "kernel_scale", "nf4": "kernel_absmax"}.get(quantized_base)
    assert quantized_base == "none" or sum(k.endswith(aux) for k in frozen) == 7
    for k in trained:
        assert after[k].dtype == np.float32, k
        assert not np.array_equal(after[k], before[k]), f"trainable {k} did not move"
    n_trainable = sum(before[k].size for k in trained)
    opt = [x for x in jax.tree.leaves(state.opt_state) if hasattr(x, "size")]
    assert sum(x.size for x in opt if x.ndim > 0) == 2 * n_trainable  # Adam's moments, trainable only
    n_weights = sum(a.size * (2 if a.dtype == np.uint8 else 1) for a in before.values())  # nf4: 2 per byte
    assert n_trainable < 0.1 * n_weights


@pytest.mark.slow
def test_projector_has_its_own_learning_rate():
    """Adam's first update moves each element by ~its lr (|m/sqrt(v)| = 1): the projector by
    mm_projector_lr, the adapters by lr; without mm_projector_lr both by lr."""
    lr, plr = 1e-2, 1e-4

    def moved(**kw):
        s = build(trainable="projector,lora", cfg=lora_cfg(dropout=0.0), clip_norm=0.0, lr=lr, **kw)
        before = _leaves(s.state.params)
        _, state = run_steps(s, [random_batch(4, seed=0)])
        after = _leaves(state.params)

        def biggest(pattern):
            return max(np.abs(after[k] - before[k]).max() for k in before if re.search(pattern, k))

        return biggest(PARTS["projector"]), biggest(r"/lora_b$")

    proj, adapters = moved(mm_projector_lr=plr)
    assert 0.9 * plr < proj <= plr * 1.001, proj
    assert 0.9 * lr < adapters <= lr * 1.001, adapters
    proj, _ = moved()
    assert 0.9 * lr < proj <= lr * 1.001, proj


@pytest.mark.slow
def test_sharded_remat_matches_single_device():
    """int8 base, dropout on: 8 fake devices with full remat give the 1-device losses."""
    batches = [random_batch(8, seed=40 + i) for i in range(2)]
    ref, _ = run_steps(build(trainable="projector,lora", cfg=lora_cfg("int8")), batches)
    s = build((2, 2, 2), jax.devices()[:8], trainable="projector,lora", cfg=lora_cfg("int8", remat="full"))
    assert s.state.params["language_model"]["layers"]["q_proj"]["lora_a"].sharding.spec == jax.sharding.PartitionSpec(
        None, "fsdp", None
    )
    got, _ = run_steps(s, batches)
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5)


@pytest.mark.slow
def test_accumulation_equals_one_batch():
    batches = [random_batch(8, seed=50 + i) for i in range(2)]
    kw = dict(trainable="projector,lora", cfg=lora_cfg("int8", dropout=0.0), eps=1.0, lr=1.0)
    big_losses, big = run_steps(build(**kw), batches)
    acc_losses, acc = run_steps(build(micro_batches=4, **kw), batches)
    np.testing.assert_allclose(acc_losses, big_losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(acc.params), jax.tree.leaves(big.params), strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=0, atol=1e-6)


@pytest.mark.slow
def test_dropout_only_with_a_key_and_reproducible():
    from flax import nnx

    from llava_jax.models import Llama

    cfg = lora_cfg(dropout=0.5).llm
    model = Llama(cfg, rngs=nnx.Rngs(0))
    b = model.layers.q_proj.lora_b
    b[...] = jax.random.normal(jax.random.key(1), b[...].shape) * 0.5
    tokens = jnp.arange(24).reshape(2, 12)
    plain = np.asarray(model(tokens)[0])
    k1 = np.asarray(model(tokens, dropout_key=jax.random.key(7))[0])
    assert np.array_equal(k1, np.asarray(model(tokens, dropout_key=jax.random.key(7))[0]))
    assert not np.allclose(k1, plain, atol=1e-4)
    assert not np.allclose(k1, np.asarray(model(tokens, dropout_key=jax.random.key(8))[0]), atol=1e-4)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="no 'lora' parameters.*lora.rank"):
        build(trainable="projector,lora")
    with pytest.raises(ValueError, match="lora_targets"):
        SMALL.with_lora(lora_rank=4, lora_targets="lm_head")
    with pytest.raises(ValueError, match="quantized_base"):
        SMALL.with_lora(quantized_base="int4")


@pytest.mark.parametrize("quantized_base", ["int8", "nf4"])
def test_quantized_base_cannot_train(quantized_base):
    from llava_jax.training.state import ModelSpec
    from llava_jax.training.trainable import check_trainable_dtypes, trainable_mask

    spec = ModelSpec.create(lora_cfg(quantized_base))
    with pytest.raises(ValueError, match="integer.*projector,lora"):
        check_trainable_dtypes(spec.abstract, trainable_mask(spec.abstract, "projector,llm"))


def test_stage2_lora_config_is_the_original_recipe():
    import importlib.util
    import pathlib

    from llava_jax.training.config_schema import base_config
    from llava_jax.training.stage_setup import model_config

    path = pathlib.Path(__file__).resolve().parents[2] / "configs" / "stage2_lora.py"
    spec = importlib.util.spec_from_file_location("stage2_lora", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config("llava-v1.5-7b")
    assert set(c.keys()) == set(base_config().keys())
    llm = model_config(c).llm
    assert (llm.lora_rank, llm.lora_alpha, llm.lora_dropout, llm.quantized_base) == (128, 256.0, 0.05, "none")
    assert (c.stage2.optim.lr, c.stage2.optim.mm_projector_lr, c.stage2.trainable) == (2e-4, 2e-5, "projector,lora")
    assert all(re.fullmatch(llm.lora_targets, n) for n in ("q_proj", "o_proj", "gate_proj", "down_proj"))
    assert not re.fullmatch(llm.lora_targets, "lm_head")
