"""Batched autoregressive generation for `Llava` and `Llama`: jitted prefill, then chunked on-device
decode over a preallocated KV cache.

How a call runs, for B prompts of different lengths:

1. Host side, shapes are made static. Prompts are LEFT-padded to a length bucket P (padding has
   segment id 0; positions restart at 0 at each row's first real token), the batch is padded to a
   power of two with inactive rows, and the KV cache gets S >= P + max_new_tokens - 1 slots, also
   bucketed. Calls whose sizes fall in the same buckets reuse the compiled programs.
2. Prefill, one jitted call: embeddings (image features merged in for `Llava`) -> decoder, filling
   the cache (the prompt attends among itself, not over the empty cache slots) -> logits at the last
   slot -> first new token of every row. On CPU the cache is kept per layer and the layers run
   unrolled on weights sliced out of their stacks once per model, so no step copies a layer's
   weights or cache (see `stream_generate`).
3. Decode, one jitted call per chunk of up to `chunk_size` tokens: a `jax.lax.while_loop` feeds one
   token per step, samples the next, and leaves early once every row is done. The number of steps
   is a traced argument, so every chunk (the last, shorter one too) runs the same compiled program.

Chunks are the streaming unit: the host receives each chunk's tokens while the device already
computes the next one (JAX dispatch is asynchronous, one chunk is kept in flight), so decode never
waits for the host and the host syncs once per chunk instead of once per token. `chunk_size=1`
streams token by token (lowest latency); larger chunks cost fewer host round trips.

Sampling keys are `fold_in(key(seed), t)` for the t-th new token, so results depend on the seed and
the batch, not on `chunk_size`.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Generator, Iterable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llava_jax.inference.sampling import GREEDY, Sampling, SamplingMode, sample_tokens
from llava_jax.models.llama import KVCache, Llama
from llava_jax.models.llava import Llava
from llava_jax.models.platform import PlatformJit, arrays_platform

NO_TOKEN = -1  # in chunk outputs: the row was already done, or the step did not run


@dataclasses.dataclass
class Chunk:
    """What one streaming step delivers.

    tokens[b]: new tokens of row b in this chunk (EOS excluded; empty once the row is finished).
    finish[b]: None while row b runs, then why it ended: 'eos' (an EOS id was generated), 'stop' (the
    caller asked), 'length' (max_new_tokens reached).
    """

    tokens: list[list[int]]
    finish: list[str | None]


class DecodeState(NamedTuple):
    """Device-side decode carry. B = padded batch."""

    cache: KVCache
    token: jax.Array  # [B] int32, last sampled token, next to be fed
    position: jax.Array  # [B] int32, that token's position
    done: jax.Array  # [B] bool
    step: jax.Array  # int32 scalar, new tokens sampled so far (indexes the sampling key)
    key: jax.Array  # base PRNG key


def bucket(n: int, minimum: int = 16, step: int = 128) -> int:
    """Static size for n: the next power of two (at least `minimum`) up to 256, then multiples of
    `step`. Decode reads the whole KV cache every step, so its length tracks the need closely (a
    289-token prompt + 64 new tokens: 384 + 63 -> 512 slots, not 1024)."""
    if n <= 256:
        return max(minimum, 1 << max(0, n - 1).bit_length())
    return -(-n // step) * step


# `generate` pads prompts and sizes caches in finer steps beyond 256: prefill computes every padding
# slot and decode reads every cache slot, so a 289-token LLaVA prompt (256 image tokens) is prefilled
# at 320 slots (not 384) and decoded over a 384-slot cache (not 512). Twice the shapes of `bucket`'s
# default, each compiled once.
LENGTH_STEP = 64


def _language_model(model) -> Llama:
    return model.language_model if isinstance(model, Llava) else model


def _is_eos(tokens: jax.Array, eos: jax.Array) -> jax.Array:
    return jnp.any(tokens[:, None] == eos[None, :], axis=-1)


def _prefill_impl(
    graphdef,
    params,
    layers,
    ids,
    images,
    positions,
    segment_ids,
    active,
    eos,
    values,
    key,
    *,
    mode: SamplingMode,
    cache_length: int,
):
    """ids/positions/segment_ids [B, P]; images [B, M, S, S, 3] or None; active [B] bool; layers: the
    LLM blocks' `layer_states()` (the cache is then kept per layer and the layers run unrolled) or
    None (stacked cache, scanned layers).
    Returns (first new tokens [B] int32 with NO_TOKEN for inactive rows, DecodeState)."""
    model = nnx.merge(graphdef, params)
    lm = _language_model(model)
    embeddings = model.embed(ids, images) if isinstance(model, Llava) else lm.embed(ids)
    per_layer = layers is not None
    cache = KVCache.init(lm.cfg, ids.shape[0], cache_length, per_layer=per_layer)
    hidden, cache = lm.hidden(
        embeddings,
        positions=positions,
        segment_ids=segment_ids,
        cache=cache,
        prefill=True,
        layers=lm.layer_list(layers) if per_layer else None,
    )
    logits = lm.logits(hidden[:, -1:])[:, 0]
    token = sample_tokens(logits, jax.random.fold_in(key, 0), mode, values)
    done = ~active | _is_eos(token, eos)
    state = DecodeState(cache, token, positions[:, -1] + 1, done, jnp.int32(1), key)
    return jnp.where(active, token, NO_TOKEN), state


def _decode_impl(
    graphdef, params, layers, state: DecodeState, steps, stop, eos, values, *, mode: SamplingMode, chunk: int
):
    """Up to `steps` (<= chunk) decode steps; rows in `stop` [B] bool are marked done first. `layers`
    as in `_prefill_impl`, the same for the whole call.
    Returns (tokens [B, chunk] int32, NO_TOKEN where none was produced, DecodeState)."""
    lm = _language_model(nnx.merge(graphdef, params))
    layers = None if layers is None else lm.layer_list(layers)
    b = state.token.shape[0]
    ones = jnp.ones((b, 1), jnp.int32)

    def cond(carry):
        i, s, _ = carry
        return (i < steps) & ~jnp.all(s.done)

    def body(carry):
        i, s, out = carry
        hidden, cache = lm.hidden(
            lm.embed(s.token[:, None]), positions=s.position[:, None], segment_ids=ones, cache=s.cache, layers=layers
        )
        logits = lm.logits(hidden)[:, 0]
        token = sample_tokens(logits, jax.random.fold_in(s.key, s.step), mode, values)
        out = out.at[:, i].set(jnp.where(s.done, NO_TOKEN, token))
        done = s.done | _is_eos(token, eos)
        return i + 1, DecodeState(cache, token, s.position + 1, done, s.step + 1, s.key), out

    state = state._replace(done=state.done | stop)
    out = jnp.full((b, chunk), NO_TOKEN, jnp.int32)
    _, state, out = jax.lax.while_loop(cond, body, (jnp.int32(0), state, out))
    return out, state


def _split_layers_impl(graphdef, params):
    return _language_model(nnx.merge(graphdef, params)).layer_states()


# Jitted per platform with its compiler options (models/platform.py), chosen on the first call.
_split_layers = PlatformJit(_split_layers_impl, static_argnames=("graphdef",))
_prefill = PlatformJit(_prefill_impl, static_argnames=("graphdef", "mode", "cache_length"))
_decode = PlatformJit(_decode_impl, static_argnames=("graphdef", "mode", "chunk"), donate_argnames=("state",))


# The layer states of the most recent parameters: (graphdef, weak references to their leaves, states).
# Calls on the same model reuse them; they are dropped as soon as any of those leaves is freed.
_recent_layers: list = []


def _layer_states(graphdef, params) -> list[nnx.State]:
    """The LLM blocks' `layer_states()` for these parameters, sliced once per model (not per call)."""
    leaves = jax.tree.leaves(params)
    if _recent_layers:
        known, refs, states = _recent_layers[0]
        if known == graphdef and len(refs) == len(leaves) and all(r() is x for r, x in zip(refs, leaves, strict=True)):
            return states
    states = _split_layers(graphdef, params)
    refs = [weakref.ref(x, lambda _: _recent_layers.clear()) for x in leaves]
    _recent_layers[:] = [(graphdef, refs, states)]
    return states


