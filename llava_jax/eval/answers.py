"""Answers files in the original's JSONL format, written so that a killed run loses nothing.

One line per answered question::

    {"question_id": ..., "prompt": ..., "text": ..., "answer_id": ..., "model_id": ..., "metadata": {}}

A question whose image is missing or unreadable still gets a line, with ``text`` "" and
``metadata.error`` saying why, so it is counted and not asked again.

Every line is flushed and fsynced as it is written; a line cut short by a kill is ignored (and
overwritten) when the file is read back, so a rerun answers exactly the questions without a
complete line. `answer_id` is derived from the model and question (22 characters of a SHA-256, the
length of the original's shortuuid), so reruns and sharded runs give identical files.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from collections.abc import Iterable
from typing import Any


def answer_id(model_id: str, question_id: Any, text: str) -> str:
    """Deterministic 22-character id for an answer."""
    digest = hashlib.sha256(json.dumps([model_id, question_id, text]).encode()).hexdigest()
    return digest[:22]


def answer_record(question_id, prompt: str, text: str, model_id: str, metadata: dict | None = None) -> dict:
    return {
        "question_id": question_id,
        "prompt": prompt,
        "text": text,
        "answer_id": answer_id(model_id, question_id, text),
        "model_id": model_id,
        "metadata": metadata or {},
    }


def read_answers(path) -> list[dict]:
    """Complete lines of an answers file (missing file: []). A last line without its newline (a write cut
    short) is dropped; the file is truncated back to its last complete line so appends stay valid."""
    path = pathlib.Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
    out = []
    for n, line in enumerate(data[:end].decode("utf-8").splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: not valid JSON ({err.msg}); fix or remove that line") from None
    return out


class AnswerWriter:
    """Appends answer records to a JSONL file, one durable line at a time."""

    def __init__(self, path):
        self.path = pathlib.Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        read_answers(self.path)  # drop a torn last line before appending
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed by close())

    def write(self, records: Iterable[dict]) -> None:
        for r in records:
            self._file.write(json.dumps(r) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_ordered(path, records_by_id: dict, order: list) -> None:
    """Rewrite `path` atomically with the records of `order` (question ids) that exist, in that order."""
    path = pathlib.Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for qid in order:
            key = json.dumps(qid)
            if key in records_by_id:
                f.write(json.dumps(records_by_id[key]) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
