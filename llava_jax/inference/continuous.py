"""Continuous batching: requests join the running decode batch between chunks and leave it when done.

`ContinuousScheduler` keeps `Scheduler`'s interface and guarantees (bounded queue, `check` before
queueing, per-row token budgets and stop strings, cancel, figures settled before each answer) and
runs its jobs on a `SlotBatch` of `max_batch` slots instead of one batch after another:

- between two decode chunks, finished rows leave (their slots are free at once) and waiting jobs
  are admitted, oldest first, into the free slots: prefilled (`SlotBatch.admit`: grouped by length
  bucket and image use), then decoded with the rows already running. `batch_sizes` counts these
  admissions (jobs admitted together);
- a job joins when a slot is free, it is greedy with greedy rows or sampled with sampled ones
  (`slots.engine_mode`; temperature / top-k / top-p values and seeds are per row), and the running rows'
  longest cache span plus the largest remaining token budget stay within the context (so 940 + 40
  and 40 + 900 tokens on a 1024 context never decode together). When the oldest waiting job cannot
  join, no younger one jumps ahead of it: the running rows drain until it fits;
- with no rows running, the oldest job waits up to `batch_wait_s` (from its arrival) for company;
- while requests wait, a chunk ends after the step in which a row ends (`SlotBatch.run(until_one_ends=
  True)`), so a freed slot does not idle to the chunk's end;
- each chunk is read back before the next is dispatched (`SlotBatch.run(ahead=True)` keeps one in
  flight; it showed no gain in `bench serve` on a 2-core CPU, where the host's work competes with the
  device's for the same cores, and it makes a released slot's successor wait a chunk).

A seeded job's tokens depend only on its seed and settings (row b's t-th token is sampled with
`fold_in(key(seed), t)`), not on the slot it lands in or its neighbours.
"""

from __future__ import annotations

import collections
import logging
import time

import numpy as np

from llava_jax.inference.sampling import Sampling
from llava_jax.inference.scheduler import Done, Failed, Job, Scheduler, _Row
from llava_jax.inference.slots import SlotBatch, engine_mode

log = logging.getLogger(__name__)


