"""Dataset-checker throughput on a synthetic LLaVA-Instruct-sized file.

    python -m llava_jax.bench check [--num 158000] [--images 5000] [--workers N] [--image-check header]

Writes `--num` records shaped like LLaVA-Instruct-158K (37% multi-turn conversations, 15% detailed
descriptions, 48% complex reasoning; random words, 500-1100 tokens with 576 image tokens at 336 px)
over `--images` distinct small JPEGs into a temporary folder, then runs `python -m llava_jax.data.check`'s
`run_checks` on it (v1 template, max_length 2048). Prints samples/s (wall clock) and samples per
CPU-second of this process and its workers, which does not depend on what else runs on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import tempfile
import time

import numpy as np
from PIL import Image

_WORDS = [
    "the",
    "a",
    "man",
    "woman",
    "dog",
    "cat",
    "table",
    "street",
    "car",
    "red",
    "blue",
    "sitting",
    "standing",
    "near",
    "next",
    "to",
    "on",
    "in",
    "with",
    "of",
    "large",
    "small",
    "image",
    "shows",
    "several",
    "people",
    "playing",
]


def write_dataset(folder: str, num: int, num_images: int, seed: int = 0) -> str:
    """The synthetic JSON (see the module docstring) and its images under `folder`; returns the JSON path."""
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    pixels = np.random.default_rng(seed)
    for i in range(num_images):
        img = pixels.integers(0, 255, (48, 64, 3), dtype=np.uint8)
        Image.fromarray(img).save(os.path.join(folder, "images", f"{i:012d}.jpg"), quality=80)
    rng = random.Random(seed)

    def sentence(k: int) -> str:
        return " ".join(rng.choice(_WORDS) for _ in range(k)).capitalize() + "."

    def paragraph(lo: int, hi: int) -> str:
        return " ".join(sentence(rng.randint(8, 20)) for _ in range(rng.randint(lo, hi)))

    records = []
    for _ in range(num):
        kind = rng.random()
        image = f"{rng.randrange(num_images):012d}.jpg"
        if kind < 0.37:
            turns = []
            for _ in range(rng.randint(3, 5)):
                turns += [sentence(rng.randint(6, 12))[:-1] + "?", paragraph(1, 5)]
        elif kind < 0.52:
            turns = ["Describe the following image in detail", paragraph(5, 9)]
        else:
            turns = [sentence(10)[:-1] + "?", paragraph(4, 8)]
        turns[0] = "<image>\n" + turns[0] if rng.random() < 0.5 else turns[0] + "\n<image>"
        records.append(
            {
                "id": image[:-4],
                "image": image,
                "conversations": [{"from": ("human", "gpt")[k % 2], "value": v} for k, v in enumerate(turns)],
            }
        )
    path = os.path.join(folder, "data.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(records, f)
    return path


def _cpu_seconds() -> float:
    own, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llava_jax.bench check", description=__doc__.split("\n\n")[0])
    p.add_argument("--num", type=int, default=158_000)
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--workers", type=int, help="default: all cores")
    p.add_argument("--image-check", choices=("header", "decode", "none"), default="header")
    p.add_argument("--out", help="also write the result as JSON here")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    from llava_jax.data.check import format_report, run_checks
    from llava_jax.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        path = write_dataset(tmp, args.num, args.images)
        size_mb = os.path.getsize(path) / 1e6
        print(
            f"wrote {args.num} records ({size_mb:.0f} MB), {args.images} images in {time.perf_counter() - t0:.0f} s",
            flush=True,
        )
        cpu0 = _cpu_seconds()
        result = run_checks(
            path,
            os.path.join(tmp, "images"),
            template="v1",
            tokenizer=tokenizer,
            max_length=2048,
            num_image_tokens=576,
            image_mode=args.image_check,
            workers=args.workers,
        )
        cpu = _cpu_seconds() - cpu0
    print(format_report(result, 2048))
    summary = {
        "samples": result["n"],
        "seconds": round(result["seconds"], 1),
        "workers": result["workers"],
        "samples_per_s": round(result["n"] / result["seconds"], 1),
        "cpu_seconds": round(cpu, 1),
        "samples_per_cpu_s": round(result["n"] / max(cpu, 1e-9), 1),
        "load_average": os.getloadavg()[0],
        "cores": os.cpu_count(),
        "file_mb": round(size_mb),
    }
    print(json.dumps(summary))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
