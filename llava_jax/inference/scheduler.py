"""Batches concurrent generation requests into shared `stream_generate` calls.

Requests (`Job`) wait in a bounded queue; `submit` checks a job on its own (prompt ids in the
vocabulary, image tokens matching its image, prompt + token limit within the context; `ValueError`
otherwise) and raises `QueueFull` when the queue is full, so a server can answer "busy" at once instead
of piling work up. One worker thread owns the model: it takes the oldest waiting job, waits up to
`batch_wait_s` (counted from that job's arrival) for more jobs that can share its batch, and runs up
to `max_batch` of them as one batch. A job joins the batch when it samples the same way (one
`Sampling` and seed per batch; all greedy jobs share) and the batch still fits the context: its
longest prompt plus its largest token limit stay within `context_length` (so a batch is never larger
than one context-filling request per row, and `stream_generate` accepts it). A job that does not fit
waits for a later batch; the oldest job always starts the next one. Each row keeps its own token limit
and stop strings and ends on its own (`gen.send(rows)`); the batch ends when its last row does.
Batches run one after another: a job that arrives while a batch runs waits for the next one
(`continuous.ContinuousScheduler`, the server's default, lets it join the running batch instead).

Figures (`batch_sizes`, `completed`) are settled before a job hears its outcome: a batch is counted
when it starts, a job as completed just before its `Done` or `Failed`.

A job reports through its `emit` callback, called on the worker thread: `Delta(text)` pieces of
complete UTF-8 text, then one `Done(finish_reason, token_ids)` ('stop' = EOS or a stop string,
'length' = the token limit, 'cancelled'), or `Failed(message)` if the batch raised. `Job.cancel()`
(e.g. the client went away) drops a waiting job or stops its row at the next chunk.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from llava_jax.inference.chat_model import ChatModel
from llava_jax.inference.detokenize import IncrementalDecoder, StopMatcher
from llava_jax.inference.generate import stream_generate
from llava_jax.inference.sampling import GREEDY, Sampling

log = logging.getLogger(__name__)


class Delta(NamedTuple):
    text: str


class Done(NamedTuple):
    finish_reason: str  # 'stop', 'length' or 'cancelled'
    token_ids: list[int]


class Failed(NamedTuple):
    message: str


Event = Delta | Done | Failed


class QueueFull(RuntimeError):
    """The scheduler's queue holds `max_queue` waiting jobs already."""


@dataclasses.dataclass(eq=False)
class Job:
    """One generation request.

    prompt: token ids; image: uint8 [S, S, 3] or None; max_tokens: new-token limit; stops: stop strings
    (the text before the first one is the reply); seed: None = any (the job may share a batch with
    other unseeded jobs).
    """

    prompt: list[int]
    image: np.ndarray | None
    max_tokens: int
    sampling: Sampling
    emit: Callable[[Event], None]
    stops: tuple[str, ...] = ()
    seed: int | None = None
    arrived: float = dataclasses.field(default_factory=time.monotonic)
    cancelled: bool = False

    @property
    def key(self) -> tuple:
        """Jobs with equal keys can share a batch."""
        if self.sampling.temperature == 0:
            return (GREEDY, None)
        return (self.sampling, self.seed)

    def cancel(self) -> None:
        self.cancelled = True


class _Row:
    """A running job's decoding state."""

    def __init__(self, job: Job, tokenizer):
        self.job = job
        self.decoder = IncrementalDecoder(tokenizer)
        self.stops = StopMatcher(job.stops)
        self.tokens: list[int] = []
        self.finished = False

    def step(self, tokens: list[int], finish: str | None, done: Callable[[Job], None]) -> bool:
        """Take this row's tokens of one chunk; emit text; returns True when the row has ended (then
        `done(job)` is called just before the `Done` event)."""
        job = self.job
        tokens = tokens[: job.max_tokens - len(self.tokens)]
        self.tokens += tokens
        piece = self.stops.feed(self.decoder.push(tokens))
        if self.stops.stopped or finish == "eos":
            reason = "stop"
        elif finish is not None or len(self.tokens) >= job.max_tokens:
            reason = "length"
        elif job.cancelled:
            reason = "cancelled"
        else:
            reason = None
        if reason in ("stop", "length") and not self.stops.stopped:
            piece += self.stops.feed(self.decoder.flush())
            piece += self.stops.flush()
        if piece and reason != "cancelled":
            job.emit(Delta(piece))
        if reason is not None:
            self.finished = True
            done(job)
            job.emit(Done(reason, list(self.tokens)))
        return self.finished


