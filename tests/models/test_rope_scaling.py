"""RoPE scaling (`linear`, `dynamic`) vs transformers on the same random weights: logits of short and
long sequences, and greedy generation that grows past max_position_embeddings with the KV cache."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hf_reference import llama, np_

from llava_jax.checkpoint import DictSource, load_weights
from llava_jax.checkpoint.hf_config import llama_config_from_hf
from llava_jax.inference import generate
from llava_jax.models import Llama, LlamaConfig

MAX_POS = 16  # short, so that test sequences run past it
EOS, PAD = 2, 0
SCALINGS = {"linear": {"type": "linear", "factor": 4.0}, "dynamic": {"type": "dynamic", "factor": 3.0}}


def _pair(kind: str, seed: int = 0):
    """A fresh transformers model (dynamic RoPE keeps state across calls) and ours with its weights."""
    ref = llama(kv_heads=2, seed=seed, rope_scaling=SCALINGS[kind], max_positions=MAX_POS, theta=10000.0)
    cfg = llama_config_from_hf(ref.config.to_dict())
    return ref, load_weights(Llama(cfg, rngs=nnx.Rngs(0)), DictSource(ref.state_dict()))


@pytest.mark.parametrize("kind", ["linear", "dynamic"])
def test_config_is_read(kind):
    _, ours = _pair(kind)
    assert (ours.cfg.rope_type, ours.cfg.rope_factor) == (kind, SCALINGS[kind]["factor"])
    assert ours.cfg.max_position_embeddings == MAX_POS


@pytest.mark.parametrize("length", [pytest.param(10, marks=pytest.mark.slow), 40], ids=["within", "beyond"])
@pytest.mark.parametrize("kind", ["linear", "dynamic"])
def test_logits_match_transformers(kind, length):
    ref, ours = _pair(kind)
    tokens = torch.randint(0, 512, (2, length), generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        want = np_(ref(input_ids=tokens).logits)
    got, _ = ours(jnp.asarray(tokens.numpy()))
    diff = np.abs(np.asarray(got) - want).max()
    print(f"RoPE {kind}, {length} tokens (max_position_embeddings {MAX_POS}): logits max-abs diff {diff:.1e}")
    assert diff < 1e-4
    plain, _ = _plain(ours)(jnp.asarray(tokens.numpy()))
    if kind == "dynamic" and length <= MAX_POS:  # within the trained length, dynamic is plain RoPE
        np.testing.assert_array_equal(np.asarray(plain), np.asarray(got))
    else:  # the scaling matters here, so a model ignoring it would fail the comparison above
        assert np.abs(np.asarray(plain) - want).max() > 1e-2


def _plain(model: Llama) -> Llama:
    """The same weights with plain RoPE."""
    other = Llama(dataclasses.replace(model.cfg, rope_type="default", rope_factor=1.0), rngs=nnx.Rngs(0))
    nnx.update(other, nnx.state(model))
    return other


def _hf_greedy(ref, prompts, max_new_tokens):
    t = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), t), PAD)
    mask = torch.zeros((len(prompts), t), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, t - len(p) :] = torch.tensor(p)
        mask[b, t - len(p) :] = 1
    with torch.no_grad():
        out = ref.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=EOS,
            pad_token_id=PAD,
            output_scores=True,
            return_dict_in_generate=True,
        )
    rows, margin = [], np.inf
    scores = torch.stack(out.scores, 1)
    for b in range(len(prompts)):
        new = out.sequences[b, t:].tolist()
        n = new.index(EOS) if EOS in new else len(new)
        rows.append(new[:n])
        top2 = torch.topk(scores[b, : min(n + 1, len(new))], 2, dim=-1).values
        margin = min(margin, float((top2[:, 0] - top2[:, 1]).min()))
    return rows, margin


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["linear", "dynamic"])
def test_greedy_generation_matches_transformers(kind):
    """Prompts of 12, 5 and 9 tokens and 14 new ones: the longest row passes MAX_POS mid-decode, where
    dynamic RoPE re-derives its frequencies at every step."""
    ref, ours = _pair(kind, seed=4)
    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, 400, n).tolist() for n in (12, 5, 9)]
    want, margin = _hf_greedy(ref, prompts, 14)
    assert margin > 1e-3, f"near-tie in the reference logits ({margin}); pick another seed"
    assert max(len(prompts[b]) + len(want[b]) for b in range(3)) > MAX_POS + 2
    got = generate(ours, prompts, max_new_tokens=14, eos_ids=(EOS,), chunk_size=4)
    assert got == want


# As published: Qwen2.5 / DeepSeek (yarn), Llama-3.1 (llama3), Phi-3 (longrope, per-frequency factors).
OTHER_SCALINGS = {
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    },
    "longrope": {
        "rope_type": "longrope",
        "short_factor": [1.0] * 8,
        "long_factor": [2.0] * 8,
        "original_max_position_embeddings": 32,
    },
}


@pytest.mark.parametrize("rope_type", list(OTHER_SCALINGS))
def test_other_rope_types_are_refused(rope_type):
    d = llama().config.to_dict()
    d.pop("rope_parameters", None)
    with pytest.raises(ValueError, match=f"RoPE scaling type '{rope_type}' is not supported"):
        llama_config_from_hf({**d, "rope_scaling": OTHER_SCALINGS[rope_type], "rope_theta": 10000.0})
    with pytest.raises(ValueError, match=f"RoPE scaling type '{rope_type}' is not supported"):
        LlamaConfig(rope_type=rope_type, rope_factor=8.0)


@pytest.mark.parametrize("kind", ["linear", "dynamic"])
def test_exported_config_declares_the_scaling(kind):
    """An exported config.json is read by transformers with the same RoPE scaling."""
    import transformers as tf

    from llava_jax.checkpoint.hf_config import llama_config_to_hf

    cfg = LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=160,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_position_embeddings=MAX_POS,
        rope_type=kind,
        rope_factor=2.5,
    )
    params = tf.LlamaConfig.from_dict(llama_config_to_hf(cfg)).rope_parameters
    assert (params["rope_type"], params["factor"], params["rope_theta"]) == (kind, 2.5, 10000.0)
    assert cfg.context_length == int(MAX_POS * 2.5)
