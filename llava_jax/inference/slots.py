"""A fixed-size batch of decode slots that requests enter and leave between decode chunks (continuous
batching), for `Llava` and `Llama`.

The device holds B slots (B = `slots`), one KV cache [L, B, K, S, H] (per layer on a CPU, see below)
with one write index shared by all slots (as in `generate`), and per slot: the last token, its
position, done, tokens sampled so far, the sampling seed, the token budget and the sampling values.
Between chunks the host may

- `admit` n new prompts: they are prefilled in groups of one length bucket P (`bucket`) and
  image use (each left-padded to P; text prompts never pay for an image prompt's width or for the
  vision tower), in calls of 2^k rows with no padding rows (`groups`), and each one's P cache slots
  are written into a free slot's row so that they end at the shared write index; the rest of that
  row is marked empty (segment id 0);
- `run` one chunk of up to `chunk` decode steps for all slots (free slots compute and are ignored);
- `release` a slot (its request ended): the slot is free for the next `admit`.

The shared index only grows; when a newcomer's P slots do not fit before it, or the slots'
remaining budgets do not fit after it, the cache is rebased: every row moves left by the oldest
running row's start (or right, to make room), into a buffer whose length S is the bucketed need.
So S tracks the running rows (not the model context), and decode reads no more cache than they need.

Sampling is per row: row b's t-th token uses key `fold_in(key(seed_b), t)` (as a batch of one in
`generate` with that seed), with its own temperature / top-k / top-p values; only the static
`SamplingMode` (greedy or not, which filters are on) is shared by the slots.

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


def _sample_rows(logits, seed, step, mode: SamplingMode, values):
    """logits [B, V] -> tokens [B] int32, row b sampled with key fold_in(key(seed[b]), step[b])."""
    if mode.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def one(row, s, t, v):
        return sample_tokens(row[None], jax.random.fold_in(jax.random.key(s), t), mode, v)[0]

    return jax.vmap(one)(logits, seed, step, values)


def _prefill(graphdef, params, layers, ids, images, positions, segment_ids, seed, values, *, mode: SamplingMode):
    """ids/positions/segment_ids [n, P]; images [n, M, S, S, 3] or None; seed [n]; values [n, 3]; layers:
    the LLM blocks' `layer_states()` (per-layer cache, unrolled layers) or None (stacked, scanned).
    Returns (first tokens [n], k and v [L, n, K, P, H] or L x [n, K, P, H], segment ids [n, P])."""
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
    token = _sample_rows(logits, seed, jnp.zeros_like(seed, jnp.int32), mode, values)
    return token, cache.k, cache.v, cache.segment_ids


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


def _insert(state: SlotState, slots, k, v, segment_ids, token, position, done, seed, limit, values) -> SlotState:
    """Writes n prefilled rows into `slots` [n] (int32): k/v [L, n, K, P, H] (or L x [n, K, P, H], as the
    state's cache is kept) end at the write index,
    segment_ids [n, P]; token, position, done, seed, limit [n]; values [n, 3]. Rows are written
    last to first, so when a slot is named twice the first row wins."""
    cache = state.cache
    ks, vs, seg = cache.k, cache.v, cache.segment_ids
    start = cache.index - segment_ids.shape[1]
    fields = {f: getattr(state, f) for f in ("token", "position", "done", "step", "seed", "limit", "values")}
    new = {"token": token, "position": position, "done": done, "step": jnp.ones_like(token), "seed": seed}
    new |= {"limit": limit, "values": values}
    for i in reversed(range(slots.shape[0])):
        b = slots[i]

        def put(dst, src, i=i, b=b):
            if dst.ndim == 5:  # stacked [L, B, K, S, H]
                return jax.lax.dynamic_update_slice(dst, src[:, i : i + 1].astype(dst.dtype), (0, b, 0, start, 0))
            return jax.lax.dynamic_update_slice(dst, src[i : i + 1].astype(dst.dtype), (b, 0, start, 0))

        ks, vs = jax.tree.map(put, ks, k), jax.tree.map(put, vs, v)
        seg = jax.lax.dynamic_update_slice(seg, jnp.zeros((1, seg.shape[1]), seg.dtype), (b, 0))
        seg = jax.lax.dynamic_update_slice(seg, segment_ids[i : i + 1], (b, start))
        for name, x in fields.items():
            fields[name] = x.at[b].set(new[name][i])
    return SlotState(KVCache(ks, vs, seg, cache.index), **fields)


def _run(graphdef, params, layers, state: SlotState, steps, free, eos, *, mode: SamplingMode, chunk: int):
    """Up to `steps` (<= chunk) decode steps; slots in `free` [B] bool are marked done first. `layers` as
    in `_prefill` (given exactly when the state's cache is per layer).
    Returns (tokens [B, chunk] int32, NO_TOKEN where none was produced, the write index after the
    chunk (a buffer of its own: the state's is donated to the next call), SlotState)."""
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
        token = _sample_rows(lm.logits(hidden)[:, 0], s.seed, s.step, mode, s.values)
        out = out.at[:, i].set(jnp.where(s.done, NO_TOKEN, token))
        done = s.done | _is_eos(token, eos) | (s.step + 1 >= s.limit)
        s = s._replace(cache=cache, token=token, position=s.position + 1, done=done, step=s.step + 1)
        return i + 1, s, out

    state = state._replace(done=state.done | free)
    out = jnp.full((b, chunk), NO_TOKEN, jnp.int32)
    _, state, out = jax.lax.while_loop(cond, body, (jnp.int32(0), state, out))
    return out, state.cache.index + 0, state


class Programs(NamedTuple):
    """The jitted slot-batch programs (one set per XLA option set)."""

    prefill: Callable
    rebase: Callable
    insert: Callable
    run: Callable


@functools.cache
def programs(options: tuple[tuple[str, str], ...] = ()) -> Programs:
    """The slot programs compiled with XLA `options` ((name, value) pairs; () = XLA's defaults)."""
    opts = dict(options) or None
    return Programs(
        prefill=jax.jit(_prefill, static_argnames=("graphdef", "mode"), compiler_options=opts),
        rebase=jax.jit(_rebase, static_argnames=("length",), compiler_options=opts),
        insert=jax.jit(_insert, donate_argnames=("state",), compiler_options=opts),
        run=jax.jit(
            _run, static_argnames=("graphdef", "mode", "chunk"), donate_argnames=("state",), compiler_options=opts
        ),
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
        """Whether a request can join now: a free slot, the same `SamplingMode`, and the running rows'
        longest span plus the largest remaining budget within the context (so the batch never needs
        more cache than one context-filling request). `joining`: (prompt length, max tokens) of
        requests already accepted for this admission."""
        if len(self.rows) + len(joining) >= self.slots:
            return False
        if self.rows and sampling.mode != self.mode:
            return False
        span, remaining = self._span()
        for p, m in (*joining, (prompt_length, max_tokens)):
            span, remaining = max(span, p), max(remaining, m)
        return span + remaining <= self.context

    def groups(self, prompts: list[list[int]], images) -> list[list[int]]:
        """How `admit` prefills `prompts`: lists of prompt indices, one prefill call each. Prompts of one
        length bucket and image use share calls (a text prompt never pays for an image prompt's width
        or for the vision tower), in calls of 2^k rows from the largest (7 prompts: 4 + 2 + 1), so no
        call computes padding rows."""
        image_id = getattr(getattr(self.model, "cfg", None), "image_token_id", None)
        keys: dict[tuple[bool, int], list[int]] = {}
        for i, p in enumerate(prompts):
            has_image = images is not None and image_id is not None and image_id in p
            keys.setdefault((has_image, bucket(len(p))), []).append(i)
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
        modes = {s.mode for s in sampling}
        if len(modes) != 1 or (self.rows and self.mode not in modes):
            raise ValueError(f"rows of one slot batch share a sampling mode; got {modes} (running: {self.mode})")
        if n > len(self.free):
            raise ValueError(f"{n} prompts for {len(self.free)} free slots")
        self.mode = modes.pop()
        groups = self.groups(prompts, images)
        prefilled = [self._prefill(group, prompts, images, seeds, sampling) for group in groups]
        self._settle()
        self._make_room(max(out[3].shape[1] for out in prefilled), max(limits))
        slots = self.free[:n]
        first = [0] * n
        for group, (tokens, k, v, seg, seed, values) in zip(groups, prefilled, strict=True):
            tokens_host = np.asarray(tokens)
            for i, t in zip(group, tokens_host.tolist(), strict=True):
                first[i] = t
            self._state = self._jit.insert(
                self._state,
                np.asarray([slots[i] for i in group], np.int32),
                k,
                v,
                seg,
                tokens,
                np.asarray([len(prompts[i]) for i in group], np.int32),
                np.asarray([first[i] in self.eos_set or limits[i] <= 1 for i in group]),
                seed,
                np.asarray([limits[i] for i in group], np.int32),
                values,
            )
        for i, b in enumerate(slots):
            self.rows[b] = _Slot(start=self._index - len(prompts[i]), limit=limits[i], produced=1)
        return slots, first

    def _prefill(self, group: list[int], prompts, images, seeds, sampling):
        """One prefill call for `prompts[i]`, i in `group`, left-padded to their length bucket.
        Returns (first tokens, k, v, segment ids, seeds, sampling values) of the rows, on the device."""
        width = bucket(max(len(prompts[i]) for i in group))
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
            rows_images = np.asarray(images)[group]
        seed = np.asarray([seeds[i] for i in group], np.uint32)
        values = np.stack([np.asarray(sampling[i].values, np.float32) for i in group])
        tokens, k, v, seg = self._jit.prefill(
            self._graphdef,
            self._params,
            self._layers,
            ids,
            rows_images,
            positions,
            segment_ids,
            seed,
            values,
            mode=self.mode,
        )
        return tokens, k, v, seg, seed, values

    def _make_room(self, width: int, max_tokens: int) -> None:
        """Ensure `width` cache slots before the write index and every row's remaining budget after it:
        rebase (and resize) the cache when they do not fit as it is."""
        span, remaining = self._span()
        remaining = max(remaining, max_tokens)
        if self._state is not None and self._index >= width and self._index + remaining <= self.length:
            return
        index = max(span, width)  # the new write index: the longest running row starts at slot 0
        length = bucket(index + remaining)
        if self._state is None:
            self._state = self._empty(length)
        shift = self._index - index
        self._state = self._jit.rebase(self._state, np.int32(shift), length=length)
        for r in self.rows.values():
            r.start -= shift
        self._index = index

    def _empty(self, length: int) -> SlotState:
        lm = _language_model(self.model)
        b = self.slots
        return SlotState(
            KVCache.init(lm.cfg, b, length, per_layer=self._layers is not None),
            jnp.zeros(b, jnp.int32),
            jnp.zeros(b, jnp.int32),
            jnp.ones(b, bool),
            jnp.zeros(b, jnp.int32),
            jnp.zeros(b, jnp.uint32),
            jnp.ones(b, jnp.int32),
            jnp.ones((b, 3), jnp.float32),
        )

    def run(self, ahead: bool = False) -> dict[int, list[int]]:
        """One decode chunk for the running rows. Returns each running slot's new tokens: up to the
        chunk size, cut after an EOS (kept, so the caller sees why the row ended) or at its budget.

        ahead: before reading this chunk back, dispatch the next one for the rows running now, so the
        device decodes while the caller handles these tokens (one chunk stays in flight; the next
        `run` or `admit` takes it up) - unless a row reaches its token budget in this chunk (its slot
        would stay taken for a chunk more instead of taking a newcomer). A row released meanwhile
        (EOS, stop string) computes that chunk in vain; its tokens are dropped, also when a newcomer
        has taken its slot."""
        pending, self._pending = self._pending, None
        if pending is None:
            if not self.rows:
                return {}
            self._make_room(0, 0)
            pending = self._dispatch(None)
            if pending is None:
                return {}
        if ahead and self.rows and all(r.limit - r.produced > pending.steps for r in pending.rows.values()):
            self._pending = self._dispatch(pending)
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

    def _dispatch(self, after: _Pending | None) -> _Pending | None:
        """Queue a chunk for the running rows behind `after` (a chunk in flight, or None); None when no
        row needs another step or the cache has no room for one before `after` is read back."""
        in_flight = {} if after is None else {b: after.steps for b, r in after.rows.items() if self.rows.get(b) is r}
        steps = max((r.limit - r.produced - in_flight.get(b, 0) for b, r in self.rows.items()), default=0)
        index = self._index + (after.steps if after is not None and not after.settled else 0)  # an upper bound
        steps = min(self.chunk, steps, self.length - index)
        if steps <= 0:
            return None
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
            mode=self.mode,
            chunk=self.chunk,
        )
        return _Pending(tokens, index, dict(self.rows), steps)

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