class Scheduler:
    """The batching worker for one `ChatModel`.

    Args:
      chat: the model bundle (tokenizer for decoding, EOS ids).
      max_batch: most jobs in one batch.
      max_queue: most jobs waiting (not yet running); `submit` raises `QueueFull` beyond it.
      batch_wait_s: how long the oldest waiting job waits for company before its batch starts.
      chunk_size: decode steps per device call (the streaming granularity).
    """

    def __init__(
        self,
        chat: ChatModel,
        *,
        max_batch: int = 8,
        max_queue: int = 64,
        batch_wait_s: float = 0.01,
        chunk_size: int = 8,
        seed: int = 0,
    ):
        if max_batch < 1 or max_queue < 1:
            raise ValueError(f"max_batch={max_batch} and max_queue={max_queue} must be >= 1")
        self.chat = chat
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.batch_wait_s = batch_wait_s
        self.chunk_size = chunk_size
        self._rng = np.random.default_rng(seed)
        self._waiting: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.running = 0  # jobs in the batch on the device now
        self.batch_sizes: collections.Counter[int] = collections.Counter()  # batch size -> batches started
        self.completed = 0  # jobs answered (Done or Failed), cancelled waiting jobs excepted
        self._answered: set[int] = set()  # ids of the running batch's jobs that have been answered

    # ----------------------------------------------------------------------------------------
    def start(self) -> Scheduler:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="llava-scheduler", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float | None = 30.0) -> None:
        """Finish the running batch, fail the waiting jobs, end the worker."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def queued(self) -> int:
        return len(self._waiting)

    def check(self, job: Job) -> None:
        """Raise `ValueError` naming the problem if `job` cannot run on its own (so it never reaches, and
        never fails, a batch shared with other jobs)."""
        cfg = self.chat.model.cfg
        if not job.prompt:
            raise ValueError("the job's prompt is empty")
        vocab = cfg.llm.vocab_size
        if any(not 0 <= t < vocab for t in job.prompt):
            raise ValueError(f"the job's prompt has token ids outside the vocabulary [0, {vocab})")
        slots = sum(t == cfg.image_token_id for t in job.prompt)
        want = 0 if job.image is None else cfg.num_image_tokens
        if slots != want:
            raise ValueError(f"the job's prompt has {slots} image tokens; its image needs exactly {want}")
        size = self.chat.image_size
        if job.image is not None and (job.image.shape != (size, size, 3) or job.image.dtype != np.uint8):
            raise ValueError(
                f"the job's image is {job.image.dtype} {job.image.shape}; expected uint8 ({size}, {size}, 3)"
            )
        if not isinstance(job.max_tokens, int) or job.max_tokens < 1:
            raise ValueError(f"the job's max_tokens={job.max_tokens!r} must be an integer >= 1")
        context = self.chat.context_length
        if len(job.prompt) + job.max_tokens > context:
            raise ValueError(
                f"the job's prompt of {len(job.prompt)} tokens + max_tokens={job.max_tokens} exceeds the "
                f"context of {context} tokens"
            )

    def submit(self, job: Job) -> None:
        """Queue a job; raises `ValueError` for a job that cannot run (`check`), `QueueFull` when
        `max_queue` jobs already wait."""
        self.check(job)
        with self._cond:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(
                    f"{len(self._waiting)} requests are already waiting (limit {self.max_queue}); retry shortly"
                )
            self._waiting.append(job)
            self._cond.notify_all()

    def warm_up(self, *, max_prompt_tokens: int, max_new_tokens: int, sampling: Sampling) -> int:
        """Compile the prefill and decode programs for batches of 1, 2, 4, ... `max_batch` copies of a
        one-image question with `sampling` and a budget of `max_new_tokens` (so the first requests of
        that shape do not wait for compilation); other prompt lengths and budgets compile at first use
        (batches of them make too many shapes to compile beforehand). Generation stops after the first
        decode chunk. Returns the number of batches run."""
        chat = self.chat
        image = np.full((chat.image_size, chat.image_size, 3), 128, np.uint8)
        prompt = chat.prompt_ids(["Describe this image in detail."], image=True).tolist()
        budget = max(1, min(max_new_tokens, chat.context_length - len(prompt)))
        size, calls = 1, 0
        while True:
            gen = stream_generate(
                chat.model,
                [prompt] * size,
                np.broadcast_to(image, (size, 1, *image.shape)),
                max_new_tokens=budget,
                sampling=sampling,
                eos_ids=chat.eos_ids,
                chunk_size=self.chunk_size,
            )
            try:
                for _, _ in zip(range(2), gen, strict=False):  # two chunks: prefill and one decode
                    pass
            finally:
                gen.close()
            calls += 1
            if size >= self.max_batch:
                return calls
            size = min(2 * size, self.max_batch)

    # ----------------------------------------------------------------------------------------
    def _take_batch(self) -> list[Job] | None:
        with self._cond:
            while True:
                while self._waiting and self._waiting[0].cancelled:
                    self._waiting.popleft().emit(Done("cancelled", []))
                if self._stopping:
                    for job in self._waiting:
                        job.emit(Failed("the server is shutting down"))
                    self._waiting.clear()
                    return None
                if not self._waiting:
                    self._cond.wait()
                    continue
                batch = self._admit()
                left = self._waiting[0].arrived + self.batch_wait_s - time.monotonic()
                if len(batch) < self.max_batch and left > 0:
                    self._cond.wait(left)
                    continue
                chosen = {id(job) for job in batch}
                self._waiting = collections.deque(job for job in self._waiting if id(job) not in chosen)
                self.running = len(batch)
                self.batch_sizes[len(batch)] += 1
                return batch

    def _admit(self) -> list[Job]:
        """The next batch: the oldest waiting job, then (in arrival order) each job that shares its
        sampling and keeps the batch's longest prompt + largest token limit within the context."""
        first = self._waiting[0]
        batch, longest, most = [first], len(first.prompt), first.max_tokens
        context = self.chat.context_length
        for job in itertools.islice(self._waiting, 1, None):
            if len(batch) >= self.max_batch:
                break
            if job.cancelled or job.key != first.key:
                continue
            if max(longest, len(job.prompt)) + max(most, job.max_tokens) > context:
                continue
            batch.append(job)
            longest, most = max(longest, len(job.prompt)), max(most, job.max_tokens)
        return batch

    def _done(self, job: Job) -> None:
        """Count `job` as answered; called just before its final event."""
        self._answered.add(id(job))
        self.completed += 1

    def _loop(self) -> None:
        while (batch := self._take_batch()) is not None:
            self._answered = set()
            try:
                self._run(batch)
            except Exception as e:  # keep serving; the batch's unfinished jobs get the error
                log.exception("generation failed for a batch of %d", len(batch))
                for job in batch:
                    if id(job) not in self._answered:
                        self._done(job)
                        job.emit(Failed(f"generation failed: {type(e).__name__}: {e}"))
            finally:
                self.running = 0

    def _run(self, batch: list[Job]) -> None:
        chat = self.chat
        images = None
        if any(job.image is not None for job in batch):
            size = chat.image_size
            images = np.zeros((len(batch), 1, size, size, 3), np.uint8)
            for b, job in enumerate(batch):
                if job.image is not None:
                    images[b, 0] = job.image
        first = batch[0]
        seed = first.seed if first.seed is not None else int(self._rng.integers(2**31))
        rows = [_Row(job, chat.tokenizer) for job in batch]
        gen = stream_generate(
            chat.model,
            [job.prompt for job in batch],
            images,
            max_new_tokens=max(job.max_tokens for job in batch),
            sampling=first.sampling,
            eos_ids=chat.eos_ids,
            seed=seed,
            chunk_size=self.chunk_size,
        )
        try:
            request: list[int] = []
            while True:
                try:
                    chunk = gen.send(request or None)
                except StopIteration:
                    break
                request = []
                for b, row in enumerate(rows):
                    if (
                        not row.finished
                        and row.step(chunk.tokens[b], chunk.finish[b], self._done)
                        and chunk.finish[b] is None
                    ):
                        request.append(b)
                if all(row.finished for row in rows):
                    break
        finally:
            gen.close()
        for row in rows:  # the generator ran out without a final word for a row (cannot normally happen)
            if not row.finished:
                row.step([], "length", self._done)