class _Batch(NamedTuple):
    ids: np.ndarray  # [Bp, P] int32, left-padded
    positions: np.ndarray  # [Bp, P] int32
    segment_ids: np.ndarray  # [Bp, P] int32
    active: np.ndarray  # [Bp] bool (False for batch-padding rows)
    images: np.ndarray | None  # [Bp, M, S, S, 3]
    longest: int


def _as_lists(prompts, lengths) -> list[list[int]]:
    if isinstance(prompts, (np.ndarray, jax.Array)):
        arr = np.asarray(prompts)
        if arr.ndim != 2:
            raise ValueError(f"prompts array must be [B, L] token ids, got shape {arr.shape}")
        if lengths is None:
            lengths = [arr.shape[1]] * arr.shape[0]
        lengths = [int(n) for n in np.asarray(lengths).reshape(-1)]
        if len(lengths) != arr.shape[0]:
            raise ValueError(f"lengths has {len(lengths)} entries for {arr.shape[0]} prompt rows")
        if any(not 0 <= n <= arr.shape[1] for n in lengths):
            raise ValueError(f"lengths {lengths} must lie in [0, {arr.shape[1]}] (the prompts array width)")
        return [arr[b, :n].tolist() for b, n in enumerate(lengths)]
    if lengths is not None:
        raise ValueError("lengths is only for a padded prompts array; a list of token-id lists carries its own")
    return [[int(t) for t in p] for p in prompts]


