"""A fixed-size batch of decode slots that requests enter and leave between decode chunks (continuous
batching), for `Llava` and `Llama`.

The device holds B slots (B = `slots`), one KV cache [L, B, K, S, H] (per layer on a CPU, see below)
with one write index shared by all slots (as in `generate`), and per slot: the last token, its
position, done, tokens sampled so far, the sampling seed, the token budget and the sampling values.
Between chunks the host may

- `admit` n new prompts: they are prefilled in groups of one length bucket P (`serve_bucket`, at
  least `MIN_WIDTH`) and image use (each left-padded to P; text prompts never pay for an image
  prompt's width or for the vision tower), in calls of 2^k rows with no padding rows (`groups`), and
  each one's P cache slots are written, one row per call, into a free slot's row so that they end at
  the shared write index; the rest of that row is marked empty (segment id 0);
- `run` one chunk of up to `chunk` decode steps for all slots (free slots compute and are ignored),
  optionally ending early after the step in which a row ends (`until_one_ends`);
- `release` a slot (its request ended): the slot is free for the next `admit`.

The shared index only grows; when a newcomer's P slots do not fit before it, or the slots'
remaining budgets do not fit after it, the cache is rebased: every row moves left by the oldest
running row's start (or right, to make room), into a buffer whose length S is the bucketed need.
So S tracks the running rows (not the model context), and decode reads no more cache than they need.

Sampling is per row: row b's t-th token uses key `fold_in(key(seed_b), t)` (as a batch of one in
`generate` with that seed), with its own temperature / top-k / top-p values. Two decode programs
serve every setting: greedy, and sampled with both filters on (`SAMPLED`; a request without top-k
or top-p gets values that keep every token), so greedy rows share a batch with greedy rows and
sampled rows with sampled rows. Prefill serves both (greedy is an input, not a compiled choice).

Every program's shapes come from a short list (prompt buckets x 2^k rows for prefill; cache
lengths S for decode; (P, S) for insertion; (S, S') for rebasing), so `compile_all` can compile all
that requests within a server's limits can need, and serving then compiles nothing.

On a CPU the programs are compiled with `models.platform.cpu_compiler_options` (XLA's own dot
emitter instead of YNNPACK fusions, faster at LLaMA widths); the choice is made at the first
`SlotBatch`, not at import. Also on a CPU (as in `generate`), the cache is kept per layer (L arrays
[B, K, S, H]) and the layers run unrolled on weights sliced out of their stacks once per model, so
no decode step copies a layer's weights or cache; elsewhere the cache is stacked and the layers
scanned. Prefill attends among the prompt's own tokens (its cache is exactly the prompt's P slots).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llava_jax.inference.generate import NO_TOKEN, _is_eos, _language_model, _layer_states, bucket
from llava_jax.inference.sampling import Sampling, SamplingMode, sample_tokens
from llava_jax.models.llama import KVCache
from llava_jax.models.llava import Llava
from llava_jax.models.platform import arrays_platform, cpu_compiler_options, platform


class SlotState(NamedTuple):
    """Device-side state of the slot batch. B = slots."""

    cache: KVCache  # k/v [L, B, K, S, H] or L per-layer [B, K, S, H], segment_ids [B, S], one write index
    token: jax.Array  # [B] int32, last sampled token, next to be fed
    position: jax.Array  # [B] int32, that token's position
    done: jax.Array  # [B] bool
    step: jax.Array  # [B] int32, tokens sampled so far (indexes the row's sampling key)
    seed: jax.Array  # [B] uint32
    limit: jax.Array  # [B] int32, the row's token budget
    values: jax.Array  # [B, 3] float32 sampling values (`Sampling.values`)


GREEDY_MODE = SamplingMode(greedy=True, top_k=False, top_p=False)
# Every sampled row runs with both filters on; a request without one gets values that keep every
# token (k = vocabulary, p = 2: the nucleus mass never reaches it), so its tokens are those of its own
# `Sampling.mode` while all sampled requests share one program and one slot batch.
SAMPLED = SamplingMode(greedy=False, top_k=True, top_p=True)


def engine_mode(sampling: Sampling) -> SamplingMode:
    """The slot batch's program for `sampling`: `GREEDY_MODE` or `SAMPLED`."""
    return GREEDY_MODE if sampling.mode.greedy else SAMPLED


