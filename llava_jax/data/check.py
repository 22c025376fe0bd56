"""Check a LLaVA dataset before training: what would be skipped, what would be trained wrongly.

    python -m llava_jax.data.check DATA.json --image-folder DIR --template v1 --max-length 2048 --image-size 336

Every record goes through the training path's own checks (`tokenize_record` with the template and
tokenizer, the image-token count, the image file) in worker processes (all cores by default), and
the report gives, per reason, how many samples and a few examples:

would fail under ``on_bad_sample="raise"`` (skipped under ``"skip"``):
  malformed_record       not an object, no/invalid conversations or image field
  missing_image          the image file does not exist
  unreadable_image       empty, corrupt, truncated or oversized image file
  placeholder_mismatch   ``<image>`` missing, repeated, in a gpt turn, or in a text-only record
  bad_roles              turns do not alternate human, gpt, ... starting with human
  empty_turn             a turn with no text
  no_target_token        no gpt reply, or no trained token left within max_length
  image_past_max_length  the image tokens end beyond max_length
  template_mismatch      e.g. a multi-turn record under the plain (captioning) template
would be trained wrongly (no error):
  text_cut               longer than max_length: the end of the conversation is cut off

plus a histogram of token lengths (before cutting, image tokens included). Exit status: 1 when any
sample would fail under ``raise`` (2 with ``--strict`` when only text is cut), else 0.

Images are checked once per distinct file: ``--images header`` (default) opens the header (format,
size, the decompression-bomb limit), ``--images decode`` decodes every pixel as training does
(catches truncated files; slower), ``--images none`` skips them.
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing
import os
import re
import sys
import time

import numpy as np

from llava_jax.data.conversation_tokens import tokenize_record
from llava_jax.data.errors import BadSample
from llava_jax.data.image import DEFAULT_MAX_PIXELS, open_image
from llava_jax.data.sources import LlavaJsonSource
from llava_jax.data.templates import TEMPLATES, get_template
from llava_jax.data.tokenizer import IGNORE_INDEX, IMAGE_TOKEN_ID

FAIL_REASONS = (
    "malformed_record",
    "missing_image",
    "unreadable_image",
    "placeholder_mismatch",
    "bad_roles",
    "empty_turn",
    "no_target_token",
    "image_past_max_length",
    "template_mismatch",
)
WARN_REASONS = ("text_cut",)
IMAGE_MODES = ("header", "decode", "none")
_CHUNK = 1000

# BadSample messages of `tokenize_record` -> reason keys (first match wins).
_PATTERNS = [
    (re.compile(r"placeholder"), "placeholder_mismatch"),
    (re.compile(r"must alternate"), "bad_roles"),
    (re.compile(r"empty or non-text value"), "empty_turn"),
    (re.compile(r"no 'gpt' reply|no target tokens"), "no_target_token"),
    (re.compile(r"image tokens end at position"), "image_past_max_length"),
    (re.compile(r"plain template|plain \(captioning\) template"), "template_mismatch"),
]


def reason_of(message: str) -> str:
    """The reason key of a `BadSample` message from the tokenizer path."""
    for pattern, reason in _PATTERNS:
        if pattern.search(message):
            return reason
    return "malformed_record"


def check_text(record: dict, template, encoder, num_image_tokens: int, max_length: int):
    """One normalized record -> (full token length, reason or None, message).

    Tokenizes once without a length limit and applies `tokenize_conversation`'s cut rules: the
    sample is cut to max_length; that fails when the image tokens do not fit or no target token is
    left, and is reported as ``text_cut`` otherwise.
    """
    rid = record.get("id")
    if record.get("_error"):
        return 0, "malformed_record", record["_error"]
    try:
        tokens = tokenize_record(record, template, encoder, num_image_tokens, 1 << 30)
    except BadSample as e:
        return 0, reason_of(e.reason), str(e)
    ids, labels = tokens["input_ids"], tokens["labels"]
    n = len(ids)
    has_image = record.get("image") is not None
    n_image = int(np.count_nonzero(ids == IMAGE_TOKEN_ID))
    if n_image != (num_image_tokens if has_image else 0):
        return (
            n,
            "placeholder_mismatch",
            f"bad sample {rid!r}: {n_image} image tokens after tokenization",
        )
    if n > max_length:
        image_end = int(np.flatnonzero(ids == IMAGE_TOKEN_ID)[-1]) + 1 if n_image else 0
        if image_end > max_length:
            return (
                n,
                "image_past_max_length",
                f"bad sample {rid!r}: the image tokens end at position {image_end} > max_length={max_length}",
            )
        if not (labels[:max_length] != IGNORE_INDEX).any():
            return (
                n,
                "no_target_token",
                f"bad sample {rid!r}: no target tokens left within max_length={max_length}",
            )
        lost = int(np.count_nonzero(labels[max_length:] != IGNORE_INDEX))
        return (
            n,
            "text_cut",
            f"sample {rid!r}: {n} tokens > max_length={max_length}; {lost} target tokens cut off",
        )
    return n, None, ""


def check_image(path: str, mode: str, max_pixels: int) -> tuple[str, str] | None:
    """(reason, message) for an image that training could not read, else None."""
    if not os.path.exists(path):
        return "missing_image", f"image file not found: {path}"
    if mode == "none":
        return None
    try:
        if mode == "decode":
            open_image(path, max_pixels=max_pixels)
        else:
            from PIL import Image

            if os.path.getsize(path) == 0:
                return "unreadable_image", f"image file is empty: {path}"
            with Image.open(path) as img:
                w, h = img.size
            if w * h > max_pixels:
                return (
                    "unreadable_image",
                    f"image is {w}x{h}, more than max_pixels={max_pixels}: {path}",
                )
    except BadSample as e:
        return "unreadable_image", f"{e.reason}: {path}"
    except Exception as e:  # noqa: BLE001 (Pillow raises many types for a bad header)
        return (
            "unreadable_image",
            f"not a readable image ({type(e).__name__}: {e}): {path}",
        )
    return None


# Worker side: the source and settings are inherited by fork (or rebuilt once per worker by spawn).
_STATE: dict = {}


def _init_worker(state: dict) -> None:
    _STATE.clear()
    _STATE.update(state)
    if _STATE.get("source") is None:
        _STATE["source"] = LlavaJsonSource(state["json_path"], state["image_folder"])


def _check_records(bounds: tuple[int, int]):
    s = _STATE
    start, end = bounds
    lengths = np.zeros(end - start, np.int32)
    bad, images = [], []
    for i in range(start, end):
        record = s["source"][i]
        n, reason, message = check_text(record, s["template"], s["encoder"], s["num_image_tokens"], s["max_length"])
        lengths[i - start] = n
        if reason:
            bad.append((i, record.get("id"), reason, message))
        if record.get("image") is not None and not record.get("_error") and record.get("image_path"):
            images.append((i, record["image_path"]))
    return start, lengths, bad, images


def _check_images(paths: list[str]):
    s = _STATE
    return [(p, check_image(p, s["image_mode"], s["max_pixels"])) for p in paths]


def run_checks(
    json_path: str,
    image_folder: str | None,
    *,
    template: str,
    tokenizer,
    max_length: int,
    num_image_tokens: int,
    image_mode: str = "header",
    workers: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = True,
) -> dict:
    """Check every record; returns {"n", "lengths": int32 [n], "bad": [(index, id, reason, message)], "seconds"}."""
    from tqdm import tqdm

    from llava_jax.data.tokenizer import text_encoder

    t0 = time.perf_counter()
    source = LlavaJsonSource(json_path, image_folder)
    workers = workers or os.cpu_count() or 1
    state = {
        "template": get_template(template),
        "encoder": text_encoder(tokenizer),
        "max_length": max_length,
        "num_image_tokens": num_image_tokens,
        "image_mode": image_mode,
        "max_pixels": max_pixels,
        "json_path": json_path,
        "image_folder": image_folder,
    }
    n = len(source)
    chunks = [(i, min(n, i + _CHUNK)) for i in range(0, n, _CHUNK)]
    lengths = np.zeros(n, np.int32)
    with tqdm(total=n, unit="sample", disable=not progress, desc="check") as bar:
        pool, results = _start_record_checks(state, source, workers, chunks)
        try:
            bad, record_images = _collect_record_checks(results, lengths, bar)
            if image_mode != "none":
                bad += _image_failures(pool, record_images, source)
        finally:
            if pool is not None:
                pool.close()
                pool.join()
    bad.sort(key=lambda b: (b[0], b[2]))
    return {
        "n": n,
        "lengths": lengths,
        "bad": bad,
        "seconds": time.perf_counter() - t0,
        "workers": workers,
    }


def _start_record_checks(state: dict, source, workers: int, chunks: list[tuple[int, int]]):
    """(pool or None, iterator of `_check_records` results over `chunks`): in this process for one worker, else in
    a fork (the source inherited) or spawn (each worker reopens it) pool that the caller closes."""
    fork = "fork" in multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if fork else "spawn")
    if fork:
        state["source"] = source  # inherited, not pickled
    if workers == 1:
        _init_worker({**state, "source": source})
        return None, map(_check_records, chunks)
    _STATE["source"] = source
    pool = ctx.Pool(
        workers,
        initializer=_init_worker,
        initargs=({**state, "source": None} if not fork else state,),
    )
    return pool, pool.imap_unordered(_check_records, chunks)


def _collect_record_checks(results, lengths: np.ndarray, bar) -> tuple[list, list]:
    """Fill `lengths` (int32 [n]) from the chunk results; returns (bad records, [(index, image path)])."""
    bad, record_images = [], []
    for start, chunk_lengths, chunk_bad, chunk_images in results:
        lengths[start : start + len(chunk_lengths)] = chunk_lengths
        bad += chunk_bad
        record_images += chunk_images
        bar.update(len(chunk_lengths))
    return bad, record_images


def _image_failures(pool, record_images: list[tuple[int, str]], source) -> list[tuple]:
    """Check each distinct image once (in `pool` when given); returns (index, id, reason, message) for every
    record whose image failed."""
    paths = sorted({p for _, p in record_images})
    groups = [paths[i : i + _CHUNK] for i in range(0, len(paths), _CHUNK)]
    image_results = pool.imap_unordered(_check_images, groups) if pool else map(_check_images, groups)
    failed = {p: r for group in image_results for p, r in group if r is not None}
    return [(i, source[i].get("id"), *failed[p]) for i, p in record_images if p in failed]


def histogram(lengths: np.ndarray, max_length: int, bins: int = 8) -> list[tuple[int, int, int]]:
    """(low, high, count) buckets of equal width up to max(max_length, longest), as text-friendly rows."""
    top = max(int(lengths.max(initial=0)), max_length)
    width = max(1, -(-top // bins))
    edges = [i * width for i in range(bins + 1)]
    counts = np.histogram(lengths, bins=edges)[0]
    return [(edges[i], edges[i + 1], int(c)) for i, c in enumerate(counts)]


def format_report(result: dict, max_length: int, examples: int = 3) -> str:
    n, bad, lengths = result["n"], result["bad"], result["lengths"]
    by_reason: dict[str, list] = collections.defaultdict(list)
    for b in bad:
        by_reason[b[2]].append(b)
    failing = {b[0] for b in bad if b[2] in FAIL_REASONS}
    lines = [
        (
            f"checked {n} samples in {result['seconds']:.1f} s ({n / max(result['seconds'], 1e-9):.0f} samples/s, "
            f"{result['workers']} workers)"
        )
    ]
    for title, reasons in (
        ("would fail under on_bad_sample=raise (skipped under skip)", FAIL_REASONS),
        ("would be trained wrongly (no error)", WARN_REASONS),
    ):
        count = len(failing) if reasons is FAIL_REASONS else len({b[0] for r in reasons for b in by_reason[r]})
        lines.append(f"{title}: {count}")
        for reason in reasons:
            for k, (i, _rid, _, message) in enumerate(by_reason[reason]):
                if k == 0:
                    lines.append(f"  {reason:22s} {len(by_reason[reason]):8d}")
                if k < examples:
                    lines.append(f"      #{i} {message}")
    ok = lengths[lengths > 0]
    if len(ok):
        p50, p90, p99 = np.percentile(ok, [50, 90, 99]).astype(int)
        lines.append(
            f"token lengths (image tokens included, before the cut at {max_length}): "
            f"p50 {p50}  p90 {p90}  p99 {p99}  max {int(ok.max())}"
        )
        rows = histogram(ok, max_length)
        peak = max(c for _, _, c in rows) or 1
        for lo, hi, c in rows:
            mark = "  > max_length" if lo >= max_length else ""
            lines.append(f"  {lo:6d}-{hi:<6d} {c:8d} {'#' * round(40 * c / peak)}{mark}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llava_jax.data.check", description=__doc__.split("\n\n")[0])
    p.add_argument("data", help="LLaVA JSON (.json list or .jsonl)")
    p.add_argument(
        "--image-folder",
        help="folder the records' 'image' paths are relative to (default: the JSON's folder)",
    )
    p.add_argument("--template", default="v1", choices=sorted(TEMPLATES))
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--image-size", type=int, default=336)
    p.add_argument("--patch-size", type=int, default=14)
    p.add_argument("--num-image-tokens", type=int, help="default (image_size / patch_size) ** 2")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the vendored LLaMA tokenizer)")
    p.add_argument("--images", choices=IMAGE_MODES, default="header")
    p.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_PIXELS)
    p.add_argument("--workers", type=int, help="processes (default: all cores)")
    p.add_argument(
        "--report",
        help="write every flagged sample as JSON Lines {index, id, reason, message}",
    )
    p.add_argument("--examples", type=int, default=3, help="examples shown per reason")
    p.add_argument(
        "--strict",
        action="store_true",
        help="exit 2 when samples would be cut (text_cut)",
    )
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    from llava_jax.data.tokenizer import load_tokenizer

    num_image_tokens = args.num_image_tokens or (args.image_size // args.patch_size) ** 2
    tokenizer = load_tokenizer(args.tokenizer)
    result = run_checks(
        args.data,
        args.image_folder,
        template=args.template,
        tokenizer=tokenizer,
        max_length=args.max_length,
        num_image_tokens=num_image_tokens,
        image_mode=args.images,
        workers=args.workers,
        max_pixels=args.max_image_pixels,
        progress=not args.no_progress,
    )
    print(format_report(result, args.max_length, args.examples))
    if args.report:
        with open(args.report, "w", encoding="utf-8") as f:
            f.writelines(
                json.dumps(
                    {"index": i, "id": rid, "reason": reason, "message": message},
                    ensure_ascii=False,
                )
                + "\n"
                for i, rid, reason, message in result["bad"]
            )
    reasons = {b[2] for b in result["bad"]}
    if reasons & set(FAIL_REASONS):
        return 1
    return 2 if args.strict and reasons else 0


if __name__ == "__main__":
    sys.exit(main())
