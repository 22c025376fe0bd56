"""Random-access sources of LLaVA records (grain `RandomAccessDataSource`: `len(src)`, `src[i]`).

Every source returns records as plain dicts in one normalized form:

    {"id": str | int,                 # the record's id (its index when it has none)
     "conversations": [{"from": "human" | "gpt", "value": str}, ...],
     "image": str | None,             # the image name as written in the record (None: text-only)
     "image_path": str | None,        # where to read the image file (JSON sources)
     "image_bytes": bytes | None,     # the encoded image file itself (ArrayRecord sources)
     "image_array": np.ndarray | None,  # decoded uint8 HWC pixels (TFDS sources)
     ...}                             # any other keys of the original record, unchanged

A record that cannot be parsed carries `"_error": "<what is wrong>"` instead of failing the whole
dataset; the pipeline turns it into a `BadSample` (raised or counted under its `on_bad_sample` policy).

Sources:
* `LlavaJsonSource`: a LLaVA JSON list (or JSON Lines) + an image folder: LLaVA-Instruct-158K,
  CC-595K `chat.json`, LCS-558K, mix665k, ScienceQA conversions, the synthetic demo data.
* `ArrayRecordSource`: shards written by `python -m llava_jax.data.pack` (image bytes inline; no image
  folder needed, file-backed random access, cheap to share with worker processes).
* `TfdsSource`: `tensorflow_datasets.data_source` (TFDS's TensorFlow-free ArrayRecord reader) + a
  function mapping a TFDS example to a record (default: `llava_tfds_record`, for builds of the
  `llava_json` builder in `llava_jax/data/tfds_builders/`); needs the optional extra `tensorflow-datasets`.
"""

from __future__ import annotations

import glob
import json
import os
import struct
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from llava_jax.paths import absolute, as_path, is_url

RECORD_MAGIC = b"LJR1"  # ArrayRecord payload: MAGIC | uint32 header length | JSON header | image bytes
_HEADER_LEN = struct.Struct("<I")
ARRAY_RECORD_SUFFIX = ".array_record"


def _normalize(raw: Any, index: int, image_root: str | None) -> dict:
    """Raw JSON value -> normalized record dict (see module docstring)."""
    if isinstance(raw, dict):
        record = dict(raw)
    else:
        record = {"id": index, "conversations": None, "_error": f"record is a JSON {type(raw).__name__}, not an object"}
    record.setdefault("id", index)
    image = record.get("image")
    if isinstance(image, list) and len(image) == 1:
        image = image[0]
    if isinstance(image, list):
        record["_error"] = f"{len(image)} images in one record are not supported (one image per record)"
        image = None
    elif image is not None and not isinstance(image, str):
        record["_error"] = f"'image' must be a file name, got {type(image).__name__}"
        image = None
    elif image == "":
        image = None
    record["image"] = image
    record["image_path"] = os.path.join(image_root, image) if (image and image_root is not None) else image
    record["image_bytes"] = None
    record["image_array"] = None
    return record


