"""Fitting a LLaMA-family checkpoint's vocabulary rows into the llava-hf vocabulary.

llava_jax models use the llava-hf vocabulary: LLaMA's 32000 pieces, then ``<image>`` (32000) and
``<pad>`` (32001), padded to 32064 rows. Checkpoints that start from plain LLaMA / Vicuna have
fewer rows:

* Vicuna v1.x, LLaMA-2 and original LLaVA v1 / v1.5 checkpoints: 32000 rows;
* original LLaVA v0 checkpoints: 32003 rows (tokens their training added after the 32000 LLaMA
  pieces, such as ``<im_patch>``, ``<im_start>``, ``<im_end>``; some Vicuna v0 builds have a
  ``[PAD]`` row 32000).

`fit_rows` maps such a [V, D] table (input embeddings, or the LM head in PyTorch layout) to the
model's row count, deterministically:

* rows 0..31999 (the LLaMA pieces) are copied unchanged, so every LLaMA token keeps its id;
* the checkpoint's added rows 32000..V-1 move to 32002..V+1, right after ``<image>`` and ``<pad>``
  (`added_token_ids` gives the new ids), so nothing the checkpoint learned is lost;
* every other row (``<image>``, ``<pad>``, the padding rows) is the mean of the 32000 LLaMA rows,
  computed in float64. The llava-hf converter instead samples these rows from N(mean, 1e-5 cov);
  the mean is that distribution's centre, without the randomness. An LM-head row equal to the mean
  gives each new token the average logit, so greedy decoding does not pick it.
"""

from __future__ import annotations

import numpy as np

LLAMA_PIECES = 32000  # rows of the plain LLaMA vocabulary
FIRST_FREE_ID = 32002  # after <image> (32000) and <pad> (32001)


def needs_fit(checkpoint_rows: int, model_rows: int) -> bool:
    """Whether `fit_rows` applies: a LLaMA-family table whose row count differs from the model's."""
    return checkpoint_rows != model_rows and checkpoint_rows >= LLAMA_PIECES and model_rows >= FIRST_FREE_ID


def added_token_ids(checkpoint_rows: int) -> dict[int, int]:
    """{checkpoint id: model id} of the rows a checkpoint added after the 32000 LLaMA pieces."""
    return {LLAMA_PIECES + k: FIRST_FREE_ID + k for k in range(checkpoint_rows - LLAMA_PIECES)}


def fit_rows(table: np.ndarray, rows: int, *, key: str = "embedding table") -> np.ndarray:
    """A [V, D] vocabulary table (V >= 32000) -> [rows, D] in the llava-hf id layout (module docstring).

    `key` names the tensor in errors.
    """
    v = table.shape[0]
    if v < LLAMA_PIECES:
        raise ValueError(f"{key}: {v} vocabulary rows, fewer than LLaMA's {LLAMA_PIECES}; not a LLaMA-family table")
    extra = v - LLAMA_PIECES
    if FIRST_FREE_ID + extra > rows:
        raise ValueError(
            f"{key}: {extra} rows after the {LLAMA_PIECES} LLaMA pieces do not fit into a {rows}-row vocabulary "
            f"(ids {FIRST_FREE_ID}..{rows - 1} are free); raise the model's vocab_size"
        )
    base = table[:LLAMA_PIECES]
    mean = np.asarray(base, np.float64).mean(axis=0).astype(table.dtype)
    out = np.broadcast_to(mean, (rows, *table.shape[1:])).copy()
    out[:LLAMA_PIECES] = base
    out[FIRST_FREE_ID : FIRST_FREE_ID + extra] = table[LLAMA_PIECES:]
    return out


def describe(checkpoint_rows: int, rows: int) -> str:
    """One line saying how a `checkpoint_rows` vocabulary was mapped (for logs and model.json)."""
    moved = added_token_ids(checkpoint_rows)
    text = (
        f"{checkpoint_rows} checkpoint rows -> {rows}: ids 0..{LLAMA_PIECES - 1} kept, other rows set to the "
        f"mean of the {LLAMA_PIECES} LLaMA rows"
    )
    if moved:
        text += "; added rows moved " + ", ".join(f"{a}->{b}" for a, b in moved.items())
    return text
