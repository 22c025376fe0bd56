"""Generation vs transformers `generate(do_sample=False)` on the same random weights, plus sampling,
stopping, streaming, errors and compile counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hf_reference import LLAVA_IMAGE_TOKEN, llama, llava

from llava_jax.checkpoint import DictSource, load_weights
from llava_jax.checkpoint.hf_config import llama_config_from_hf, llava_config_from_hf
from llava_jax.inference import Sampling, filter_logits, generate, sample_tokens, stream_generate
from llava_jax.inference.generate import _decode, _prefill, bucket
from llava_jax.models import Llama, Llava

EOS = 2
PAD = 0


@pytest.fixture(scope="module")
def llama_pair():
    ref = llama(kv_heads=2, seed=3)
    ours = load_weights(
        Llama(llama_config_from_hf(ref.config.to_dict()), rngs=nnx.Rngs(0)), DictSource(ref.state_dict())
    )
    return ref, ours


@pytest.fixture(scope="module")
def llava_pair():
    ref = llava(seed=1)
    ours = load_weights(
        Llava(llava_config_from_hf(ref.config.to_dict()), rngs=nnx.Rngs(0)), DictSource(ref.state_dict())
    )
    return ref, ours


def _prompts(lengths, seed=0, low=3, high=400):
    rng = np.random.default_rng(seed)
    return [rng.integers(low, high, n).tolist() for n in lengths]


def _hf_greedy(ref, prompts, max_new_tokens, pixel_values=None):
    """transformers greedy generation with left padding; returns new tokens per row (cut at EOS) and
    the smallest top-1/top-2 logit gap seen while choosing them."""
    t = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), t), PAD)
    mask = torch.zeros((len(prompts), t), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, t - len(p) :] = torch.tensor(p)
        mask[b, t - len(p) :] = 1
    extra = {} if pixel_values is None else {"pixel_values": pixel_values}
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
            **extra,
        )
    rows, margin = [], np.inf
    scores = torch.stack(out.scores, 1)  # [B, steps, V]
    for b in range(len(prompts)):
        new = out.sequences[b, t:].tolist()
        n = new.index(EOS) if EOS in new else len(new)
        rows.append(new[:n])
        top2 = torch.topk(scores[b, : min(n + 1, len(new))], 2, dim=-1).values
        margin = min(margin, float((top2[:, 0] - top2[:, 1]).min()))
    return rows, margin


def test_llama_greedy_matches_transformers(llama_pair):
    ref, ours = llama_pair
    prompts = _prompts([11, 4, 7])
    want, margin = _hf_greedy(ref, prompts, 12)
    assert margin > 1e-3, f"near-tie in the reference logits ({margin}); pick another seed"
    got = generate(ours, prompts, max_new_tokens=12, eos_ids=(EOS,), chunk_size=5)
    assert got == want
    assert all(len(r) > 0 for r in got)


def test_llava_greedy_matches_transformers(llava_pair):
    """Row 0: text, one image (16 tokens), text; row 1: text only, shorter."""
    ref, ours = llava_pair
    g = torch.Generator().manual_seed(0)
    text = _prompts([6, 5, 9], seed=1)
    prompts = [text[0] + [LLAVA_IMAGE_TOKEN] * 16 + text[1], text[2]]
    pixels = torch.randn(1, 3, 56, 56, generator=g)
    want, margin = _hf_greedy(ref, prompts, 10, pixel_values=pixels)
    assert margin > 1e-3, f"near-tie in the reference logits ({margin}); pick another seed"
    images = np.zeros((2, 1, 56, 56, 3), np.float32)
    images[0, 0] = pixels[0].permute(1, 2, 0).numpy()
    got = generate(ours, prompts, images, max_new_tokens=10, eos_ids=(EOS,))
    assert got == want
    # Image-free batch through the same model.
    want_text, _ = _hf_greedy(ref, [text[2], text[0]], 6)
    assert generate(ours, [text[2], text[0]], max_new_tokens=6, eos_ids=(EOS,)) == want_text


def test_sampling_is_reproducible_and_seeded(llama_pair):
    _, ours = llama_pair
    prompts = _prompts([5, 9])
    s = Sampling(temperature=1.0, top_p=0.95, top_k=100)
    a = generate(ours, prompts, max_new_tokens=16, sampling=s, seed=0, eos_ids=())
    assert a == generate(ours, prompts, max_new_tokens=16, sampling=s, seed=0, eos_ids=())
    assert a == generate(ours, prompts, max_new_tokens=16, sampling=s, seed=0, eos_ids=(), chunk_size=3)
    assert a != generate(ours, prompts, max_new_tokens=16, sampling=s, seed=1, eos_ids=())
    greedy = generate(ours, prompts, max_new_tokens=16, eos_ids=())
    assert a != greedy
    top1 = generate(ours, prompts, max_new_tokens=16, sampling=Sampling(temperature=0.7, top_k=1), seed=5, eos_ids=())
    assert top1 == greedy


def test_eos_stops_one_row_while_others_continue(llama_pair):
    _, ours = llama_pair
    prompts = _prompts([6, 10, 3], seed=1)
    free = generate(ours, prompts, max_new_tokens=10, eos_ids=())
    eos = (free[0][3], free[2][3])  # two EOS ids; each first appears at step 3 of its row
    assert not set(eos) & set(free[0][:3] + free[2][:3] + free[1])
    chunks = []
    got = generate(ours, prompts, max_new_tokens=10, eos_ids=eos, stream=chunks.append, chunk_size=4)
    assert got == [free[0][:3], free[1], free[2][:3]]
    assert chunks[-1].finish == ["eos", "length", "eos"]
    assert [r for c in chunks for r in c.tokens[0]] == got[0]


def test_stream_concatenates_to_result_and_caller_can_stop_rows(llama_pair):
    _, ours = llama_pair
    prompts = _prompts([4, 8], seed=3)
    full = generate(ours, prompts, max_new_tokens=9, eos_ids=())
    gen = stream_generate(ours, prompts, max_new_tokens=9, eos_ids=(), chunk_size=2)
    seen = [[], []]
    first = next(gen)
    assert [len(t) for t in first.tokens] == [1, 1] and first.finish == [None, None]
    for b in range(2):
        seen[b] += first.tokens[b]
    request = None
    try:
        while True:
            chunk = gen.send(request)
            for b in range(2):
                seen[b] += chunk.tokens[b]
            request = [1] if len(seen[1]) >= 3 and chunk.finish[1] is None else None
            last = chunk
    except StopIteration as end:
        result = end.value
    assert result == seen
    assert result[0] == full[0]
    assert 3 <= len(result[1]) < 9 and result[1] == full[1][: len(result[1])]
    assert last.finish == ["length", "stop"]


def test_padded_array_with_lengths_equals_lists(llama_pair):
    _, ours = llama_pair
    prompts = _prompts([7, 3], seed=4)
    arr = np.zeros((2, 9), np.int32)
    for b, p in enumerate(prompts):
        arr[b, : len(p)] = p
    assert generate(ours, arr, lengths=[7, 3], max_new_tokens=5) == generate(ours, prompts, max_new_tokens=5)


def test_clear_errors(llama_pair, llava_pair):
    _, ours = llama_pair
    ctx = ours.cfg.max_position_embeddings
    with pytest.raises(ValueError, match="exceeds the model context"):
        generate(ours, [[5] * (ctx - 4)], max_new_tokens=5)
    generate(ours, [[5] * (ctx - 4)], max_new_tokens=4, chunk_size=4)  # exactly fits
    with pytest.raises(ValueError, match="bare Llama"):
        generate(ours, [[5, 6]], np.zeros((1, 56, 56, 3), np.uint8), max_new_tokens=2)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate(ours, [[5, 512]], max_new_tokens=2)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(ours, [[5], []], max_new_tokens=2)
    _, vlm = llava_pair
    with pytest.raises(ValueError, match="images is None"):
        generate(vlm, [[5] + [LLAVA_IMAGE_TOKEN] * 16], max_new_tokens=2)
    with pytest.raises(ValueError, match="multiple of 16"):
        generate(vlm, [[5] + [LLAVA_IMAGE_TOKEN] * 15], np.zeros((1, 56, 56, 3), np.uint8), max_new_tokens=2)


def test_no_recompilation_across_steps_and_calls(llama_pair):
    assert [bucket(n) for n in (1, 16, 17, 256, 257, 300, 513, 1100)] == [16, 16, 32, 256, 384, 384, 640, 1152]
    _, ours = llama_pair
    # A jitted function's cache holds one entry per compiled program: at most one new one per function here.
    before = _prefill._cache_size(), _decode._cache_size()
    s = Sampling(temperature=0.8, top_p=0.9)
    generate(ours, _prompts([5, 12, 9]), max_new_tokens=23, sampling=s, chunk_size=4, eos_ids=())  # 6 chunks
    mid = _prefill._cache_size(), _decode._cache_size()
    assert mid[0] - before[0] <= 1 and mid[1] - before[1] <= 1
    # Same buckets (prompt <= 16, 3 -> 4 rows, same cache length), other lengths, seed and temperature.
    generate(
        ours,
        _prompts([16, 2, 2, 7], seed=9),
        max_new_tokens=20,
        sampling=Sampling(0.3, top_p=0.5),
        chunk_size=4,
        seed=4,
        eos_ids=(1, 2),
    )
    after = _prefill._cache_size(), _decode._cache_size()
    assert after == mid


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 20, None), (1.3, None, 0.8), (0.9, 50, 0.6), (1.0, 1, 0.9)])
def test_filters_match_transformers_warpers(temperature, top_k, top_p):
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(0)) * 3
    want = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k is not None:
        want = TopKLogitsWarper(top_k)(None, want)
    if top_p is not None:
        want = TopPLogitsWarper(top_p)(None, want)
    s = Sampling(temperature=temperature, top_k=top_k, top_p=top_p)
    got = np.asarray(filter_logits(jnp.asarray(logits.numpy()), s.mode, s.values))
    want = want.numpy()
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
    np.testing.assert_allclose(got[np.isfinite(got)], want[np.isfinite(want)], rtol=1e-6)
    # Draws stay inside the kept set.
    keys = jax.random.split(jax.random.key(0), 64)
    draws = np.asarray(jax.vmap(lambda k: sample_tokens(jnp.asarray(logits.numpy()), k, s.mode, s.values))(keys))
    assert np.isfinite(np.take_along_axis(got, draws.T, axis=1)).all()


def test_cpu_programs_are_compiled_with_the_cpu_options(llama_pair):
    from llava_jax.inference.generate import _prefill_impl
    from llava_jax.models.platform import cpu_compiler_options

    if jax.default_backend() != "cpu" or cpu_compiler_options("cpu") is None:
        pytest.skip("the CPU compiler options apply to an XLA:CPU that knows them")
    _, ours = llama_pair
    generate(ours, _prompts([5, 9]), max_new_tokens=3, chunk_size=2)
    for program in (_prefill, _decode):  # the programs that call ran are those of the 'cpu' entry
        assert program.for_platform("cpu")._cache_size() >= 1
    graphdef, params = nnx.split(ours)
    ids = jnp.ones((2, 16), jnp.int32)
    args = (graphdef, params, None, ids, None, ids, ids, jnp.ones((2,), bool), jnp.full((4,), -1, jnp.int32))
    kwargs = {"mode": Sampling().mode, "cache_length": 32}
    tail = (Sampling().values, jax.random.key(0))
    plain = jax.jit(_prefill_impl, static_argnames=("graphdef", "mode", "cache_length"))
    assert "ynn_fusion" in plain.lower(*args, *tail, **kwargs).compile().as_text()  # XLA:CPU's default
    assert "ynn_fusion" not in _prefill.for_platform("cpu").lower(*args, *tail, **kwargs).compile().as_text()


def test_new_weights_of_the_same_model_are_used(llama_pair):
    """On CPU the layers' weights are sliced once per model and reused by later calls: after the model's
    weights change, generation follows the new ones (transformers with the same change)."""
    import copy

    ref, ours = llama_pair
    prompts = _prompts([6, 9], seed=4)
    model = nnx.clone(ours)
    before = _hf_greedy(ref, prompts, 8)[0]
    assert generate(model, prompts, max_new_tokens=8, eos_ids=()) == before
    nnx.update(model.layers, jax.tree.map(lambda a: a * 1.5, nnx.state(model.layers)))
    changed = copy.deepcopy(ref)
    with torch.no_grad():
        for p in changed.model.layers.parameters():
            p.mul_(1.5)
    want, margin = _hf_greedy(changed, prompts, 8)
    assert margin > 1e-3, f"near-tie in the reference logits ({margin}); pick another factor"
    assert want != before  # so stale weights would show
    assert generate(model, prompts, max_new_tokens=8, eos_ids=()) == want