class ContinuousScheduler(Scheduler):
    """`Scheduler` with continuous batching (module docstring); same arguments."""

    def __init__(self, chat, **kwargs):
        super().__init__(chat, **kwargs)
        self.engine = SlotBatch(chat.model, slots=self.max_batch, chunk=self.chunk_size, eos_ids=chat.eos_ids)
        self._rows: dict[int, _Row] = {}  # slot -> running row
        # Worker seconds by activity: 'prefill' (`SlotBatch.admit`), 'decode' (`SlotBatch.run`: the chunk
        # and its read-back), 'streaming' (detokenising, stop strings, events); the rest is waiting.
        self.seconds: collections.Counter[str] = collections.Counter()

    def warm_up(self, *, max_prompt_tokens: int, max_new_tokens: int, sampling: Sampling | None = None) -> int:
        """Compile every program that requests within these limits can need (`SlotBatch.compile_all`),
        so that serving them compiles nothing; `sampling` is not needed (greedy and sampled programs
        are both compiled). Returns the number of program calls made."""
        return self.engine.compile_all(max_prompt_tokens, max_new_tokens)

    # ----------------------------------------------------------------------------------------
    def _take_newcomers(self) -> list[Job] | None:
        """The jobs to admit now ([] to just decode on); None when the worker should end. Blocks while
        nothing runs and nothing waits."""
        with self._cond:
            while True:
                while self._waiting and self._waiting[0].cancelled:
                    self._waiting.popleft().emit(Done("cancelled", []))
                if self._stopping:
                    for job in self._waiting:
                        job.emit(Failed("the server is shutting down"))
                    self._waiting.clear()
                    return [] if self._rows else None
                if not self._waiting:
                    if self._rows:
                        return []
                    self._cond.wait()
                    continue
                batch = self._admit_now()
                if not self._rows and batch:
                    left = self._waiting[0].arrived + self.batch_wait_s - time.monotonic()
                    if len(batch) < self.max_batch and left > 0:
                        self._cond.wait(left)
                        continue
                if not batch and not self._rows:  # cannot happen: an empty batch admits the oldest job
                    raise RuntimeError("the oldest waiting job does not fit an empty slot batch")
                chosen = {id(job) for job in batch}
                self._waiting = type(self._waiting)(job for job in self._waiting if id(job) not in chosen)
                if batch:
                    self.batch_sizes[len(batch)] += 1
                self.running = len(self._rows) + len(batch)
                return batch

    def _admit_now(self) -> list[Job]:
        """Waiting jobs (in arrival order, from the oldest) that fit the slot batch now; stops at the
        first one that does not, so no job overtakes an older one that waits for room."""
        batch: list[Job] = []
        joining: list[tuple[int, int]] = []
        for job in self._waiting:
            if job.cancelled:
                continue
            if batch and engine_mode(job.sampling) != engine_mode(batch[0].sampling):
                break
            if not self.engine.fits(len(job.prompt), job.max_tokens, job.sampling, joining):
                break
            batch.append(job)
            joining.append((len(job.prompt), job.max_tokens))
        return batch

    def _loop(self) -> None:
        while (batch := self._take_newcomers()) is not None:
            try:
                if batch:
                    self._admit(batch)
                self._decode()
            except Exception as e:  # keep serving; the running jobs get the error
                log.exception("generation failed with %d rows running", len(self._rows) + len(batch))
                failed = [row.job for row in self._rows.values()]
                failed += [job for job in batch if all(job is not r.job for r in self._rows.values())]
                for job in failed:
                    if id(job) not in self._answered:
                        self._done(job)
                        job.emit(Failed(f"generation failed: {type(e).__name__}: {e}"))
                self._rows.clear()
                self._answered = set()
                self.engine.reset()
            finally:
                self.running = len(self._rows)

    def _admit(self, batch: list[Job]) -> None:
        chat = self.chat
        images = None
        if any(job.image is not None for job in batch):
            size = chat.image_size
            images = np.zeros((len(batch), 1, size, size, 3), np.uint8)
            for b, job in enumerate(batch):
                if job.image is not None:
                    images[b, 0] = job.image
        seeds = [job.seed if job.seed is not None else int(self._rng.integers(2**31)) for job in batch]
        start = time.perf_counter()
        slots, first = self.engine.admit(
            [job.prompt for job in batch],
            images,
            [job.max_tokens for job in batch],
            seeds,
            [job.sampling for job in batch],
        )
        fed = time.perf_counter()
        self.seconds["prefill"] += fed - start
        for job, slot, token in zip(batch, slots, first, strict=True):
            self._rows[slot] = row = _Row(job, chat.tokenizer)
            self._feed(slot, row, [token])
        self.seconds["streaming"] += time.perf_counter() - fed

    def _decode(self) -> None:
        start = time.perf_counter()
        # With requests waiting, a chunk ends as soon as a row does, so its slot is taken at once.
        new = self.engine.run(until_one_ends=bool(self._waiting))
        fed = time.perf_counter()
        self.seconds["decode"] += fed - start
        for slot, tokens in new.items():
            self._feed(slot, self._rows[slot], tokens)
        self.seconds["streaming"] += time.perf_counter() - fed

    def _feed(self, slot: int, row: _Row, tokens: list[int]) -> None:
        """Pass one chunk's tokens of `slot` to its row; free the slot when the row has ended."""
        eos = bool(tokens) and tokens[-1] in self.engine.eos_set
        if eos:
            tokens = tokens[:-1]
        if row.step(tokens, "eos" if eos else None, self._done):  # EOS, stop string, budget or cancelled
            del self._rows[slot]
            self._answered.discard(id(row.job))
            self.engine.release(slot)
