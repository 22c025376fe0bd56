"""Summarize LLaVA-Bench reviews: ``python -m llava_jax.eval.summarize_review -f reviews.jsonl``.

Prints what the original ``summarize_gpt_review.py`` prints, for review files of either code base:
the file's name (``gpt4_text_`` and ``.jsonl`` removed), then per category (sorted, ``all`` among
them) one line ``<category> <relative> <reference x 10> <model x 10>``, where the means of the
reference's and the model's scores are rounded to 3 decimals, relative = round(100 x model /
reference, 1) and the x10 figures are rounded to 1 decimal; then a line of ``=``.

Unlike the original, reviews whose scores did not parse (``failed`` true, or the original's
[-1, -1]) are left out of the means, and their number is printed.

Flags as the original: ``-f`` files, or ``-d`` a folder (with ``-s`` substrings every name must
contain, ``-v`` judge version 0314/0613), ``-i`` question ids to ignore.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from collections.abc import Sequence


def is_failed(review: dict) -> bool:
    scores = review.get("tuple", review.get("score"))
    return bool(review.get("failed")) or scores is None or list(scores) == [-1, -1]


def summarize(reviews: Sequence[dict], ignore: Sequence = ()) -> tuple[dict[str, tuple[float, float, float]], int]:
    """-> ({category: (relative, reference x 10, model x 10)}, number of failed reviews left out)."""
    scores = defaultdict(list)
    failed = 0
    for r in reviews:
        if r["question_id"] in ignore:
            continue
        if is_failed(r):
            failed += 1
            continue
        pair = r["tuple"] if "tuple" in r else r["score"]
        if "category" in r:
            scores[r["category"]].append(pair)
        scores["all"].append(pair)
    out = {}
    for k, pairs in sorted(scores.items()):
        ref = round(sum(p[0] for p in pairs) / len(pairs), 3)
        model = round(sum(p[1] for p in pairs) / len(pairs), 3)
        out[k] = (round(model / ref * 100, 1) if ref else float("nan"), round(ref * 10, 1), round(model * 10, 1))
    return out, failed


def review_files(args) -> list[str]:
    if args.files:
        return list(args.files)
    if not args.dir:
        raise SystemExit("error: give review files with -f, or a folder with -d")
    return [
        x
        for x in os.listdir(args.dir)
        if x.endswith(".jsonl") and (x.startswith(("gpt4_text", "reviews_", "review_")) or "review" in args.dir)
    ]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llava_jax.eval.summarize_review", description=__doc__.split("\n")[0])
    p.add_argument("-d", "--dir", default=None)
    p.add_argument("-v", "--version", default=None)
    p.add_argument("-s", "--select", nargs="*", default=None)
    p.add_argument("-f", "--files", nargs="*", default=[])
    p.add_argument("-i", "--ignore", nargs="*", default=[])
    args = p.parse_args(argv)
    ignore = [int(x) for x in args.ignore]
    for name in sorted(review_files(args)):
        config = os.path.basename(name).replace("gpt4_text_", "").replace(".jsonl", "")
        if args.select is not None and any(x not in config for x in args.select):
            continue
        version = "0613" if "0613" in config else "0314"
        if args.version is not None and args.version != version:
            continue
        path = os.path.join(args.dir, name) if args.dir is not None else name
        with open(path, encoding="utf-8") as f:
            reviews = [json.loads(line) for line in f if line.strip()]
        table, failed = summarize(reviews, ignore)
        print(config)
        for k, (rel, ref, model) in table.items():
            print(k, rel, ref, model)
        if failed:
            print(f"({failed} review{'s' * (failed != 1)} without scores left out of the means)")
        print("=================================")
    return 0


if __name__ == "__main__":
    sys.exit(main())