def row_values(sampling: Sampling, vocab: int) -> np.ndarray:
    """float32 [3] (temperature, k, p) for `SAMPLED` (filters off by value: k = vocab, p = 2)."""
    t = sampling.temperature if sampling.temperature > 0 else 1.0
    k = float(sampling.top_k) if sampling.top_k is not None else float(vocab)
    p = float(sampling.top_p) if sampling.top_p is not None else 2.0
    return np.asarray([t, k, p], np.float32)


def serve_bucket(n: int) -> int:
    """Static length for n prompt or cache slots: powers of two from 16 to 256 (as `generate.bucket`),
    then alternately x1.5 and x4/3 (384, 512, 768, 1024, 1536, ...): each at most 1.5x the need, and
    few enough that a server can compile them all at start-up."""
    if n <= 256:
        return bucket(n)
    p = 1 << (n - 1).bit_length()
    return 3 * p // 4 if 3 * p // 4 >= n else p


# Prompts are prefilled at >= MIN_WIDTH slots: chat templates make shorter prompts rare, and each
# prefill width is a program to compile at start-up.
MIN_WIDTH = 64


def serve_buckets(low: int, high: int) -> list[int]:
    """Every `serve_bucket` value that n in [low, high] can take, ascending."""
    out, n = [], low
    while n <= high:
        out.append(serve_bucket(n))
        n = out[-1] + 1
    return out


def _sample_rows(logits, seed, step, mode: SamplingMode, values):
    """logits [B, V] -> tokens [B] int32, row b sampled with key fold_in(key(seed[b]), step[b])."""
    if mode.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def one(row, s, t, v):
        return sample_tokens(row[None], jax.random.fold_in(jax.random.key(s), t), mode, v)[0]

    return jax.vmap(one)(logits, seed, step, values)


def _prefill(graphdef, params, layers, ids, images, positions, segment_ids, seed, values, greedy):
    """ids/positions/segment_ids [n, P]; images [n, M, S, S, 3] or None; seed [n]; values [n, 3] (as
    `row_values` gives them); greedy: bool scalar (argmax, or sampling in `SAMPLED`); layers: the LLM
    blocks' `layer_states()` (per-layer cache, unrolled layers) or None (stacked, scanned).
    Returns (first tokens [n], rows): rows[i] = (k, v, segment ids) of prompt i, k and v
    [L, 1, K, P, H] or L x [1, K, P, H], segment ids [1, P], ready for `_insert`."""
    model = nnx.merge(graphdef, params)
    lm = _language_model(model)
    embeddings = model.embed(ids, images) if isinstance(model, Llava) else lm.embed(ids)
    per_layer = layers is not None
    cache = KVCache.init(lm.cfg, ids.shape[0], ids.shape[1], per_layer=per_layer)
    hidden, cache = lm.hidden(
        embeddings,
        positions=positions,
        segment_ids=segment_ids,
        cache=cache,
        prefill=True,
        layers=lm.layer_list(layers) if per_layer else None,
    )
    logits = lm.logits(hidden[:, -1:])[:, 0]
    step = jnp.zeros_like(seed, jnp.int32)
    token = jax.lax.cond(
        greedy,
        lambda: _sample_rows(logits, seed, step, GREEDY_MODE, values),
        lambda: _sample_rows(logits, seed, step, SAMPLED, values),
    )

    def row(x, i):  # [L, n, K, P, H] or [n, K, P, H] -> row i, batch axis kept
        return x[:, i : i + 1] if x.ndim == 5 else x[i : i + 1]

    rows = tuple(
        (
            jax.tree.map(lambda x, i=i: row(x, i), cache.k),
            jax.tree.map(lambda x, i=i: row(x, i), cache.v),
            cache.segment_ids[i : i + 1],
        )
        for i in range(ids.shape[0])
    )
    return token, rows


def _rebase(state: SlotState, shift, *, length: int) -> SlotState:
    """Every row's cache slot j + shift moves to slot j, in a buffer of `length` slots (slots that come
    from outside the old buffer are empty); the write index moves by -shift."""
    cache = state.cache
    source = jnp.arange(length) + shift
    inside = (source >= 0) & (source < cache.segment_ids.shape[1])
    source = jnp.clip(source, 0, cache.segment_ids.shape[1] - 1)

    def move(x):  # [L, B, K, S, H] or [B, K, S, H]: the slot axis is the second last
        return jnp.take(x, source, axis=x.ndim - 2)

    k, v = jax.tree.map(move, cache.k), jax.tree.map(move, cache.v)
    segment_ids = jnp.where(inside[None], jnp.take(cache.segment_ids, source, axis=1), 0)
    return state._replace(cache=KVCache(k, v, segment_ids, cache.index - shift))