class LlavaJsonSource:
    """LLaVA JSON (`.json`: a list of records; `.jsonl`: one record per line) + an image folder.

    `image_folder` defaults to the JSON file's folder; a record's image is read from
    `image_folder/record["image"]`. Records are kept as compact JSON bytes (one buffer + offsets), so
    a 665K-record file costs about its file size in memory, in each worker process that gets a copy.
    For very large sets prefer packing to ArrayRecord (`python -m llava_jax.data.pack`).
    """

    def __init__(self, json_path: str | os.PathLike, image_folder: str | os.PathLike | None = None):
        self.json_path = os.fspath(json_path)  # a local path or a URL (gs://...)
        if not as_path(self.json_path).is_file():
            raise FileNotFoundError(f"LLaVA JSON file not found: {self.json_path}")
        self.image_folder = (
            os.fspath(image_folder) if image_folder is not None else os.fspath(absolute(self.json_path).parent)
        )
        if not as_path(self.image_folder).is_dir():
            raise FileNotFoundError(
                f"image folder not found: {self.image_folder} (for {self.json_path}); pass image_folder="
            )
        chunks, offsets = [], [0]
        for raw in _read_records(self.json_path):
            blob = json.dumps(raw, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
            chunks.append(blob)
            offsets.append(offsets[-1] + len(blob))
        self._blob = np.frombuffer(b"".join(chunks), dtype=np.uint8)
        self._offsets = np.asarray(offsets, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def raw(self, index: int) -> Any:
        """The record exactly as stored in the file (before normalization)."""
        start, end = self._offsets[index], self._offsets[index + 1]
        return json.loads(self._blob[start:end].tobytes())

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"record index {index} out of range for {len(self)} records")
        return _normalize(self.raw(index), index, self.image_folder)

    def __repr__(self) -> str:
        return f"LlavaJsonSource({self.json_path!r}, image_folder={self.image_folder!r}, n={len(self)})"


def _read_records(path: str) -> list:
    if path.endswith(".jsonl"):
        records = []
        with as_path(path).open("r", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    records.append(
                        {
                            "id": f"{os.path.basename(path)}:{lineno}",
                            "conversations": None,
                            "_error": f"invalid JSON on line {lineno}: {e}",
                        }
                    )
        return records
    with as_path(path).open("r", encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{path} is not valid JSON ({e}); LLaVA data is a JSON list of records (or .jsonl)"
            ) from None
    if not isinstance(data, list):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}; LLaVA data is a JSON list of records")
    return data


# ArrayRecord: encoding written by pack.py, decoding by ArrayRecordSource.


def encode_record(record: dict, image_bytes: bytes | None) -> bytes:
    """A LLaVA record (JSON-able dict) + its encoded image file -> one ArrayRecord payload."""
    header = {k: v for k, v in record.items() if k not in ("image_path", "image_bytes", "image_array")}
    head = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return b"".join((RECORD_MAGIC, _HEADER_LEN.pack(len(head)), head, image_bytes or b""))


def decode_record(payload: bytes, index: int = -1) -> dict:
    """One ArrayRecord payload -> normalized record (image bytes in `image_bytes`)."""
    if payload[:4] != RECORD_MAGIC:
        bad = {
            "id": index,
            "conversations": None,
            "_error": "not a llava_jax packed record (bad magic); re-pack with python -m llava_jax.data.pack",
        }
        return _normalize(bad, index, None)
    (n,) = _HEADER_LEN.unpack_from(payload, 4)
    record = json.loads(payload[8 : 8 + n].decode("utf-8"))
    image = payload[8 + n :]
    record = _normalize(record, index, None)
    record["image_path"] = None
    record["image_bytes"] = bytes(image) if record["image"] else None
    return record


def find_shards(path: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """A shard file, a glob, a folder of `*.array_record` shards, or a list of those -> sorted files."""
    if isinstance(path, (list, tuple)):
        return [f for p in path for f in find_shards(p)]
    path = os.fspath(path)
    if is_url(path):
        if not path.startswith("gs://"):
            raise ValueError(
                f"{path}: ArrayRecord shards are read from a local disk or gs:// (the ArrayRecord "
                "reader's own storage client); copy them to one of those"
            )
        p = as_path(path)
        if any(c in path for c in "*?["):
            files = sorted(os.fspath(f) for f in p.parent.glob(p.name))
        elif p.is_dir():
            files = sorted(os.fspath(f) for f in p.glob("*" + ARRAY_RECORD_SUFFIX))
        else:
            files = [path] if p.is_file() else []
    elif os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "*" + ARRAY_RECORD_SUFFIX)))
    elif any(c in path for c in "*?["):
        files = sorted(glob.glob(path))
    else:
        files = [path] if os.path.isfile(path) else []
    if not files:
        raise FileNotFoundError(f"no ArrayRecord shards at {path!r}; write them with python -m llava_jax.data.pack")
    return files


class ArrayRecordSource:
    """Shards written by `llava_jax.data.pack` (records with their encoded image inline).

    `path`: a shard, a glob, a folder of `*.array_record` files, or a list of them; records are
    indexed in shard order. Pickles cheaply (file names only), so worker processes share nothing.
    """

    def __init__(self, path: str | os.PathLike | Sequence[str | os.PathLike]):
        import grain  # deferred: importing grain is not needed for JSON sources

        self.paths = find_shards(path)
        self._source = grain.sources.ArrayRecordDataSource(self.paths)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        return decode_record(self._source[index], index)

    def __repr__(self) -> str:
        return f"ArrayRecordSource({len(self.paths)} shards, n={len(self)})"


# TFDS (optional).

TFDS_MISSING = (
    "TFDS sources need the optional package tensorflow-datasets (TensorFlow itself is NOT needed: "
    "tfds.data_source reads ArrayRecord files with numpy only). Install it with "
    "`pip install 'llava_jax[tfds]'` or `pip install tensorflow-datasets array_record`, or pack the "
    "data with python -m llava_jax.data.pack and use ArrayRecordSource instead."
)


def _import_tfds():
    try:
        import tensorflow_datasets as tfds  # type: ignore[import-not-found]
    except ImportError as e:
        raise ImportError(TFDS_MISSING) from e
    return tfds


