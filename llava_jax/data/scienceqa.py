"""ScienceQA -> LLaVA JSON records, with the prompt formats of the original LLaVA conversion.

Input: the ScienceQA release's ``problems.json`` (pid -> problem with ``question``, ``choices``,
``answer`` (index), ``hint``, ``lecture``, ``solution``, ``image`` (file name or null)) and
``pid_splits.json`` (split name -> list of pids).

Output: one record per problem of the split, in split order::

    {"id": pid, "image": "<pid>/image.png",            # only when the problem has an image
     "conversations": [{"from": "human", "value": "<input>\\n<image>"},   # "\\n<image>" likewise
                       {"from": "gpt", "value": "<output>"}]}

A format is ``INPUT-OUTPUT``, e.g. ``QCM-LEA`` (used for LLaVA's ScienceQA fine-tuning):

* inputs: ``QCM`` (question, context, options), ``CQM``, and with the lecture / explanation
  given away as ``BECAUSE:`` text: ``QCML``, ``QCME``, ``QCMLE``, ``QCLM``, ``QCEM``, ``QCLEM``;
* outputs: ``A`` (``The answer is B.``), ``LEA`` (lecture, solution, then the answer), ``LEPA``
  (``LECTURE: ...\\nSOLUTION: ...\\n###\\nANSWER: B.``), and ``AL``, ``AE``, ``ALE``, ``AEL``,
  ``LA``, ``EA``, ``ELA``.

The text is built exactly as the original does it, quirks included: the context is the hint or
``N/A``; double spaces are replaced once (``str.replace("  ", " ")``) and the ends stripped; a
trailing empty ``BECAUSE:`` is dropped; every ``Question: `` in an input that starts with it and
every ``Answer: `` in an output that starts with it are removed; ``AL`` gives the solution and
``AE`` the lecture after ``BECAUSE:`` (the original's own pairing).

CLI::

    python -m llava_jax.data.scienceqa --problems problems.json --splits pid_splits.json \\
        --split train --format QCM-LEA --out llava_train_QCM-LEA.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from llava_jax.paths import as_path

OPTION_LETTERS = ("A", "B", "C", "D", "E")

INPUT_FORMATS = {
    "CQM": "Context: {context}\nQuestion: {question}\nOptions: {choices}\n",
    "QCM": "Question: {question}\nContext: {context}\nOptions: {choices}\n",
    "QCML": "Question: {question}\nContext: {context}\nOptions: {choices}\nBECAUSE: {lecture}\n",
    "QCME": "Question: {question}\nContext: {context}\nOptions: {choices}\nBECAUSE: {solution}\n",
    "QCMLE": "Question: {question}\nContext: {context}\nOptions: {choices}\nBECAUSE: {lecture} {solution}\n",
    "QCLM": "Question: {question}\nContext: {context}\nBECAUSE: {lecture}\nOptions: {choices}\n",
    "QCEM": "Question: {question}\nContext: {context}\nBECAUSE: {solution}\nOptions: {choices}\n",
    "QCLEM": "Question: {question}\nContext: {context}\nBECAUSE: {lecture} {solution}\nOptions: {choices}\n",
}

OUTPUT_FORMATS = {
    "A": "Answer: The answer is {answer}.",
    "AL": "Answer: The answer is {answer}. BECAUSE: {solution}",
    "AE": "Answer: The answer is {answer}. BECAUSE: {lecture}",
    "ALE": "Answer: The answer is {answer}. BECAUSE: {lecture} {solution}",
    "AEL": "Answer: The answer is {answer}. BECAUSE: {solution} {lecture}",
    "LA": "Answer: {lecture} The answer is {answer}.",
    "EA": "Answer: {solution} The answer is {answer}.",
    "LEA": "Answer: {lecture} {solution} The answer is {answer}.",
    "ELA": "Answer: {solution} {lecture} The answer is {answer}.",
    "LEPA": None,  # built by _lepa
}


def split_format(prompt_format: str) -> tuple[str, str]:
    """``"QCM-LEA"`` -> ``("QCM", "LEA")``, checking both halves."""
    parts = prompt_format.split("-")
    if len(parts) != 2 or parts[0] not in INPUT_FORMATS or parts[1] not in OUTPUT_FORMATS:
        raise ValueError(
            f"unknown ScienceQA format {prompt_format!r}: use INPUT-OUTPUT with INPUT in "
            f"{sorted(INPUT_FORMATS)} and OUTPUT in {sorted(OUTPUT_FORMATS)}"
        )
    return parts[0], parts[1]


def _fields(pid: str, problem: Mapping[str, Any]) -> dict[str, str]:
    choices = problem["choices"]
    if len(choices) > len(OPTION_LETTERS):
        raise ValueError(f"ScienceQA problem {pid}: {len(choices)} choices, at most {len(OPTION_LETTERS)} are lettered")
    answer = problem["answer"]
    if not 0 <= answer < len(choices):
        raise ValueError(f"ScienceQA problem {pid}: answer index {answer} for {len(choices)} choices")
    context = ((problem.get("hint") or "") + " ").strip() or "N/A"

    def text(key):
        # Newlines round-trip through "\\n", so a literal backslash-n in the source becomes one too.
        return (problem.get(key) or "").replace("\n", "\\n").replace("\\n", "\n")

    return {
        "question": problem["question"],
        "context": context,
        "choices": " ".join(f"({OPTION_LETTERS[i]}) {c}" for i, c in enumerate(choices)),
        "answer": OPTION_LETTERS[answer],
        "lecture": text("lecture"),
        "solution": text("solution"),
    }


def _lepa(f: Mapping[str, str]) -> str:
    out = ""
    if f["lecture"].strip():
        out += f"LECTURE: {f['lecture']}\n"
    if f["solution"].strip():
        out += f"SOLUTION: {f['solution']}\n"
    return out + f"###\nANSWER: {f['answer']}."


def _tidy(text: str) -> str:
    text = text.replace("  ", " ").strip()
    if text.endswith("BECAUSE:"):
        text = text.replace("BECAUSE:", "").strip()
    return text


def problem_texts(pid: str, problem: Mapping[str, Any], prompt_format: str) -> tuple[str, str]:
    """The (human input, gpt output) texts of one problem, prefixes removed, no image placeholder."""
    in_fmt, out_fmt = split_format(prompt_format)
    f = _fields(pid, problem)
    source = _tidy(INPUT_FORMATS[in_fmt].format(**f))
    target = _tidy(_lepa(f) if out_fmt == "LEPA" else OUTPUT_FORMATS[out_fmt].format(**f))
    if source.startswith("Question: "):
        source = source.replace("Question: ", "")
    if target.startswith("Answer: "):
        target = target.replace("Answer: ", "")
    return source, target


def convert(
    problems: Mapping[str, Mapping[str, Any]],
    pids: Sequence[str],
    prompt_format: str = "QCM-LEA",
    image_prefix: str = "",
) -> list[dict[str, Any]]:
    """Convert the given problems (in the given order) to LLaVA records.

    Args:
      problems: pid -> ScienceQA problem.
      pids: the split's problem ids.
      prompt_format: ``INPUT-OUTPUT``, e.g. ``QCM-LEA``, ``QCM-A``, ``QCM-LEPA``.
      image_prefix: folder put before ``<pid>/<image>`` in the ``image`` paths (``""``, as in the
        original, for an image folder that is the split's own, e.g. ``images/train``).
    Returns:
      LLaVA records ``{id, image?, conversations}``.
    """
    split_format(prompt_format)
    records = []
    for pid in pids:
        if pid not in problems:
            raise KeyError(f"ScienceQA problem {pid!r} of the split is not in problems.json")
        problem = problems[pid]
        source, target = problem_texts(pid, problem, prompt_format)
        if problem.get("image") is None:
            records.append(
                {
                    "id": pid,
                    "conversations": [{"from": "human", "value": source}, {"from": "gpt", "value": target}],
                }
            )
        else:
            records.append(
                {
                    "id": pid,
                    "image": os.path.join(image_prefix, pid, problem["image"]),
                    "conversations": [
                        {"from": "human", "value": f"{source}\n<image>"},
                        {"from": "gpt", "value": target},
                    ],
                }
            )
    return records


def convert_files(problems_path: str, splits_path: str, split: str, prompt_format: str, image_prefix: str = ""):
    """Read ``problems.json`` and ``pid_splits.json`` and convert one split (see `convert`)."""
    with as_path(problems_path).open("r", encoding="utf-8") as f:
        problems = json.load(f)
    with as_path(splits_path).open("r", encoding="utf-8") as f:
        splits = json.load(f)
    if split not in splits:
        raise KeyError(f"split {split!r} is not in {splits_path} (it has {sorted(splits)})")
    return convert(problems, splits[split], prompt_format, image_prefix)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llava_jax.data.scienceqa", description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", required=True, help="ScienceQA problems.json")
    parser.add_argument("--splits", required=True, help="ScienceQA pid_splits.json")
    parser.add_argument("--split", required=True, help="split to convert: train, val, test, minival, ...")
    parser.add_argument("--format", default="QCM-LEA", help="prompt format INPUT-OUTPUT (default QCM-LEA)")
    parser.add_argument("--out", required=True, help="output LLaVA JSON file")
    parser.add_argument("--image-prefix", default="", help="folder put before <pid>/image.png in image paths")
    args = parser.parse_args(argv)
    try:
        records = convert_files(args.problems, args.splits, args.split, args.format, args.image_prefix)
    except (KeyError, ValueError) as err:
        parser.exit(2, f"error: {err.args[0] if err.args else err}\n")
    with as_path(args.out).open("w", encoding="utf-8") as f:
        json.dump(records, f, indent=2)
    n_image = sum("image" in r for r in records)
    print(f"{len(records)} samples ({n_image} with an image) -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