def _insert(state: SlotState, slot, k, v, segment_ids, token, position, done, seed, limit, values) -> SlotState:
    """Writes one prefilled row into `slot` (int32 scalar): k/v [L, 1, K, P, H] (or L x [1, K, P, H], as
    the state's cache is kept) end at the write index, segment_ids [1, P]; token, position, done, seed,
    limit scalars; values [3]. One row per call, so the programs differ only by (P, S)."""
    cache = state.cache
    start = cache.index - segment_ids.shape[1]

    def put(dst, src):
        if dst.ndim == 5:  # stacked [L, B, K, S, H]
            return jax.lax.dynamic_update_slice(dst, src.astype(dst.dtype), (0, slot, 0, start, 0))
        return jax.lax.dynamic_update_slice(dst, src.astype(dst.dtype), (slot, 0, start, 0))

    ks, vs = jax.tree.map(put, cache.k, k), jax.tree.map(put, cache.v, v)
    seg = jax.lax.dynamic_update_slice(
        cache.segment_ids, jnp.zeros((1, cache.segment_ids.shape[1]), jnp.int32), (slot, 0)
    )
    seg = jax.lax.dynamic_update_slice(seg, segment_ids.astype(seg.dtype), (slot, start))
    new = {
        "token": token,
        "position": position,
        "done": done,
        "step": 1,
        "seed": seed,
        "limit": limit,
        "values": values,
    }
    fields = {name: getattr(state, name).at[slot].set(x) for name, x in new.items()}
    return SlotState(KVCache(ks, vs, seg, cache.index), **fields)


def _empty(*, cfg, slots: int, length: int, per_layer: bool) -> SlotState:
    """A slot batch with every slot free and a cache of `length` slots."""
    return SlotState(
        KVCache.init(cfg, slots, length, per_layer=per_layer),
        jnp.zeros(slots, jnp.int32),
        jnp.zeros(slots, jnp.int32),
        jnp.ones(slots, bool),
        jnp.zeros(slots, jnp.int32),
        jnp.zeros(slots, jnp.uint32),
        jnp.ones(slots, jnp.int32),
        jnp.ones((slots, 3), jnp.float32),
    )


def _run(
    graphdef, params, layers, state: SlotState, steps, free, eos, until_one_ends, *, mode: SamplingMode, chunk: int
):
    """Up to `steps` (<= chunk) decode steps; slots in `free` [B] bool are marked done first; with
    `until_one_ends` (bool scalar) the chunk also ends after the first step in which a row ends (EOS
    or budget), so that a waiting request can take its slot at once. `layers` as in `_prefill`
    (given exactly when the state's cache is per layer).
    Returns (tokens [B, chunk] int32, NO_TOKEN where none was produced, the write index after the
    chunk (a buffer of its own: the state's is donated to the next call), SlotState)."""
    lm = _language_model(nnx.merge(graphdef, params))
    layers = None if layers is None else lm.layer_list(layers)
    b = state.token.shape[0]
    ones = jnp.ones((b, 1), jnp.int32)

    def cond(carry):
        i, s, _, ended = carry
        return (i < steps) & ~jnp.all(s.done) & ~(until_one_ends & ended)

    def body(carry):
        i, s, out, _ = carry
        hidden, cache = lm.hidden(
            lm.embed(s.token[:, None]), positions=s.position[:, None], segment_ids=ones, cache=s.cache, layers=layers
        )
        token = _sample_rows(lm.logits(hidden)[:, 0], s.seed, s.step, mode, s.values)
        out = out.at[:, i].set(jnp.where(s.done, NO_TOKEN, token))
        done = s.done | _is_eos(token, eos) | (s.step + 1 >= s.limit)
        ended = jnp.any(done & ~s.done)
        s = s._replace(cache=cache, token=token, position=s.position + 1, done=done, step=s.step + 1)
        return i + 1, s, out, ended

    state = state._replace(done=state.done | free)
    out = jnp.full((b, chunk), NO_TOKEN, jnp.int32)
    _, state, out, _ = jax.lax.while_loop(cond, body, (jnp.int32(0), state, out, jnp.bool_(False)))
    return out, state.cache.index + 0, state


