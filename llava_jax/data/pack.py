"""Pack a LLaVA JSON + image folder into ArrayRecord shards with the encoded images inline.

    python -m llava_jax.data.pack --json llava_v1_5_mix665k.json --image-folder data/ \
        --out packed/mix665k --num-shards 64 [--workers 8] [--verify decode]

Each record becomes one ArrayRecord entry (`sources.encode_record`: a JSON header with id,
conversations and the other record fields, followed by the image file's bytes as they are on disk:
no re-encoding, no decoded pixels). Shards hold contiguous ranges of the input, so record order is
kept. Records whose image cannot be used are left out and reported, never dropped silently:
`OUT/pack_summary.json` (counts per reason, shard sizes) and `OUT/bad_records.jsonl` (one line per
left-out record: id, path, reason).

`--verify` decides how hard images are checked: `header` (default: exists, non-empty, recognised
format, pixel count under `--max-pixels`), `decode` (also decodes every image, which catches truncated
files; slower), or `none`. Read them back with `llava_jax.data.sources.ArrayRecordSource(OUT)`.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import json
import os
import re
import sys
from collections.abc import Iterator

from llava_jax.data.errors import BadSample
from llava_jax.data.image import DEFAULT_MAX_PIXELS, open_image
from llava_jax.data.sources import ARRAY_RECORD_SUFFIX, LlavaJsonSource, encode_record
from llava_jax.paths import absolute, as_path, staged_dir

VERIFY_MODES = ("header", "decode", "none")


def _check_header(data: bytes, record_id, path: str, max_pixels: int) -> None:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
    except Exception as e:  # unknown format, broken header
        raise BadSample(record_id, f"not a readable image ({type(e).__name__}: {e})", path=path) from None
    if w * h > max_pixels:
        raise BadSample(record_id, f"image is {w}x{h} = {w * h} pixels, more than max_pixels={max_pixels}", path=path)


def read_record_image(record: dict, verify: str = "header", max_pixels: int = DEFAULT_MAX_PIXELS) -> bytes | None:
    """A normalized JSON-source record -> its image file's bytes, as on disk (None: text-only record).

    Raises BadSample (naming the record and file) for a record error, a missing 'conversations' list,
    or an image that is missing, empty or fails the `verify` check ("header", "decode" or "none").
    Shared by `pack` and the TFDS builder, so both leave out the same records for the same reasons.
    """
    rid = record.get("id")
    if record.get("_error"):
        raise BadSample(rid, record["_error"])
    conv = record.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise BadSample(rid, "record has no 'conversations' list")
    if not record.get("image"):
        return None
    path = record.get("image_path")
    if not as_path(path).is_file():
        raise BadSample(
            rid,
            "image file not found; check the image folder (pack: --image-folder; TFDS build: "
            "image_folder) and the record's 'image'",
            path=path,
        )
    data = as_path(path).read_bytes()
    if not data:
        raise BadSample(rid, "image file is empty (0 bytes)", path=path)
    if verify == "header":
        _check_header(data, rid, path, max_pixels)
    elif verify == "decode":
        open_image(data, record_id=rid, max_pixels=max_pixels, path_hint=path)
    return data


def _prepare(task: tuple[int, dict, str, int]) -> tuple[int, bytes | None, dict | None]:
    """(index, record, verify, max_pixels) -> (index, payload or None, bad-record info or None)."""
    index, record, verify, max_pixels = task
    try:
        return index, encode_record(record, read_record_image(record, verify, max_pixels)), None
    except BadSample as e:
        return index, None, {"id": e.record_id, "path": e.path, "reason": e.reason}


def _tasks(source: LlavaJsonSource, verify: str, max_pixels: int) -> Iterator[tuple[int, dict, str, int]]:
    for i in range(len(source)):
        yield i, source[i], verify, max_pixels


def reason_key(reason: str) -> str:
    """Groups reasons for the summary: drops per-file details (after '(' or ';') and numbers."""
    for sep in (" (", ";"):
        reason = reason.split(sep)[0]
    return re.sub(r"\d+", "N", reason).strip()


def pack(
    json_path: str,
    image_folder: str | None,
    out_dir: str,
    num_shards: int,
    *,
    verify: str = "header",
    workers: int = 1,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    name: str | None = None,
    progress: bool = True,
) -> dict:
    """Writes `num_shards` ArrayRecord files into `out_dir`; returns the summary dict (also written as JSON)."""
    from tqdm import tqdm

    if verify not in VERIFY_MODES:
        raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    source = LlavaJsonSource(json_path, image_folder)
    with staged_dir(out_dir) as local:  # the ArrayRecord writer writes local files; a URL gets them uploaded
        local.mkdir(parents=True, exist_ok=True)
        local_out = os.fspath(local)
        n = len(source)
        name = name or os.path.splitext(os.path.basename(json_path))[0]
        shard_files = [
            os.path.join(local_out, f"{name}-{k:05d}-of-{num_shards:05d}{ARRAY_RECORD_SUFFIX}")
            for k in range(num_shards)
        ]
        shards = _Shards(shard_files, n)
        reasons: collections.Counter = collections.Counter()
        bad_path = os.path.join(local_out, "bad_records.jsonl")

        with _prepared(source, verify, max_pixels, workers) as results:
            try:
                with (
                    open(bad_path, "w", encoding="utf-8") as bad_file,
                    tqdm(total=n, desc=f"pack {name}", unit="rec", disable=not progress) as bar,
                ):
                    for index, payload, bad in results:
                        shards.move_to(index)
                        if bad is not None:
                            reasons[reason_key(bad["reason"])] += 1
                            bad_file.write(json.dumps(bad, ensure_ascii=False) + "\n")
                        else:
                            shards.write(payload)
                        bar.update(1)
                        if reasons:
                            bar.set_postfix(skipped=sum(reasons.values()), refresh=False)
                    shards.complete()
            finally:
                shards.close()

        summary = _summary(json_path, source, shards, reasons, verify, bad_path)
        with open(os.path.join(local_out, "pack_summary.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
    return summary


class _Shards:
    """Writes records into shard files in input order: shard k takes records [k * n // K, (k + 1) * n // K)."""

    def __init__(self, files: list[str], n: int):
        self.files = files
        self.bounds = [k * n // len(files) for k in range(len(files) + 1)]
        self.counts = [0] * len(files)
        self.shard, self.writer = -1, None

    def _next(self) -> None:
        from array_record.python.array_record_module import ArrayRecordWriter

        if self.writer is not None:
            self.writer.close()
        self.shard += 1
        self.writer = ArrayRecordWriter(self.files[self.shard], "group_size:1")

    def move_to(self, index: int) -> None:
        """Opens the shard that holds record `index` (closing the ones before)."""
        while index >= self.bounds[self.shard + 1]:
            self._next()

    def write(self, payload: bytes) -> None:
        self.writer.write(payload)
        self.counts[self.shard] += 1

    def complete(self) -> None:
        """Shards past the last record (more shards than records) are still written, empty, so the set is complete."""
        while self.shard < len(self.files) - 1:
            self._next()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


@contextlib.contextmanager
def _prepared(source: LlavaJsonSource, verify: str, max_pixels: int, workers: int):
    """The records as (index, payload or None, bad-record info or None), in order; read and checked by
    `workers` processes when more than one."""
    tasks = _tasks(source, verify, max_pixels)
    if workers <= 1:
        yield map(_prepare, tasks)
        return
    import multiprocessing

    pool = multiprocessing.get_context("spawn").Pool(workers)
    try:
        yield pool.imap(_prepare, tasks, chunksize=64)
    finally:
        pool.close()
        pool.join()


def _summary(
    json_path: str, source: LlavaJsonSource, shards: _Shards, reasons: collections.Counter, verify: str, bad_path: str
) -> dict:
    return {
        "json": os.fspath(absolute(json_path)),
        "image_folder": source.image_folder,
        "records_in": len(source),
        "records_written": sum(shards.counts),
        "records_skipped": sum(reasons.values()),
        "skipped_by_reason": dict(reasons.most_common()),
        "verify": verify,
        "shards": [
            {"file": os.path.basename(f), "records": c} for f, c in zip(shards.files, shards.counts, strict=True)
        ],
        "bad_records": os.path.basename(bad_path),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llava_jax.data.pack", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", required=True, help="LLaVA JSON (list of records) or JSON Lines file")
    p.add_argument(
        "--image-folder",
        default=None,
        help="folder the records' 'image' paths are relative to (default: the JSON's folder)",
    )
    p.add_argument("--out", required=True, help="output folder for the shards")
    p.add_argument("--num-shards", type=int, default=1)
    p.add_argument("--workers", type=int, default=1, help="processes reading and checking images")
    p.add_argument("--verify", choices=VERIFY_MODES, default="header")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS)
    p.add_argument("--name", default=None, help="shard file prefix (default: the JSON file's stem)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    s = pack(
        a.json,
        a.image_folder,
        a.out,
        a.num_shards,
        verify=a.verify,
        workers=a.workers,
        max_pixels=a.max_pixels,
        name=a.name,
        progress=not a.no_progress,
    )
    print(f"wrote {s['records_written']} of {s['records_in']} records into {len(s['shards'])} shards in {a.out}")
    if s["records_skipped"]:
        print(f"skipped {s['records_skipped']} bad records (details in {os.path.join(a.out, s['bad_records'])}):")
        for reason, count in s["skipped_by_reason"].items():
            print(f"  {count:8d}  {reason}")
    else:
        print("skipped 0 records")
    return 0


if __name__ == "__main__":
    sys.exit(main())