class MappedSource:
    """Any random-access sequence + `record_fn(example, index) -> LLaVA record dict` -> normalized source.

    `record_fn` returns at least `conversations`, optionally `id` and one of `image_bytes` (encoded
    file) / `image_array` (uint8 HWC) / `image_path`.
    """

    def __init__(self, data: Any, record_fn: Callable[[Any, int], dict]):
        self._data = data
        self._record_fn = record_fn

    def __len__(self) -> int:
        return len(self._data)

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        raw = dict(self._record_fn(self._data[index], index))
        extra = {k: raw.pop(k, None) for k in ("image_path", "image_bytes", "image_array")}
        if extra["image_array"] is not None:
            extra["image_array"] = np.asarray(extra["image_array"])
        record = _normalize(raw, index, None)
        record.update({k: v for k, v in extra.items() if v is not None})
        if extra["image_path"] is None and (extra["image_bytes"] is not None or extra["image_array"] is not None):
            record["image_path"] = None  # the image comes with the record; `image` is only its name
        if record["image"] is None and any(v is not None for v in extra.values()):
            # The pipeline reads `image` as "this record has an image"; name it for error messages.
            record["image"] = str(extra["image_path"] or f"<{record['id']}>")
        return record


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, (bytes, np.bytes_)) else str(value)


def llava_tfds_record(example: dict, index: int) -> dict:
    """One example of a `llava_json` TFDS build, as `tfds.data_source` returns it -> a record for MappedSource.

    Inverse of the builder's `to_example` (llava_jax/data/tfds_builders/llava_json): id, image name,
    image file bytes, conversations, and the record's other fields from `extra` with their JSON types.
    An example without these features yields a record error naming the fix.
    """
    missing = [k for k in ("id", "image", "image_bytes", "conversations", "extra") if k not in example]
    if missing:
        return {
            "id": index,
            "conversations": None,
            "_error": (
                f"TFDS example has no {missing} feature(s): not a llava_json build; set tfds_record_fn "
                "('package.module:function') to map this dataset's examples to LLaVA records"
            ),
        }
    conv = example["conversations"]
    turns = [{"from": _text(f), "value": _text(v)} for f, v in zip(conv["from"], conv["value"], strict=True)]
    record = {"id": _text(example["id"]), "image": _text(example["image"]) or None, "conversations": turns}
    record.update(json.loads(_text(example["extra"])))
    image_bytes = bytes(example["image_bytes"])
    record["image_bytes"] = image_bytes if record["image"] else None
    return record


class TfdsSource(MappedSource):
    """`tfds.data_source(name, split=..., data_dir=...)` mapped to LLaVA records by `record_fn`.

    The TFDS dataset must be prepared in the ArrayRecord file format (the `llava_json` builder's
    default; other builders: `tfds build --file_format array_record`). `record_fn(example, index)`
    defaults to `llava_tfds_record`, for builds of `llava_jax/data/tfds_builders/llava_json`.
    Reading needs tensorflow-datasets but not TensorFlow; raises ImportError with the install command
    when tensorflow-datasets is missing.
    """

    def __init__(
        self,
        name: str,
        split: str,
        record_fn: Callable[[Any, int], dict] | None = None,
        *,
        data_dir: str | None = None,
        **kwargs,
    ):
        tfds = _import_tfds()
        self.name, self.split = name, split
        super().__init__(
            tfds.data_source(name, split=split, data_dir=data_dir, **kwargs), record_fn or llava_tfds_record
        )
        if data_dir is not None and "://" in str(data_dir) and len(self._data):
            try:  # a remote data_dir: fail here, with the fix, rather than in a data worker mid-run
                self._data[0]
            except Exception as e:
                raise OSError(
                    f"cannot read the ArrayRecord files of TFDS dataset {name!r} in {data_dir} ({type(e).__name__}: {e}); "
                    "tfds.data_source opens them through the local file system (array_record has no GCS reader): "
                    "mount the bucket (e.g. gcsfuse) or copy the build to local disk, and set tfds_data_dir to that path"
                ) from e

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, split={self.split!r}, n={len(self)})"


def open_source(path: str | os.PathLike, image_folder: str | os.PathLike | None = None):
    """A `.json`/`.jsonl` file -> LlavaJsonSource; shards (file, glob or folder) -> ArrayRecordSource."""
    p = os.fspath(path)
    if p.endswith((".json", ".jsonl")):
        return LlavaJsonSource(p, image_folder)
    return ArrayRecordSource(p)
