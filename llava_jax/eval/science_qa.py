"""ScienceQA scoring: ``python -m llava_jax.eval.science_qa``, as the original ``eval_science_qa.py``.

    python -m llava_jax.eval.science_qa --base-dir ScienceQA/data/scienceqa --result-file answers/sqa.jsonl \\
        --output-file sqa_output.json --output-result sqa_result.json [--split test] [--failed random --seed 0]

Inputs: ``problems.json`` and ``pid_splits.json`` from ``--base-dir``, and an answers file (JSONL
``question_id, prompt, text``) from `model_vqa` or the original code.

Parsing an answer text (`parse_answer`), in this order:

1. the whole text is an option letter (``"B"``);
2. it starts with a letter followed by ``". "`` (``"B. The fern"``);
3. the pattern ``The answer is ([A-Z]).`` (the dot matches any character, as in the original)
   occurs exactly once.

Anything else is ``FAILED``. A letter beyond the problem's choices, a FAILED parse and a question
without an answer line score as wrong (index -1) by default; ``--failed random --seed N`` instead
picks a uniformly random choice, as the paper-era script did, but from a seeded generator so the
number is reproducible.

Outputs, in the original's formats: ``--output-file`` ``{"correct": [...], "incorrect": [...]}`` (one
analysis per question) and ``--output-result`` ``{"acc", "correct", "count", "results": {pid: index},
"outputs": {pid: text}}`` (``results`` is what ScienceQA's ``tools/evaluate_acc.py`` reads). The
paper's table is printed and written to ``--output-table`` (default: next to ``--output-result``).

Table columns (as ScienceQA defines them, over the problems of the split):
NAT / SOC / LAN: subject natural / social / language science; TXT: a non-empty ``hint`` (text
context); IMG: an ``image``; NO: neither; G1-6 / G7-12: ``grade1``-``grade6`` / ``grade7``-``grade12``;
Avg: all.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random
import re
import sys
from collections.abc import Mapping, Sequence

OPTIONS = ("A", "B", "C", "D", "E")
FAILED = "FAILED"
ANSWER_PATTERN = re.compile(r"The answer is ([A-Z]).")

COLUMNS = ("NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12", "Avg")
_SUBJECTS = {"NAT": "natural science", "SOC": "social science", "LAN": "language science"}


def parse_answer(text: str, options: Sequence[str] = OPTIONS) -> str:
    """Answer text -> option letter, or ``FAILED`` (see the module docstring for the rules)."""
    if text in options:
        return text
    if len(text) >= 3 and text[0] in options and text[1:3] == ". ":
        return text[0]
    found = ANSWER_PATTERN.findall(text)
    return found[0] if len(found) == 1 else FAILED


def choice_index(
    letter: str, num_choices: int, options: Sequence[str] = OPTIONS, rng: random.Random | None = None
) -> int:
    """Letter -> choice index; a letter that is not among the problem's choices gives -1, or with `rng`
    a random choice (the paper-era fallback)."""
    if letter in options[:num_choices]:
        return options.index(letter)
    return rng.randrange(num_choices) if rng is not None else -1


def categories(problem: Mapping) -> list[str]:
    """The table columns a problem counts in (Avg always)."""
    cols = [c for c, subject in _SUBJECTS.items() if problem.get("subject") == subject]
    has_text, has_image = bool(problem.get("hint")), bool(problem.get("image"))
    cols += ["TXT"] * has_text + ["IMG"] * has_image + ["NO"] * (not has_text and not has_image)
    grade = str(problem.get("grade", ""))
    if grade.startswith("grade") and grade[5:].isdigit():
        cols.append("G1-6" if int(grade[5:]) <= 6 else "G7-12")
    return cols + ["Avg"]


def table(problems: Mapping[str, Mapping], correct: Mapping[str, bool]) -> dict[str, dict]:
    """Per column: {"correct", "count", "acc" (percent, None when empty)} over the pids of `correct`."""
    out = {c: {"correct": 0, "count": 0} for c in COLUMNS}
    for pid, ok in correct.items():
        for c in categories(problems[pid]):
            out[c]["count"] += 1
            out[c]["correct"] += int(ok)
    for row in out.values():
        row["acc"] = 100.0 * row["correct"] / row["count"] if row["count"] else None
    return out


def format_table(rows: Mapping[str, Mapping]) -> str:
    """Markdown table: one header row, one row of accuracies (two decimals)."""
    cells = [f"{rows[c]['acc']:.2f}" if rows[c]["acc"] is not None else "-" for c in COLUMNS]
    return "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n| " + " | ".join(cells) + " |"


def load_split(base_dir, split: str) -> dict[str, dict]:
    """pid -> problem for the split, in ``pid_splits.json`` order."""
    base = pathlib.Path(base_dir)
    for name in ("problems.json", "pid_splits.json"):
        if not (base / name).exists():
            raise FileNotFoundError(
                f"{base / name} not found: --base-dir must hold ScienceQA's problems.json and pid_splits.json"
            )
    splits = json.loads((base / "pid_splits.json").read_text())
    if split not in splits:
        raise ValueError(f"split {split!r} is not in {base / 'pid_splits.json'} (has {sorted(splits)})")
    problems = json.loads((base / "problems.json").read_text())
    missing = [p for p in splits[split] if p not in problems]
    if missing:
        raise ValueError(f"{len(missing)} pids of split {split!r} are not in problems.json, e.g. {missing[:3]}")
    return {pid: problems[pid] for pid in splits[split]}


def read_predictions(path) -> dict[str, dict]:
    """Answers JSONL -> {question_id as str: record}."""
    out = {}
    for n, line in enumerate(pathlib.Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: not valid JSON ({err.msg})") from None
            out[str(rec["question_id"])] = rec
    return out


def score(
    split_problems: Mapping[str, Mapping],
    predictions: Mapping[str, Mapping],
    *,
    failed: str = "wrong",
    seed: int = 0,
    options: Sequence[str] = OPTIONS,
) -> tuple[dict, dict, dict]:
    """Score predictions against the split's problems.

    Returns (output_file, output_result, table) as the module docstring describes.
    """
    rng = random.Random(seed) if failed == "random" else None
    results: dict[str, list] = {"correct": [], "incorrect": []}
    sqa = {"acc": None, "correct": None, "count": None, "results": {}, "outputs": {}}
    correct: dict[str, bool] = {}
    for pid, prob in split_problems.items():
        pred = predictions.get(pid, {"text": FAILED, "prompt": "Unknown"})
        text = pred["text"]
        letter = parse_answer(text, options)
        index = choice_index(letter, len(prob["choices"]), options, rng)
        analysis = {
            "question_id": pid,
            "parsed_ans": letter,
            "ground_truth": options[prob["answer"]],
            "question": pred["prompt"],
            "pred": text,
            "is_multimodal": "<image>" in pred["prompt"],
        }
        sqa["results"][pid] = index
        sqa["outputs"][pid] = text
        correct[pid] = index == prob["answer"]
        results["correct" if correct[pid] else "incorrect"].append(analysis)
    n_correct, total = len(results["correct"]), len(split_problems)
    sqa.update(acc=100.0 * n_correct / total if total else 0.0, correct=n_correct, count=total)
    return results, sqa, table(split_problems, correct)


def summary_line(results: Mapping) -> str:
    """The original's printed line: total, correct, accuracy and IMG accuracy (by ``<image>`` in the prompt)."""
    correct, incorrect = results["correct"], results["incorrect"]
    total = len(correct) + len(incorrect)
    mm_ok = sum(x["is_multimodal"] for x in correct)
    mm_total = mm_ok + sum(x["is_multimodal"] for x in incorrect)
    acc = 100.0 * len(correct) / total if total else 0.0
    img = f"{100.0 * mm_ok / mm_total:.2f}%" if mm_total else "n/a"
    return f"Total: {total}, Correct: {len(correct)}, Accuracy: {acc:.2f}%, IMG-Accuracy: {img}"


