"""`group_by_modality_length`: the original's index order for a seed, modality-pure length-sorted
batches, and a resumable pipeline order."""

import numpy as np
import pytest
import torch
from test_pipeline import _make, _order, _take, data, tokenizer  # noqa: F401 (fixtures)

from llava_jax.data import length_grouping as lg

# ------------------------------------------------------------------------------------------------
# The reference: the original's `get_modality_length_grouped_indices` (haotian-liu/LLaVA,
# llava/train/llava_trainer.py), written out here from its description with torch's global RNG, as
# the original runs it (its inner calls pass generator=None, the outer one the sampler's generator).


def _ref_even_chunks(indices, lengths, n):
    if len(indices) % n != 0:
        return [indices[i::n] for i in range(n)]
    per = len(indices) // n
    chunks, totals = [[] for _ in range(n)], [0 for _ in range(n)]
    for index in indices:
        k = totals.index(min(totals))
        chunks[k].append(index)
        totals[k] += lengths[index]
        if len(chunks[k]) == per:
            totals[k] = float("inf")
    return chunks


def _ref_length_grouped(lengths, batch_size, world_size, generator=None):
    indices = torch.randperm(len(lengths), generator=generator)
    size = world_size * batch_size
    megas = [indices[i : i + size].tolist() for i in range(0, len(lengths), size)]
    megas = [sorted(m, key=lambda i: lengths[i], reverse=True) for m in megas]
    megas = [_ref_even_chunks(m, lengths, world_size) for m in megas]
    return [i for m in megas for batch in m for i in batch]


def _ref_modality_grouped(lengths, batch_size, world_size, generator=None):
    mm_idx, mm_len = zip(*[(i, n) for i, n in enumerate(lengths) if n > 0], strict=True)
    la_idx, la_len = zip(*[(i, -n) for i, n in enumerate(lengths) if n < 0], strict=True)
    mm = [mm_idx[i] for i in _ref_length_grouped(mm_len, batch_size, world_size, None)]
    la = [la_idx[i] for i in _ref_length_grouped(la_len, batch_size, world_size, None)]
    size = world_size * batch_size
    mm_megas = [mm[i : i + size] for i in range(0, len(mm), size)]
    la_megas = [la[i : i + size] for i in range(0, len(la), size)]
    extra = mm_megas[-1] + la_megas[-1]
    megas = mm_megas[:-1] + la_megas[:-1]
    megas = [megas[i] for i in torch.randperm(len(megas), generator=generator)]
    if len(extra) >= size:
        megas = [extra[:size]] + megas
        extra = extra[size:]
    if len(extra) > 0:
        megas.append(extra)
    return [i for m in megas for i in m]


def _lengths(n, seed, text_share=0.3):
    rng = np.random.default_rng(seed)
    words = rng.integers(5, 400, n)
    text = rng.random(n) < text_share
    return [int(-w if t else w) for w, t in zip(words, text, strict=True)]


@pytest.mark.parametrize(
    ("n", "batch_size", "world_size", "seed"), [(203, 4, 2, 0), (64, 8, 1, 1), (97, 2, 4, 2), (30, 16, 2, 3)]
)
def test_same_order_as_the_original_for_a_seed(n, batch_size, world_size, seed):
    lengths = _lengths(n, seed)
    torch.manual_seed(seed)
    expected = _ref_modality_grouped(lengths, batch_size, world_size)
    torch.manual_seed(seed)
    got = lg.modality_grouped_order(lengths, batch_size, world_size, lambda k: torch.randperm(k).tolist())
    assert got == expected
    assert sorted(got) == list(range(n))


def test_megabatches_are_one_modality_and_sorted_by_length():
    lengths = _lengths(500, 7)
    b, w = 4, 2
    order = lg.modality_grouped_order(lengths, b, w, lg.epoch_permutation(0, 0))
    assert sorted(order) == list(range(500))
    size = b * w
    megas = [order[i : i + size] for i in range(0, len(order), size)]
    n_mm, n_text = sum(n > 0 for n in lengths), sum(n < 0 for n in lengths)
    # The mixed tail (the two last partial megabatches) is at most two megabatches, first and/or last.
    tail = (n_mm % size or size) + (n_text % size or size)
    assert tail <= 2 * size
    mixed = [m for m in megas if len({lengths[i] > 0 for i in m}) > 1]
    assert all(m is megas[0] or m is megas[-1] for m in mixed)
    for m in megas[1:-1]:
        for chunk in (m[k * b : (k + 1) * b] for k in range(w)):  # each device's batch: longest first
            words = [abs(lengths[i]) for i in chunk]
            assert words == sorted(words, reverse=True)


def test_epochs_differ_and_repeat_for_a_seed():
    lengths = _lengths(100, 3)
    a = lg.modality_grouped_order(lengths, 4, 1, lg.epoch_permutation(5, 0))
    assert a == lg.modality_grouped_order(lengths, 4, 1, lg.epoch_permutation(5, 0))
    assert a != lg.modality_grouped_order(lengths, 4, 1, lg.epoch_permutation(5, 1))
    assert a != lg.modality_grouped_order(lengths, 4, 1, lg.epoch_permutation(6, 0))


def test_needs_both_modalities():
    with pytest.raises(ValueError, match="both image and text-only"):
        lg.modality_grouped_order([3, 4, 5], 2, 1, lg.epoch_permutation(0, 0))


def test_modality_length_counts_words():
    rec = {"image": "a.jpg", "conversations": [{"value": "<image>\nWhat is it?"}, {"value": "A red cat."}]}
    assert lg.modality_length(rec) == 7
    assert lg.modality_length({**rec, "image": None}) == -7


def test_pipeline_batches_are_modality_pure_and_resume(data, tokenizer):  # noqa: F811
    src = data["src"]
    is_image = {i: bool(src[i]["image"]) for i in range(len(src))}
    it = _make(src, tokenizer, group_by_modality_length=True, num_epochs=2, global_batch_size=4)
    batches = list(it)
    order = _order(batches, data)
    assert sorted(order) == sorted(list(range(len(src))) * 2)  # every record once per epoch
    per_epoch = len(src) // 4
    for epoch in range(2):
        rows = [order[k : k + 4] for k in range(epoch * len(src), (epoch + 1) * len(src), 4)]
        mixed = [k for k, r in enumerate(rows) if len({is_image[i] for i in r}) > 1]
        assert all(k in (0, per_epoch - 1) for k in mixed)  # only the tail megabatch may mix
    # resume: a fresh iterator from a saved state gives the same batches as the old one
    it = _make(src, tokenizer, group_by_modality_length=True, num_epochs=2, global_batch_size=4)
    _take(it, 5)
    state = it.get_state()
    rest = _take(it, 4)
    it2 = _make(src, tokenizer, group_by_modality_length=True, num_epochs=2, global_batch_size=4)
    it2.set_state(state)
    for a, b in zip(rest, _take(it2, 4), strict=True):
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