class Programs(NamedTuple):
    """The jitted slot-batch programs (one set per XLA option set)."""

    prefill: Callable
    rebase: Callable
    insert: Callable
    run: Callable
    empty: Callable


@functools.cache
def programs(options: tuple[tuple[str, str], ...] = ()) -> Programs:
    """The slot programs compiled with XLA `options` ((name, value) pairs; () = XLA's defaults)."""
    opts = dict(options) or None
    return Programs(
        prefill=jax.jit(_prefill, static_argnames=("graphdef",), compiler_options=opts),
        rebase=jax.jit(_rebase, static_argnames=("length",), compiler_options=opts),
        insert=jax.jit(_insert, donate_argnames=("state",), compiler_options=opts),
        run=jax.jit(
            _run, static_argnames=("graphdef", "mode", "chunk"), donate_argnames=("state",), compiler_options=opts
        ),
        empty=jax.jit(_empty, static_argnames=("cfg", "slots", "length", "per_layer"), compiler_options=opts),
    )


def platform_programs() -> Programs:
    """The slot programs for the default platform: on a CPU with XLA's own dot emitter
    (`models.platform.cpu_compiler_options`), elsewhere with XLA's defaults. Decided on first use (the
    decision compiles a probe), never at import."""
    return programs(tuple(sorted((cpu_compiler_options(platform()) or {}).items())))


@dataclasses.dataclass
class _Slot:
    """Host-side record of a running row: where its cache block starts, its budget and tokens so far."""

    start: int  # first real (non-padding) cache slot of its prompt
    limit: int
    produced: int = 0


@dataclasses.dataclass
class _Pending:
    """A decode chunk dispatched to the device and not yet read back."""

    tokens: jax.Array  # [B, chunk] int32
    index: jax.Array  # the write index after the chunk
    rows: dict[int, _Slot]  # the running rows when it was dispatched (slot -> record)
    steps: int
    settled: bool = False  # `index` has been read into the host mirror