def _prepare(
    model, prompts: list[list[int]], images, max_new_tokens: int, min_prompt_length: int = 0, rows: int | None = None
) -> _Batch:
    lm = _language_model(model)
    cfg = lm.cfg
    if not prompts:
        raise ValueError("prompts is empty: pass at least one list of token ids")
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 1")
    for b, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {b} is empty: every row needs at least one token (e.g. BOS)")
        bad = [t for t in p if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt {b} has token ids {bad[:5]} outside the vocabulary [0, {cfg.vocab_size})")
    longest = max(len(p) for p in prompts)
    context = cfg.context_length
    if min_prompt_length > context:
        raise ValueError(f"min_prompt_length={min_prompt_length} exceeds the model context of {context} tokens")
    if longest + max_new_tokens > context:
        raise ValueError(
            f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} = {longest + max_new_tokens} exceeds the "
            f"model context of {context} tokens (max_position_embeddings x RoPE factor); shorten the prompt or set "
            f"max_new_tokens <= {max(context - longest, 0)}"
        )

    n = len(prompts)
    if rows is None:
        rows = 1 << (n - 1).bit_length()
    elif rows < n:
        raise ValueError(f"rows={rows} is fewer than the {n} prompts; pass rows >= the number of prompts")
    width = bucket(max(longest, min_prompt_length), step=LENGTH_STEP)
    ids = np.zeros((rows, width), np.int32)
    positions = np.zeros((rows, width), np.int32)
    segment_ids = np.zeros((rows, width), np.int32)
    for b in range(rows):
        p = prompts[b] if b < n else prompts[0][:1]  # batch-padding rows: one token, inactive
        ids[b, width - len(p) :] = p
        positions[b, width - len(p) :] = np.arange(len(p))
        segment_ids[b, width - len(p) :] = 1
    active = np.arange(rows) < n

    if isinstance(model, Llava):
        images = _check_images(model, prompts, images, rows)
    elif images is not None:
        raise ValueError("images were given but the model is a bare Llama (text only); pass a Llava model")
    return _Batch(ids, positions, segment_ids, active, images, longest)


def _check_images(model: Llava, prompts: list[list[int]], images, rows: int) -> np.ndarray | None:
    cfg = model.cfg
    per_image = cfg.num_image_tokens
    counts = [sum(t == cfg.image_token_id for t in p) for p in prompts]
    if images is None:
        if any(counts):
            raise ValueError(
                f"prompts contain image tokens (id {cfg.image_token_id}, counts {counts}) but images "
                "is None; pass images [B, M, S, S, 3] or remove the image tokens"
            )
        return None
    images = np.asarray(images)
    if images.ndim == 4:
        images = images[:, None]
    size = cfg.vision.image_size
    if images.ndim != 5 or images.shape[0] != len(prompts) or images.shape[2:] != (size, size, 3):
        raise ValueError(
            f"images must be [B={len(prompts)}, M, {size}, {size}, 3] (or [B, {size}, {size}, 3]), got {images.shape}"
        )
    slots = images.shape[1] * per_image
    for b, c in enumerate(counts):
        if c % per_image or c > slots:
            raise ValueError(
                f"prompt {b} has {c} image tokens; it needs a multiple of {per_image} (one image) and "
                f"at most {slots} ({images.shape[1]} image slots per row)"
            )
    if rows > len(prompts):
        images = np.concatenate([images, np.zeros((rows - len(prompts), *images.shape[1:]), images.dtype)])
    return images


