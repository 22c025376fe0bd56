"""LLaMA decoder vs transformers LlamaForCausalLM on the same random weights (fp32)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hf_reference import llama, np_

from llava_jax.checkpoint import DictSource, load_weights
from llava_jax.checkpoint.hf_config import llama_config_from_hf
from llava_jax.models import KVCache, Llama


def _ours(ref) -> Llama:
    cfg = llama_config_from_hf(ref.config.to_dict())
    return load_weights(Llama(cfg, rngs=nnx.Rngs(7)), DictSource(ref.state_dict()))


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa2", "mqa"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("theta", [10000.0, 500000.0])
def test_logits_match(kv_heads, tied, theta):
    ref = llama(kv_heads=kv_heads, tied=tied, theta=theta)
    ours = _ours(ref)
    assert ours.cfg.num_kv_heads == kv_heads and ours.cfg.tie_word_embeddings == tied
    tokens = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = np_(ref(input_ids=tokens).logits)
    got, _ = ours(jnp.asarray(tokens.numpy()))
    diff = np.abs(np.asarray(got) - want).max()
    print(f"LLaMA kv_heads={kv_heads} tied={tied} theta={theta:g}: logits max-abs diff {diff:.1e}")
    assert diff < 1e-4


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch(side):
    ref = llama(kv_heads=2)
    ours = _ours(ref)
    lengths = [24, 15, 7]
    t = max(lengths)
    tokens = torch.randint(0, 512, (3, t), generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(3, t, dtype=torch.long)
    pos = torch.zeros(3, t, dtype=torch.long)
    for b, n in enumerate(lengths):
        sl = slice(0, n) if side == "right" else slice(t - n, t)
        mask[b, sl] = 1
        pos[b, sl] = torch.arange(n)
    with torch.no_grad():
        want = np_(ref(input_ids=tokens, attention_mask=mask, position_ids=pos).logits)
    got, _ = ours(
        jnp.asarray(tokens.numpy()), positions=jnp.asarray(pos.numpy()), segment_ids=jnp.asarray(mask.numpy())
    )
    valid = mask.numpy().astype(bool)
    diff = np.abs(np.asarray(got) - want)[valid].max()
    print(f"LLaMA {side}-padded batch: logits max-abs diff {diff:.1e}")
    assert diff < 1e-4
    # Each row also equals the same sequence run alone, unpadded.
    for b, n in enumerate(lengths):
        sl = slice(0, n) if side == "right" else slice(t - n, t)
        alone, _ = ours(jnp.asarray(tokens[b : b + 1, sl].numpy()))
        assert np.abs(np.asarray(alone)[0] - np.asarray(got)[b, sl]).max() < 1e-4


def test_packed_rows_equal_separate_sequences():
    """Two samples packed in one row with segment ids and restarting positions == run separately."""
    ref = llama(kv_heads=2, seed=4)
    ours = _ours(ref)
    a = np.arange(5, 15)
    b = np.arange(100, 117)
    row = np.concatenate([a, b, np.zeros(5, int)])[None]
    seg = np.concatenate([np.full(10, 1), np.full(17, 2), np.zeros(5, int)])[None]
    pos = np.concatenate([np.arange(10), np.arange(17), np.zeros(5, int)])[None]
    got, _ = ours(jnp.asarray(row), positions=jnp.asarray(pos), segment_ids=jnp.asarray(seg))
    with torch.no_grad():
        wa = np_(ref(input_ids=torch.tensor(a[None])).logits)[0]
        wb = np_(ref(input_ids=torch.tensor(b[None])).logits)[0]
    assert np.abs(np.asarray(got)[0, :10] - wa).max() < 1e-4
    assert np.abs(np.asarray(got)[0, 10:27] - wb).max() < 1e-4


@pytest.mark.parametrize("per_layer", [False, True], ids=["stacked", "per_layer_prefill"])
def test_kv_cache_decode_equals_full_forward(per_layer):
    """Prefill left-padded prompts of different lengths, decode token by token; every step's logits
    equal the full (no-cache) forward over the same sequence. The cache is one stacked buffer
    (prefill attends over all cache slots), or one per layer (the layers then run unrolled) with
    `prefill=True` (the prompt attends among itself), as `generate` runs it."""
    ref = llama(kv_heads=2, seed=5)
    ours = _ours(ref)
    rng = np.random.default_rng(0)
    lengths, t, steps = [9, 4], 9, 5
    prompt = np.zeros((2, t), np.int32)
    seg = np.zeros((2, t), np.int32)
    pos = np.zeros((2, t), np.int32)
    for b, n in enumerate(lengths):
        prompt[b, t - n :] = rng.integers(1, 512, n)
        seg[b, t - n :] = 1
        pos[b, t - n :] = np.arange(n)
    cache = KVCache.init(ours.cfg, batch=2, length=t + steps, per_layer=per_layer)
    hidden, cache = ours.hidden(
        ours.embed(jnp.asarray(prompt)),
        positions=jnp.asarray(pos),
        segment_ids=jnp.asarray(seg),
        cache=cache,
        prefill=per_layer,
    )
    logits = ours.logits(hidden)
    seq = [prompt[b, t - n :].tolist() for b, n in enumerate(lengths)]
    step = jax.jit(lambda m, tok, p, c: m(tok, positions=p, segment_ids=jnp.ones_like(tok), cache=c))
    for s in range(steps):
        nxt = np.asarray(jnp.argmax(logits[:, -1], -1))
        for b in range(2):
            full, _ = ours(jnp.asarray([seq[b]]))
            assert np.abs(np.asarray(full)[0, -1] - np.asarray(logits)[b, -1]).max() < 1e-4, (s, b)
            seq[b].append(int(nxt[b]))
        p = jnp.asarray([[len(seq[b]) - 1] for b in range(2)], jnp.int32)
        logits, cache = step(ours, jnp.asarray(nxt[:, None], jnp.int32), p, cache)
    assert int(cache.index) == t + steps
    assert isinstance(cache.k, tuple) == per_layer


def test_scan_keeps_program_size_flat_in_depth():
    """Layers are scanned: the traced program does not grow with the number of layers."""
    base = llama_config_from_hf(llama(layers=2).config.to_dict())

    def size(n):
        cfg = dataclasses.replace(base, num_layers=n)
        model = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
        graphdef, state = nnx.split(model)
        fn = lambda s, x: nnx.merge(graphdef, s)(x)[0]  # noqa: E731
        return len(str(jax.make_jaxpr(fn)(state, jnp.zeros((1, 8), jnp.int32))).splitlines())

    assert size(2) == size(16)
