"""The append-only raw log of generated responses: ``<out>/raw.jsonl``, one JSON object per line.

Each line is one paid response, written as soon as it arrives with a single ``write`` of the
whole line to a file opened with ``O_APPEND``::

    {"image": str, "kind": "conversation"|"detail"|"complex", "model": str,   # the model that answered
     "request": {"model", "prompt_set": fingerprint, "query": context text, "params": {...}},
     "content": reply text, "finish_reason": str|None, "usage": {...}, "attempts": int,
     "response_id": str|None, "time": unix seconds}

(image, kind) is the key: a rerun skips keys already in the log. A process killed mid-write can
leave at most a torn last line (no newline); opening the log for appending cuts it off (it is a
response that was never recorded, and will be asked for again), and readers ignore such lines.
A lock file keeps two generators from appending to the same log at once.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import Iterator

log = logging.getLogger(__name__)

RAW_NAME = "raw.jsonl"
ERRORS_NAME = "errors.jsonl"


def read_raw(path: str) -> Iterator[dict]:
    """Complete, valid records of a raw log (torn or invalid lines are skipped)."""
    if not os.path.exists(path):
        return
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                continue  # torn last line
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and "image" in record and "kind" in record:
                yield record


def _cut_torn_tail(path: str) -> int:
    """Truncate a file after its last newline; returns the bytes removed."""
    size = os.path.getsize(path)
    if size == 0:
        return 0
    with open(path, "rb+") as f:
        block = 1 << 16
        pos = size
        while pos > 0:
            start = max(0, pos - block)
            f.seek(start)
            chunk = f.read(pos - start)
            i = chunk.rfind(b"\n")
            if i >= 0:
                keep = start + i + 1
                break
            pos = start
        else:
            keep = 0
        if keep < size:
            f.truncate(keep)
        return size - keep


class RawLog:
    """Open `<out_dir>/raw.jsonl` for appending; `done` holds the (image, kind) keys already there."""

    def __init__(self, out_dir: str):
        os.makedirs(out_dir, exist_ok=True)
        self.path = os.path.join(out_dir, RAW_NAME)
        self.errors_path = os.path.join(out_dir, ERRORS_NAME)
        self._lock = open(os.path.join(out_dir, ".lock"), "w")  # noqa: SIM115 (held while writing)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise RuntimeError(
                f"another generator is writing to {out_dir} (its .lock is held); wait for it or use another --out"
            ) from None
        self.torn_bytes = _cut_torn_tail(self.path) if os.path.exists(self.path) else 0
        if self.torn_bytes:
            log.warning(
                "%s ended with a torn line (%d bytes, from an interrupted run): removed; it will be asked for again",
                self.path,
                self.torn_bytes,
            )
        self.done: set[tuple[str, str]] = set()
        self.duplicates = 0
        for record in read_raw(self.path):
            key = (record["image"], record["kind"])
            self.duplicates += key in self.done
            self.done.add(key)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def append(self, record: dict) -> None:
        """Write one record as one line (one write call) and mark its key done."""
        key = (record["image"], record["kind"])
        if key in self.done:
            raise ValueError(f"{key} is already in {self.path}")
        data = (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        self.done.add(key)

    def append_error(self, record: dict) -> None:
        with open(self.errors_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")

    def close(self) -> None:
        if self._fd >= 0:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1
        if not self._lock.closed:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()

    def __enter__(self) -> RawLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
