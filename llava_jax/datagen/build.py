"""Raw generated responses -> LLaVA instruction JSON, with every rejected response counted.

    python -m llava_jax.datagen.build --raw gen/ --out data/llava_instruct.json [--seed 0]

Writes, next to ``--out`` (here ``data/``):
  llava_instruct.json                  all kinds merged (kind order conversation, detail, complex)
  llava_instruct_<kind>.json           one file per kind present in the raw log
  llava_instruct_rejects.jsonl         {image, kind, reason, detail, content} per rejected response
  llava_instruct_stats.json            kept and rejected counts per kind and reason

A record is ``{"id": image stem, "image": image, "conversations": [{"from": "human", "value": ...},
{"from": "gpt", "value": ...}, ...]}`` as in LLaVA-Instruct-158K. Conversation and complex responses
give their question/answer pairs as turns; a detail response is paired with an instruction drawn from
the paper's 16 detailed-description prompts. ``<image>`` goes on its own line before or after the
first question (drawn per sample; the original data has both). Draws depend only on
(--seed, kind, image), so a rebuild gives the same file however the raw log is ordered.
Parsing and reject reasons: `llava_jax.datagen.parse`.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import sys

from llava_jax.datagen.instructions import DETAILED
from llava_jax.datagen.parse import REASONS, Rejected, parse_response
from llava_jax.datagen.prompts import KINDS
from llava_jax.datagen.rawlog import RAW_NAME, read_raw

IMAGE_POSITIONS = ("random", "before", "after")


def place_image(question: str, position: str, rng: random.Random) -> str:
    """`question` with ``<image>`` on its own line before or after it."""
    if position == "random":
        position = rng.choice(("before", "after"))
    return f"<image>\n{question}" if position == "before" else f"{question}\n<image>"


def sample_rng(seed: int, kind: str, image: str) -> random.Random:
    return random.Random(f"{seed}\x00{kind}\x00{image}")


def to_record(raw: dict, *, seed: int = 0, image_position: str = "random") -> dict:
    """One raw response -> one LLaVA record; raises `Rejected` (see `parse`)."""
    kind, image = raw["kind"], raw["image"]
    pairs = parse_response(kind, raw.get("content") or "", raw.get("finish_reason"))
    rng = sample_rng(seed, kind, image)
    if kind == "detail":
        pairs = [(rng.choice(DETAILED), pairs[0][1])]
    turns = []
    for i, (question, answer) in enumerate(pairs):
        if i == 0:
            question = place_image(question, image_position, rng)
        turns += [
            {"from": "human", "value": question},
            {"from": "gpt", "value": answer},
        ]
    return {
        "id": os.path.splitext(os.path.basename(image))[0],
        "image": image,
        "conversations": turns,
    }


def latest_responses(raw_dirs: list[str]) -> tuple[list[dict], int]:
    """Raw records of all `raw_dirs`, the last one per (image, kind) kept, in first-seen order."""
    by_key: dict[tuple[str, str], dict] = {}
    total = 0
    for d in raw_dirs:
        path = os.path.join(d, RAW_NAME) if os.path.isdir(d) else d
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no raw log at {path}: --raw takes the --out folder of llava_jax.datagen.generate")
        for record in read_raw(path):
            total += 1
            by_key[(record["image"], record["kind"])] = record
    return list(by_key.values()), total - len(by_key)


def build(raw_dirs: list[str], out_path: str, *, seed: int = 0, image_position: str = "random") -> dict:
    """Write the files listed in the module docstring; returns the stats dict."""
    if image_position not in IMAGE_POSITIONS:
        raise ValueError(f"image_position must be one of {IMAGE_POSITIONS}, got {image_position!r}")
    records, repeated = latest_responses(raw_dirs)
    kept: dict[str, list[dict]] = {k: [] for k in KINDS}
    rejected: dict[str, collections.Counter] = {k: collections.Counter() for k in KINDS}
    stem, _ = os.path.splitext(out_path)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    unknown = collections.Counter()
    with open(stem + "_rejects.jsonl", "w", encoding="utf-8") as rejects:
        for raw in records:
            kind = raw["kind"]
            if kind not in KINDS:
                unknown[kind] += 1
                continue
            try:
                kept[kind].append(to_record(raw, seed=seed, image_position=image_position))
            except Rejected as e:
                rejected[kind][e.reason] += 1
                line = {
                    "image": raw["image"],
                    "kind": kind,
                    "reason": e.reason,
                    "detail": e.detail,
                    "content": raw.get("content"),
                }
                rejects.write(json.dumps(line, ensure_ascii=False) + "\n")
    merged = [r for k in KINDS for r in kept[k]]
    _write_json(out_path, merged)
    for kind in KINDS:
        if kept[kind] or rejected[kind]:
            _write_json(f"{stem}_{kind}.json", kept[kind])
    stats = {
        "raw_responses": len(records),
        "repeated_keys_dropped": repeated,
        "unknown_kinds": dict(unknown),
        "kept": {k: len(v) for k, v in kept.items()},
        "rejected": {k: dict(c) for k, c in rejected.items()},
        "kept_total": len(merged),
        "rejected_total": sum(sum(c.values()) for c in rejected.values()),
    }
    _write_json(stem + "_stats.json", stats, indent=1)
    return stats


def _write_json(path: str, data, indent: int | None = None) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, indent=indent)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llava_jax.datagen.build", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--raw",
        required=True,
        nargs="+",
        help="generate --out folder(s) (or raw.jsonl files)",
    )
    p.add_argument(
        "--out",
        required=True,
        help="merged LLaVA JSON file; per-kind files, rejects and stats go beside it",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the instruction and <image> position draws",
    )
    p.add_argument("--image-position", choices=IMAGE_POSITIONS, default="random")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if not args.out.endswith(".json"):
        p.error("--out must be a .json file")
    stats = build(args.raw, args.out, seed=args.seed, image_position=args.image_position)
    print(
        f"{stats['kept_total']} samples -> {args.out} ({', '.join(f'{k} {n}' for k, n in stats['kept'].items())}); "
        f"{stats['rejected_total']} rejected"
    )
    for kind, reasons in stats["rejected"].items():
        for reason, n in sorted(reasons.items(), key=lambda x: -x[1]):
            print(f"  rejected {kind:12s} {reason:22s} {n:7d}  ({REASONS[reason]})")
    if stats["repeated_keys_dropped"]:
        print(f"  {stats['repeated_keys_dropped']} repeated (image, kind) responses: kept the last of each")
    return 0


if __name__ == "__main__":
    sys.exit(main())
