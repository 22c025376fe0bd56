"""The original LLaVA's `group_by_modality_length` sample order, as a deterministic, resumable order.

The original (`llava/train/llava_trainer.py`, `LengthGroupedSampler(group_by_modality=True)`) orders
an epoch so that image samples and text-only samples land in separate batches, and each batch holds
samples of similar length:

  1. each modality alone: a random permutation cut into megabatches of `world_size * batch_size`,
     each megabatch sorted by length (longest first) and split into `world_size` per-device batches of
     about equal total length (greedy: the next sample goes to the shortest unfilled batch);
  2. both modalities cut into megabatches again; all but the last of each are put in random order;
  3. the two leftover megabatches (last image one + last text one) form a mixed tail: a full
     megabatch of it goes first, the rest last.

Lengths are the original's `modality_lengths`: the number of whitespace-separated words of all turns,
positive for image samples, negative for text-only ones (`modality_length`).

Randomness comes from `permutation(n) -> n indices`, called three times per epoch in the original's
order (image samples, text samples, megabatches). The pipeline draws it from numpy with the run's seed
and the epoch number folded in (`epoch_permutation`), so an epoch's order is a pure function of
(seed, epoch) and a restored iterator continues it exactly. With `torch.randperm` under a seeded torch
generator the order equals the original's (tests/data/test_length_grouping.py checks this).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

import grain
import numpy as np

Permutation = Callable[[int], Sequence[int]]


def modality_length(record: dict) -> int:
    """Words of all turns (whitespace split), positive with an image, negative without (never 0)."""
    words = sum(len(str(turn.get("value", "")).split()) for turn in record.get("conversations") or ())
    words = max(words, 1)
    return words if record.get("image") else -words


def split_to_even_chunks(indices: Sequence[int], lengths: Sequence[int], num_chunks: int) -> list[list[int]]:
    """One megabatch (longest first) -> `num_chunks` batches of equal count and about equal total length;
    round-robin when the count does not divide."""
    if len(indices) % num_chunks:
        return [list(indices[i::num_chunks]) for i in range(num_chunks)]
    per_chunk = len(indices) // num_chunks
    chunks: list[list[int]] = [[] for _ in range(num_chunks)]
    totals = [0.0] * num_chunks
    for index in indices:
        shortest = totals.index(min(totals))
        chunks[shortest].append(index)
        totals[shortest] += lengths[index]
        if len(chunks[shortest]) == per_chunk:
            totals[shortest] = float("inf")
    return chunks


def length_grouped_order(
    lengths: Sequence[int], batch_size: int, world_size: int, permutation: Permutation
) -> list[int]:
    """Indices of `lengths` (all positive) in length-grouped order: random megabatches, each sorted
    longest first and split into `world_size` batches of `batch_size`."""
    order = [int(i) for i in permutation(len(lengths))]
    size = world_size * batch_size
    out: list[int] = []
    for start in range(0, len(order), size):
        mega = sorted(order[start : start + size], key=lambda i: lengths[i], reverse=True)
        for chunk in split_to_even_chunks(mega, lengths, world_size):
            out += chunk
    return out


def modality_grouped_order(
    lengths: Sequence[int], batch_size: int, world_size: int, permutation: Permutation
) -> list[int]:
    """Indices of `lengths` (modality lengths: > 0 image, < 0 text-only) in the original's
    `group_by_modality_length` order (module docstring). Needs both modalities."""
    if any(n == 0 for n in lengths):
        raise ValueError("modality lengths must be non-zero (positive: image sample, negative: text-only)")
    mm = [(i, n) for i, n in enumerate(lengths) if n > 0]
    lang = [(i, -n) for i, n in enumerate(lengths) if n < 0]
    if not mm or not lang:
        raise ValueError(
            "group_by_modality_length needs both image and text-only samples; "
            f"this data has {len(mm)} image and {len(lang)} text-only samples (use the plain shuffle)"
        )
    size = world_size * batch_size
    groups = []
    for items in (mm, lang):
        idx, lens = zip(*items, strict=True)
        shuffled = [idx[i] for i in length_grouped_order(lens, batch_size, world_size, permutation)]
        groups.append([shuffled[i : i + size] for i in range(0, len(shuffled), size)])
    (*mm_full, mm_last), (*lang_full, lang_last) = groups
    megabatches = mm_full + lang_full
    megabatches = [megabatches[int(i)] for i in permutation(len(megabatches))]
    tail = mm_last + lang_last
    if len(tail) >= size:
        megabatches = [tail[:size], *megabatches]
        tail = tail[size:]
    if tail:
        megabatches.append(tail)
    return [i for mega in megabatches for i in mega]


def epoch_permutation(seed: int, epoch: int) -> Permutation:
    """numpy permutations for one epoch, a pure function of (seed, epoch)."""
    rng = np.random.default_rng([seed, epoch])
    return lambda n: rng.permutation(n)


class ModalityGroupedDataset(grain.MapDataset):
    """`parent[i]` records in `group_by_modality_length` order, epoch after epoch.

    Index e * n + k is the k-th record of epoch e (n = len(parent)); `num_epochs=None` repeats
    forever. Each epoch's order is computed once when first read (a pure function of seed and epoch),
    so the grain iterator's position is all a checkpoint needs."""

    def __init__(
        self,
        parent: grain.MapDataset,
        lengths: Sequence[int],
        *,
        batch_size: int,
        world_size: int,
        seed: int,
        num_epochs: int | None,
    ):
        super().__init__(parent)
        if len(lengths) != len(parent):
            raise ValueError(f"{len(lengths)} modality lengths for {len(parent)} records")
        self._lengths = list(lengths)
        self._batch_size, self._world_size, self._seed = batch_size, world_size, seed
        self._num_epochs = num_epochs
        self._orders: dict[int, list[int]] = {}
        modality_grouped_order(self._lengths, 1, 1, lambda n: range(n))  # fail early on bad lengths

    def __len__(self) -> int:
        n = len(self._parent)
        return sys.maxsize if self._num_epochs is None else n * self._num_epochs

    def order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            self._orders = {
                epoch: modality_grouped_order(
                    self._lengths, self._batch_size, self._world_size, epoch_permutation(self._seed, epoch)
                )
            }
        return self._orders[epoch]

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        if index >= len(self):
            raise IndexError(index)
        epoch, k = divmod(index, len(self._parent))
        return self._parent[self.order(epoch)[k]]

    def __str__(self) -> str:
        return f"ModalityGroupedDataset(batch_size={self._batch_size}, world_size={self._world_size})"