def write_json(path, obj) -> None:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2))


def default_table_path(output_result) -> pathlib.Path:
    p = pathlib.Path(output_result)
    return p.with_name(p.stem + "_table.json")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m llava_jax.eval.science_qa", description=__doc__.split("\n")[0])
    p.add_argument("--base-dir", required=True, help="folder with problems.json and pid_splits.json")
    p.add_argument("--result-file", required=True, help="answers JSONL")
    p.add_argument("--output-file", required=True, help="per-question analysis (correct / incorrect lists)")
    p.add_argument("--output-result", required=True, help="acc, correct, count, results, outputs")
    p.add_argument(
        "--output-table", default=None, help="the paper's table as JSON (default: <output-result>_table.json)"
    )
    p.add_argument("--split", default="test")
    p.add_argument(
        "--failed",
        choices=("wrong", "random"),
        default="wrong",
        help="unparsed answers: wrong (default) or a seeded random choice (paper-era behaviour)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of --failed random")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    problems = load_split(args.base_dir, args.split)
    results, sqa, rows = score(problems, read_predictions(args.result_file), failed=args.failed, seed=args.seed)
    print(summary_line(results))
    print(format_table(rows))
    write_json(args.output_file, results)
    write_json(args.output_result, sqa)
    write_json(args.output_table or default_table_path(args.output_result), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