class SlotBatch:
    """The continuous-batching engine: B decode slots over one KV cache (see the module docstring).

    Args:
      model: `Llava` or `Llama`.
      slots: B, the most rows decoding together.
      chunk: decode steps per `run` call.
      eos_ids: ids that end a row.
    """

    def __init__(self, model, *, slots: int, chunk: int, eos_ids=(2,)):
        if slots < 1 or chunk < 1:
            raise ValueError(f"slots={slots} and chunk={chunk} must be >= 1")
        self.model = model
        self.slots = slots
        self.chunk = chunk
        self.eos_set = {int(t) for t in eos_ids}
        self._eos = np.full(bucket(len(self.eos_set), minimum=4), NO_TOKEN, np.int32)
        self._eos[: len(self.eos_set)] = sorted(self.eos_set)
        self._graphdef, self._params = nnx.split(model)
        self._jit = platform_programs()
        # On a CPU: the per-layer cache and the layers' weights sliced once (as `generate` does).
        self._layers = _layer_states(self._graphdef, self._params) if arrays_platform(self._params) == "cpu" else None
        self.context = _language_model(model).cfg.context_length
        self.vocab = _language_model(model).cfg.vocab_size
        self.reset()

    def reset(self) -> None:
        """Free every slot (the device state is rebuilt at the next `admit`)."""
        self.rows: dict[int, _Slot] = {}
        self.mode: SamplingMode | None = None
        self._state: SlotState | None = None
        self._index = 0  # the device write index, mirrored (before the chunk in flight, if unsettled)
        self._pending: _Pending | None = None  # the chunk in flight (`run(ahead=True)`)

    @property
    def free(self) -> list[int]:
        return [b for b in range(self.slots) if b not in self.rows]

    @property
    def length(self) -> int:
        """The cache's slot count S (0 before the first admission)."""
        return 0 if self._state is None else self._state.cache.segment_ids.shape[1]

    def _span(self) -> tuple[int, int]:
        """(longest running row's cache span up to the write index, largest remaining budget)."""
        if not self.rows:
            return 0, 0
        return (
            max(self._index - r.start for r in self.rows.values()),
            max(r.limit - r.produced for r in self.rows.values()),
        )

    def fits(self, prompt_length: int, max_tokens: int, sampling: Sampling, joining=()) -> bool:
        """Whether a request can join now: a free slot, the same program (`engine_mode`: greedy with
        greedy, sampled with sampled), and the running rows' longest span plus the largest remaining
        budget within the context (so the batch never needs more cache than one context-filling
        request). `joining`: (prompt length, max tokens) of requests already accepted for this
        admission."""
        if len(self.rows) + len(joining) >= self.slots:
            return False
        if self.rows and engine_mode(sampling) != self.mode:
            return False
        span, remaining = self._span()
        for p, m in (*joining, (prompt_length, max_tokens)):
            span, remaining = max(span, p), max(remaining, m)
        return span + remaining <= self.context

    def groups(self, prompts: list[list[int]], images) -> list[list[int]]:
        """How `admit` prefills `prompts`: lists of prompt indices, one prefill call each. Prompts of one
        length bucket (`serve_bucket`) and image use share calls (a text prompt never pays for an image
        prompt's width or for the vision tower), in calls of 2^k rows from the largest (7 prompts:
        4 + 2 + 1), so no call computes padding rows."""
        image_id = getattr(getattr(self.model, "cfg", None), "image_token_id", None)
        keys: dict[tuple[bool, int], list[int]] = {}
        for i, p in enumerate(prompts):
            has_image = images is not None and image_id is not None and image_id in p
            keys.setdefault((has_image, serve_bucket(max(MIN_WIDTH, len(p)))), []).append(i)
        out = []
        for members in keys.values():
            while members:
                size = 1 << (len(members).bit_length() - 1)
                out.append(members[:size])
                members = members[size:]
        return out

    def admit(self, prompts: list[list[int]], images, limits: list[int], seeds: list[int], sampling: list[Sampling]):
        """Prefill `prompts` (token-id lists; `images` [n, M, S, S, 3] or None) into free slots, in the
        calls that `groups` names. The caller has checked each with `fits`. Returns (slot per prompt,
        first token per prompt)."""
        n = len(prompts)
        modes = {engine_mode(s) for s in sampling}
        if len(modes) != 1 or (self.rows and self.mode not in modes):
            raise ValueError(
                f"rows of one slot batch are all greedy or all sampled; got {modes} (running: {self.mode})"
            )
        if n > len(self.free):
            raise ValueError(f"{n} prompts for {len(self.free)} free slots")
        self.mode = modes.pop()
        groups = self.groups(prompts, images)
        prefilled = [self._prefill(group, prompts, images, seeds, sampling) for group in groups]
        self._settle()
        self._make_room(max(rows[0][2].shape[1] for _, rows, _, _ in prefilled), max(limits))
        slots = self.free[:n]
        first = [0] * n
        for group, (tokens, rows, seed, values) in zip(groups, prefilled, strict=True):
            for r, (i, t) in enumerate(zip(group, np.asarray(tokens).tolist(), strict=True)):
                first[i] = t
                done = t in self.eos_set or limits[i] <= 1
                self._insert(slots[i], rows[r], t, len(prompts[i]), done, seed[r], limits[i], values[r])
        for i, b in enumerate(slots):
            self.rows[b] = _Slot(start=self._index - len(prompts[i]), limit=limits[i], produced=1)
        return slots, first

    def _insert(self, slot: int, row, token: int, position: int, done: bool, seed, limit: int, values) -> None:
        """Write one prefilled row (`_prefill`'s (k, v, segment ids)) into `slot`."""
        k, v, seg = row
        self._state = self._jit.insert(
            self._state,
            np.int32(slot),
            k,
            v,
            seg,
            np.int32(token),
            np.int32(position),
            np.bool_(done),
            np.uint32(seed),
            np.int32(limit),
            np.asarray(values, np.float32),
        )

    def _prefill(self, group: list[int], prompts, images, seeds, sampling):
        """One prefill call for `prompts[i]`, i in `group`, left-padded to their length bucket.
        Returns (first tokens, per-row (k, v, segment ids), seeds, sampling values) of the rows."""
        width = serve_bucket(max(MIN_WIDTH, *(len(prompts[i]) for i in group)))
        ids = np.zeros((len(group), width), np.int32)
        positions = np.zeros((len(group), width), np.int32)
        segment_ids = np.zeros((len(group), width), np.int32)
        for r, i in enumerate(group):
            p = prompts[i]
            ids[r, width - len(p) :] = p
            positions[r, width - len(p) :] = np.arange(len(p))
            segment_ids[r, width - len(p) :] = 1
        image_id = getattr(getattr(self.model, "cfg", None), "image_token_id", None)
        rows_images = None
        if images is not None and any(image_id in prompts[i] for i in group):
            rows_images = np.asarray(images, np.uint8)[group]
        seed = np.asarray([seeds[i] for i in group], np.uint32)
        values = np.stack([row_values(sampling[i], self.vocab) for i in group])
        tokens, rows = self._jit.prefill(
            self._graphdef,
            self._params,
            self._layers,
            ids,
            rows_images,
            positions,
            segment_ids,
            seed,
            values,
            np.bool_(self.mode.greedy),
        )
        return tokens, rows, seed, values

    def _make_room(self, width: int, max_tokens: int) -> None:
        """Ensure `width` cache slots before the write index and every row's remaining budget after it:
        rebase (and resize) the cache when they do not fit as it is."""
        span, remaining = self._span()
        remaining = max(remaining, max_tokens)
        if self._state is not None and self._index >= width and self._index + remaining <= self.length:
            return
        index = max(span, width)  # the new write index: the longest running row starts at slot 0
        length = serve_bucket(index + remaining)
        if self._state is None:
            self._state = self._empty(length)
        shift = self._index - index
        self._state = self._jit.rebase(self._state, np.int32(shift), length=length)
        for r in self.rows.values():
            r.start -= shift
        self._index = index

    def _empty(self, length: int) -> SlotState:
        """A free slot batch, committed to the model's device when it has one: the programs' inputs
        are then committed at every call (jit compiles committed and uncommitted inputs apart, and
        `compile_all` must meet the same inputs as serving)."""
        cfg = _language_model(self.model).cfg
        state = self._jit.empty(cfg=cfg, slots=self.slots, length=length, per_layer=self._layers is not None)
        devices = jax.tree.leaves(self._params)[0].devices()
        return jax.device_put(state, next(iter(devices))) if len(devices) == 1 else state

    def compile_all(self, max_prompt_tokens: int, max_new_tokens: int) -> int:
        """Compile every program that requests of up to `max_prompt_tokens` prompt tokens (image tokens
        included) and `max_new_tokens` new tokens can need, so that serving them compiles nothing:
        prefill for each prompt bucket x 2^k rows (text, and with an image where the model takes one),
        and for each cache length S they can reach: the empty batch, decode (greedy and sampled),
        one row's insertion per prompt bucket below S, and rebasing from every S to every S. Leaves
        the batch reset; returns the number of program calls made."""
        self.reset()
        cfg = getattr(self.model, "cfg", None)
        image_id = getattr(cfg, "image_token_id", None)
        sizes = [1 << k for k in range(self.slots.bit_length()) if 1 << k <= self.slots]
        widths = serve_buckets(MIN_WIDTH, max(MIN_WIDTH, max_prompt_tokens))
        kinds = [(False, widths)]
        if image_id is not None and max_prompt_tokens >= cfg.num_image_tokens:
            kinds.append((True, serve_buckets(max(MIN_WIDTH, cfg.num_image_tokens), max_prompt_tokens)))
        # The write index is at most the longest running span (<= prompt + 2 budgets, and within the
        # context by `fits`) or a newcomer's bucket; the cache holds it plus the largest remaining budget.
        need = max(min(self.context, max_prompt_tokens + 2 * max_new_tokens), widths[-1] + max_new_tokens)
        lengths = serve_buckets(widths[0] + 1, need)
        calls = 0
        rows = {}  # width -> one prefilled row of that width
        for image, kind_widths in kinds:
            for width in kind_widths:
                prompt = [1] * width
                if image:
                    prompt[-cfg.num_image_tokens - 1 : -1] = [image_id] * cfg.num_image_tokens
                for n in sizes:
                    size = cfg.vision.image_size
                    images = np.zeros((n, 1, size, size, 3), np.uint8) if image else None
                    self.mode = GREEDY_MODE
                    _, out, _, _ = self._prefill(list(range(n)), [prompt] * n, images, [0] * n, [Sampling()] * n)
                    rows.setdefault(width, out[0])
                    calls += 1
        for length in lengths:
            for mode in (GREEDY_MODE, SAMPLED):
                self.mode = mode
                self._state = self._jit.rebase(self._empty(length), np.int32(0), length=length)
                for width, row in rows.items():
                    if width < length:
                        self._insert(0, row, 0, width, True, 0, 1, np.ones(3, np.float32))
                        calls += 1
                self._run_chunk(0)
                calls += 3
            for target in lengths:
                self._state = self._jit.rebase(self._empty(length), np.int32(0), length=target)
                calls += 1
        jax.block_until_ready(self._state)
        self.reset()
        return calls

    def run(self, ahead: bool = False, until_one_ends: bool = False) -> dict[int, list[int]]:
        """One decode chunk for the running rows. Returns each running slot's new tokens: up to the
        chunk size, cut after an EOS (kept, so the caller sees why the row ended) or at its budget.

        ahead: before reading this chunk back, dispatch the next one for the rows running now, so the
        device decodes while the caller handles these tokens (one chunk stays in flight; the next
        `run` or `admit` takes it up) - unless a row reaches its token budget in this chunk (its slot
        would stay taken for a chunk more instead of taking a newcomer). A row released meanwhile
        (EOS, stop string) computes that chunk in vain; its tokens are dropped, also when a newcomer
        has taken its slot.

        until_one_ends: end the chunk after the first step in which a row ends (a caller with requests
        waiting for a slot), instead of running rows on while the ended row's slot idles."""
        pending, self._pending = self._pending, None
        if pending is None:
            if not self.rows:
                return {}
            self._make_room(0, 0)
            pending = self._dispatch(None, until_one_ends)
            if pending is None:
                return {}
        if ahead and self.rows and all(r.limit - r.produced > pending.steps for r in pending.rows.values()):
            self._pending = self._dispatch(pending, until_one_ends)
        out = np.asarray(pending.tokens)
        if not pending.settled:
            self._index = int(pending.index)
        new = {}
        for b, r in pending.rows.items():
            if self.rows.get(b) is not r:  # released since (its slot may hold a newcomer now)
                continue
            tokens = []
            for t in out[b, : r.limit - r.produced].tolist():
                if t == NO_TOKEN:
                    break
                tokens.append(t)
                if t in self.eos_set:
                    break
            r.produced += len(tokens)
            new[b] = tokens
        return new

    def _dispatch(self, after: _Pending | None, until_one_ends: bool = False) -> _Pending | None:
        """Queue a chunk for the running rows behind `after` (a chunk in flight, or None); None when no
        row needs another step or the cache has no room for one before `after` is read back."""
        in_flight = {} if after is None else {b: after.steps for b, r in after.rows.items() if self.rows.get(b) is r}
        steps = max((r.limit - r.produced - in_flight.get(b, 0) for b, r in self.rows.items()), default=0)
        index = self._index + (after.steps if after is not None and not after.settled else 0)  # an upper bound
        steps = min(self.chunk, steps, self.length - index)
        if steps <= 0:
            return None
        tokens, index = self._run_chunk(steps, until_one_ends)
        return _Pending(tokens, index, dict(self.rows), steps)

    def _run_chunk(self, steps: int, until_one_ends: bool = False):
        """Dispatch `_run` for `steps` steps over the running rows; returns (tokens, write index)."""
        free = np.ones(self.slots, bool)
        free[list(self.rows)] = False
        tokens, index, self._state = self._jit.run(
            self._graphdef,
            self._params,
            self._layers,
            self._state,
            np.int32(steps),
            free,
            self._eos,
            np.bool_(until_one_ends),
            mode=self.mode,
            chunk=self.chunk,
        )
        return tokens, index

    def _settle(self) -> None:
        """Read the write index after the chunk in flight (waits for it), before the cache changes."""
        if self._pending is not None and not self._pending.settled:
            self._index = int(self._pending.index)
            self._pending.settled = True

    def release(self, slot: int) -> None:
        """Free `slot` (its request has ended; the device stops it at the next chunk)."""
        self.rows.pop(slot, None)
        if not self.rows:
            self.mode = None
