"""Stage-1 (feature alignment) data: (image, caption) pairs -> caption conversations, CC-595K style.

    python -m llava_jax.datagen.captions --input pairs.jsonl --out chat.json [--seed 0]

Input: JSON Lines or a JSON list of ``{"image": "...", "caption": "..."}`` (``--caption-key`` picks
another key, e.g. ``blip_caption``), or a COCO captions file (one record per caption). Each pair
becomes ``{"id", "image", "conversations": [human: brief instruction + <image>, gpt: caption]}``
with the instruction drawn from the paper's 11 brief-description prompts and ``<image>`` on its own
line before or after it (both drawn from --seed and the pair's index). Pairs with an empty caption or
no image are counted and left out.

Concept-balanced subsets (the paper's CC3M filter): `filter_by_noun_phrases` keeps, for every
noun phrase seen at least `min_count` times, all its captions or a random `max_per_phrase` of them.
It needs a noun-phrase extractor; `spacy_noun_phrases` uses spaCy with an English pipeline, which
pip cannot fetch from PyPI (``python -m spacy download en_core_web_sm`` needs GitHub access), so
``--noun-phrase-filter`` works only where that model is installed.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import sys
from collections.abc import Callable, Iterable, Sequence

from llava_jax.datagen.build import place_image
from llava_jax.datagen.instructions import BRIEF


def read_pairs(path: str, caption_key: str = "caption") -> list[tuple[str, str]]:
    """(image, caption) pairs from JSON Lines, a JSON list, or a COCO captions file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"caption file not found: {path}")
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            rows = [json.loads(line) for line in f if line.strip()]
        else:
            data = json.load(f)
            if isinstance(data, dict) and "annotations" in data and "images" in data:
                names = {im["id"]: im["file_name"] for im in data["images"]}
                return [(names[a["image_id"]], str(a.get("caption", ""))) for a in data["annotations"]]
            if not isinstance(data, list):
                raise ValueError(f"{path}: expected a JSON list of {{image, {caption_key}}} or a COCO captions file")
            rows = data
    return [(str(r.get("image") or ""), str(r.get(caption_key) or "")) for r in rows]


def caption_records(pairs: Sequence[tuple[str, str]], *, seed: int = 0) -> tuple[list[dict], collections.Counter]:
    """Pairs -> LLaVA records and a counter of skipped pairs per reason."""
    records, skipped = [], collections.Counter()
    for i, (image, caption) in enumerate(pairs):
        caption = caption.strip()
        if not image:
            skipped["no_image"] += 1
            continue
        if not caption:
            skipped["empty_caption"] += 1
            continue
        if "<image>" in caption:
            skipped["image_placeholder_in_caption"] += 1
            continue
        rng = random.Random(f"{seed}\x00{i}")
        instruction = place_image(rng.choice(BRIEF), "random", rng)
        stem = os.path.splitext(os.path.basename(image))[0]
        records.append(
            {
                "id": stem,
                "image": image,
                "conversations": [
                    {"from": "human", "value": instruction},
                    {"from": "gpt", "value": caption},
                ],
            }
        )
    return records, skipped


def filter_by_noun_phrases(
    captions: Sequence[str],
    noun_phrases: Callable[[str], Iterable[str]],
    *,
    min_count: int = 3,
    max_per_phrase: int = 100,
    seed: int = 0,
) -> list[int]:
    """Indices of a concept-balanced subset of `captions` (sorted).

    A noun phrase (lower-cased) found in fewer than `min_count` captions is ignored; for every other
    phrase, all its captions are kept when it has at most `max_per_phrase`, else a random
    `max_per_phrase` of them. A caption is kept when any of its phrases keeps it.
    """
    by_phrase: dict[str, list[int]] = collections.defaultdict(list)
    for i, caption in enumerate(captions):
        for phrase in {p.strip().lower() for p in noun_phrases(caption) if p.strip()}:
            by_phrase[phrase].append(i)
    rng = random.Random(seed)
    keep: set[int] = set()
    for phrase in sorted(by_phrase):
        ids = by_phrase[phrase]
        if len(ids) < min_count:
            continue
        keep.update(ids if len(ids) <= max_per_phrase else rng.sample(ids, max_per_phrase))
    return sorted(keep)


def spacy_noun_phrases(model: str = "en_core_web_sm") -> Callable[[str], list[str]]:
    """A spaCy noun-chunk extractor; ImportError/OSError with the install steps when missing."""
    try:
        import spacy  # type: ignore[import-not-found]
    except ImportError as e:
        raise ImportError(
            f"--noun-phrase-filter needs spaCy: pip install spacy && python -m spacy download {model}"
        ) from e
    try:
        nlp = spacy.load(model, disable=["ner", "lemmatizer"])
    except OSError as e:
        raise OSError(f"spaCy pipeline {model!r} is not installed: python -m spacy download {model}") from e
    return lambda text: [chunk.text for chunk in nlp(text).noun_chunks]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m llava_jax.datagen.captions",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument(
        "--input",
        required=True,
        help="JSON Lines / JSON list of {image, caption}, or COCO captions JSON",
    )
    p.add_argument("--out", required=True, help="LLaVA JSON to write")
    p.add_argument("--caption-key", default="caption")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--noun-phrase-filter",
        action="store_true",
        help="keep a concept-balanced subset (needs spaCy + en_core_web_sm)",
    )
    p.add_argument("--min-count", type=int, default=3)
    p.add_argument("--max-per-phrase", type=int, default=100)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    pairs = read_pairs(args.input, args.caption_key)
    if args.noun_phrase_filter:
        keep = filter_by_noun_phrases(
            [c for _, c in pairs],
            spacy_noun_phrases(),
            min_count=args.min_count,
            max_per_phrase=args.max_per_phrase,
            seed=args.seed,
        )
        print(f"noun-phrase filter: {len(keep)} of {len(pairs)} pairs kept")
        pairs = [pairs[i] for i in keep]
    records, skipped = caption_records(pairs, seed=args.seed)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(records, f, ensure_ascii=False)
    print(f"{len(records)} caption conversations -> {args.out}; skipped: {dict(skipped) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
