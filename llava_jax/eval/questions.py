"""Question files, read the way the original LLaVA evaluation scripts read them.

Two formats:

* JSONL (``model_vqa.py``): one object per line, ``{"question_id", "image", "text"[, "category"]}``.
  The prompt shown to the model is ``<image>\\n`` + text; a line without ``image`` is text-only.
* ScienceQA converted JSON (``model_vqa_science.py``, ``--science``): a list of LLaVA records
  ``{"id", "image"?, "conversations": [{"from": "human", "value": ...}, ...]}``. Only the first human
  turn is asked, with every ``<image>`` removed and the ends stripped; the image (when the record has
  one) goes back in front as ``<image>\\n``. With ``single_pred_prompt`` the line
  "Answer with the option's letter from the given choices directly." is appended.

`Question.prompt` is what the answers file records as ``prompt`` (the original's ``cur_prompt``):
the bare text for JSONL files, ``<image>\\n`` + text for ScienceQA records with an image.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

from llava_jax.data.templates import IMAGE_PLACEHOLDER

SINGLE_PRED_PROMPT = "Answer with the option's letter from the given choices directly."


@dataclasses.dataclass(frozen=True)
class Question:
    """One question to answer.

    question_id: as in the file (int or str), the key answers are matched by.
    text: the human message without the image placeholder.
    image: image path relative to the image folder, or None (text-only).
    prompt: what the answers file records as ``prompt``.
    """

    question_id: Any
    text: str
    image: str | None
    prompt: str


def _jsonl(path: pathlib.Path) -> list[dict]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{path}:{n}: not valid JSON ({err.msg}); a question file has one JSON object per "
                "line (use --science for the ScienceQA JSON list)"
            ) from None
    return rows


def _from_vqa(row: dict, where: str, single_pred_prompt: bool) -> Question:
    for key in ("question_id", "text"):
        if key not in row:
            raise ValueError(
                f"{where}: question has no {key!r} (keys: {sorted(row)}); expected question_id, image, text"
            )
    text = row["text"]
    if single_pred_prompt:
        text = text + "\n" + SINGLE_PRED_PROMPT
    return Question(row["question_id"], text, row.get("image") or None, text)


def _from_science(row: dict, where: str, single_pred_prompt: bool) -> Question:
    try:
        first = row["conversations"][0]["value"]
        qid = row["id"]
    except (KeyError, IndexError, TypeError):
        raise ValueError(
            f"{where}: not a LLaVA record with id and conversations[0].value (keys: "
            f"{sorted(row) if isinstance(row, dict) else type(row).__name__})"
        ) from None
    text = first.replace(IMAGE_PLACEHOLDER, "").strip()
    image = row.get("image") if "image" in row else None
    prompt = (IMAGE_PLACEHOLDER + "\n" + text) if image else text
    if single_pred_prompt:
        text, prompt = text + "\n" + SINGLE_PRED_PROMPT, prompt + "\n" + SINGLE_PRED_PROMPT
    return Question(qid, text, image or None, prompt)


def read_questions(path, *, science: bool = False, single_pred_prompt: bool = False) -> list[Question]:
    """Read a question file (JSONL, or with `science` the ScienceQA converted JSON list).

    Raises ValueError naming the file and line/record for malformed input, and for repeated ids.
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"question file {str(path)!r} does not exist")
    if science:
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{path}: not a JSON list ({err.msg}); --science expects the converted ScienceQA "
                "JSON (python -m llava_jax.data.scienceqa)"
            ) from None
        if not isinstance(rows, list):
            raise ValueError(f"{path}: --science expects a JSON list of records, got {type(rows).__name__}")
        questions = [_from_science(r, f"{path}[{i}]", single_pred_prompt) for i, r in enumerate(rows)]
    else:
        questions = [_from_vqa(r, f"{path}:{i + 1}", single_pred_prompt) for i, r in enumerate(_jsonl(path))]
    seen: set = set()
    for q in questions:
        if q.question_id in seen:
            raise ValueError(
                f"{path}: question_id {q.question_id!r} appears more than once; ids must be unique "
                "(answers are matched by id)"
            )
        seen.add(q.question_id)
    return questions