def stream_generate(
    model: Llava | Llama,
    prompts: Sequence[Sequence[int]] | np.ndarray,
    images: np.ndarray | None = None,
    *,
    max_new_tokens: int,
    sampling: Sampling = GREEDY,
    eos_ids: Iterable[int] = (2,),
    seed: int = 0,
    chunk_size: int = 16,
    lengths: Sequence[int] | None = None,
    min_prompt_length: int = 0,
    rows: int | None = None,
    place: Callable[[np.ndarray], jax.Array] | None = None,
) -> Generator[Chunk, Iterable[int] | None, list[list[int]]]:
    """Generate for a batch, yielding a `Chunk` (new tokens per row) as decoding proceeds.

    Arguments are those of `generate`. The first chunk holds each row's first token (right after
    prefill); later chunks hold up to `chunk_size` tokens per row. `gen.send(rows)` with an iterable
    of row indices stops those rows (e.g. a stop string appeared); `next(gen)` / a for-loop continues
    unchanged. The generator's return value is the full result, as `generate` returns it.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    prompt_lists = _as_lists(prompts, lengths)
    batch = _prepare(model, prompt_lists, images, max_new_tokens, min_prompt_length, rows)
    put = place or jnp.asarray
    n = len(prompt_lists)
    eos_set, eos = _eos_table(eos_ids)
    mode, values = sampling.mode, sampling.values
    graphdef, params = nnx.split(model)
    # On CPU the layers' weights are sliced out of their stacks once per call (a copy), then prefill
    # and every decode step read them in place; a scanned stack would copy each layer's weights at
    # every step (XLA:CPU materialises the dynamic slice). Elsewhere the stacks are scanned (no
    # second copy of the weights in device memory).
    layers = _layer_states(graphdef, params) if arrays_platform(params) == "cpu" else None
    first, state = _start(graphdef, params, layers, batch, put, max_new_tokens, eos, values, seed, mode)
    remaining = max_new_tokens - 1
    stop = np.zeros(batch.ids.shape[0], bool)
    result: list[list[int]] = [[] for _ in range(n)]
    finish: list[str | None] = [None] * n

    in_flight = first[:, None]
    while in_flight is not None:
        following = None
        if remaining > 0 and not all(finish):  # keep the device busy while the host reads `in_flight`
            steps = min(chunk_size, remaining)
            remaining -= steps
            following, state = _decode(
                graphdef,
                params,
                layers,
                state,
                np.int32(steps),
                put(stop.copy()),
                eos,
                values,
                mode=mode,
                chunk=chunk_size,
            )
            stop[:] = False
        new = _read_chunk(np.asarray(in_flight), finish, eos_set)
        for b in range(n):
            result[b].extend(new[b])
        if following is None:
            finish = [f or "length" for f in finish]
        request = yield Chunk(new, list(finish))
        _stop_rows(request, finish, stop)
        in_flight = None if all(finish) else following
    return result


def _eos_table(eos_ids: Iterable[int]) -> tuple[set[int], np.ndarray]:
    """The EOS ids as a set (host) and as a fixed-size int32 array padded with NO_TOKEN (device): a fixed
    size means other EOS sets do not recompile."""
    eos_set = {int(t) for t in eos_ids}
    eos = np.full(bucket(len(eos_set), minimum=4), NO_TOKEN, np.int32)
    eos[: len(eos_set)] = sorted(eos_set)
    return eos_set, eos


def _start(
    graphdef, params, layers, batch: _Batch, put, max_new_tokens: int, eos, values, seed: int, mode: SamplingMode
):
    """Prefill with a cache long enough for the prompt bucket and the new tokens; `put` places each
    host array on devices. Returns (first tokens [Bp] int32, DecodeState)."""
    cache_length = bucket(batch.ids.shape[1] + max_new_tokens - 1, step=LENGTH_STEP)
    return _prefill(
        graphdef,
        params,
        layers,
        put(batch.ids),
        None if batch.images is None else put(batch.images),
        put(batch.positions),
        put(batch.segment_ids),
        put(batch.active),
        eos,
        values,
        jax.random.key(seed),
        mode=mode,
        cache_length=cache_length,
    )


def _read_chunk(tokens: np.ndarray, finish: list[str | None], eos_set: set[int]) -> list[list[int]]:
    """New tokens per running row from a device chunk `tokens` [Bp, C]: up to the first NO_TOKEN or EOS
    (EOS excluded). Rows that hit an EOS are marked 'eos' in `finish` (edited in place)."""
    new: list[list[int]] = [[] for _ in finish]
    for b in range(len(finish)):
        if finish[b] is not None:
            continue
        for t in tokens[b].tolist():
            if t == NO_TOKEN:
                break
            if t in eos_set:
                finish[b] = "eos"
                break
            new[b].append(t)
    return new


def _stop_rows(request: Iterable[int] | None, finish: list[str | None], stop: np.ndarray) -> None:
    """Marks the rows the caller asked to stop as 'stop' in `finish` and in the device mask `stop` [Bp]."""
    n = len(finish)
    for r in request or ():
        if not 0 <= r < n:
            raise ValueError(f"cannot stop row {r}: the batch has rows 0..{n - 1}")
        if finish[r] is None:
            finish[r], stop[r] = "stop", True


def generate(
    model: Llava | Llama,
    prompts: Sequence[Sequence[int]] | np.ndarray,
    images: np.ndarray | None = None,
    *,
    max_new_tokens: int,
    sampling: Sampling = GREEDY,
    eos_ids: Iterable[int] = (2,),
    seed: int = 0,
    stream: Callable[[Chunk], Iterable[int] | None] | None = None,
    chunk_size: int = 16,
    lengths: Sequence[int] | None = None,
    min_prompt_length: int = 0,
    rows: int | None = None,
    place: Callable[[np.ndarray], jax.Array] | None = None,
) -> list[list[int]]:
    """Generate up to `max_new_tokens` new tokens for each prompt; returns them per row (EOS excluded).

    model: `Llava` (prompts may hold `cfg.num_image_tokens` image tokens per image) or `Llama`.
    prompts: B token-id lists of any lengths, or an array [B, L] with `lengths` [B] (row b is
        `prompts[b, :lengths[b]]`). Left padding and batch bucketing happen inside.
    images: `Llava` only: [B, M, S, S, 3] (or [B, S, S, 3]) uint8 pixels or CLIP-normalised float;
        the k-th image token run of a row takes image k of that row; rows without image tokens ignore
        their slots. Used at prefill only.
    sampling: `Sampling(temperature, top_p, top_k)`; temperature 0 (default) is greedy.
    eos_ids: ids that end a row (the EOS itself is not returned); other rows continue.
    seed: seeds `jax.random`; the same seed, batch and settings give the same tokens.
    stream: called with each `Chunk` as it arrives; returning row indices stops those rows.
    chunk_size: decode steps per device call (the streaming granularity).
    min_prompt_length: pad prompts to at least this many slots (its bucket), so that batches with
        shorter prompts run the same compiled shapes (and the same reduction order).
    rows: the exact batch row count to compile for (>= len(prompts); default: the next power of two).
    place: puts each host array [B, ...] on devices (e.g. rows split over a mesh); default
        `jnp.asarray` (the default device).

    Raises ValueError when the longest prompt + max_new_tokens exceeds the model's context
    (`LlamaConfig.context_length`: max_position_embeddings, times the RoPE scaling factor).
    """
    gen = stream_generate(
        model,
        prompts,
        images,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        eos_ids=eos_ids,
        seed=seed,
        chunk_size=chunk_size,
        lengths=lengths,
        min_prompt_length=min_prompt_length,
        rows=rows,
        place=place,
    )
    request = None
    try:
        while True:
            chunk = gen.send(request)
            request = stream(chunk) if stream is not None else None
    except StopIteration as end:
        return end.value
