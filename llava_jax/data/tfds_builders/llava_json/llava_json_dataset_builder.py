"""TFDS builder `llava_json`: a LLaVA JSON + image folder -> a TFDS dataset, ArrayRecord by default.

    tfds build llava_jax/data/tfds_builders/llava_json --manual_dir /data/llava --data_dir gs://b/tfds \
        --config llava_v1_5_mix665k
    tfds build llava_json --imports llava_jax.data.tfds_builders.llava_json --manual_dir DIR \
        --config '{"name": "mine", "splits": {"train": "train.json", "validation": "val.json"}, "image_folder": "images"}'

(`python -m llava_jax.data.tfds_builders` takes the same arguments where `tfds` lacks apache-beam.)
The JSON files and images are read from local paths; `--data_dir` may be a bucket. Neither building
nor reading imports TensorFlow (tensorflow-datasets>=4.9.10 writes ArrayRecord itself):
`llava_jax.data.sources.TfdsSource("llava_json/mine", "train", data_dir=...)` reads the build with
`tfds.data_source` and gives the same records as `LlavaJsonSource` on the JSON.

One example per JSON record, in the JSON's order (`disable_shuffling`: TFDS index i is the i-th kept
record; the grain pipeline shuffles). Features:
  id             Text    the record's id as text (a non-text id, or the index when there is none, is
                         also kept with its JSON type in `extra`)
  image          Text    the image name as written in the record ("" for a text-only record)
  image_bytes    bytes   the image file exactly as on disk (b"" for text-only): no re-encoding, any
                         format and colour mode Pillow reads, decoded by the same code as the JSON source
  conversations  Sequence({from: Text, value: Text})
  extra          Text    JSON object of the record's other fields (e.g. ScienceQA metadata); {} if none

Records that cannot be used (missing, empty or unreadable image, no conversations, malformed turns)
are checked as `python -m llava_jax.data.pack` checks them; with `on_bad_record="skip"` (default) they
are left out, logged, and listed in the build's `metadata.json` (`skipped`: per split, counts per
reason and every left-out record with its id, file and reason); `"raise"` stops the build on the
first one.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds

from llava_jax.data import pack
from llava_jax.data.errors import BadSample
from llava_jax.data.image import DEFAULT_MAX_PIXELS
from llava_jax.data.sources import LlavaJsonSource

log = logging.getLogger(__name__)

ON_BAD_RECORD = ("skip", "raise")
RECORD_KEYS = ("id", "image", "conversations")
_SOURCE_KEYS = ("image_path", "image_bytes", "image_array", "_error")


@dataclasses.dataclass
class LlavaJsonConfig(tfds.core.BuilderConfig):
    """Which files to read and how strictly.

    splits: split name -> LLaVA JSON (list of records) or JSON Lines file; relative names are read
      from `--manual_dir` (local paths).
    image_folder: the folder the records' `image` names are relative to, relative to `--manual_dir`
      (or absolute); "" = the folder of each JSON file.
    verify: image check before writing: "header" (exists, non-empty, known format, at most
      `max_pixels`), "decode" (also decodes it: catches truncated files), or "none".
    on_bad_record: "skip" (leave out, count, list in metadata.json) or "raise".
    """

    splits: dict = dataclasses.field(default_factory=lambda: {"train": "train.json"})
    image_folder: str = ""
    verify: str = "header"
    on_bad_record: str = "skip"
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self):
        if not self.splits or not all(isinstance(k, str) and isinstance(v, str) and v for k, v in self.splits.items()):
            raise ValueError(f"config {self.name!r}: splits must map split names to JSON files, got {self.splits!r}")
        if self.verify not in pack.VERIFY_MODES:
            raise ValueError(f"config {self.name!r}: verify must be one of {pack.VERIFY_MODES}, got {self.verify!r}")
        if self.on_bad_record not in ON_BAD_RECORD:
            raise ValueError(
                f"config {self.name!r}: on_bad_record must be one of {ON_BAD_RECORD}, got {self.on_bad_record!r}"
            )


def _config(name: str, json_file: str, image_folder: str, description: str) -> LlavaJsonConfig:
    return LlavaJsonConfig(name=name, splits={"train": json_file}, image_folder=image_folder, description=description)


class Builder(tfds.core.GeneratorBasedBuilder):
    """LLaVA-format conversations with their image files (see the module docstring)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "First release."}
    BUILDER_CONFIGS: ClassVar[list[LlavaJsonConfig]] = [
        _config("default", "train.json", "", "MANUAL_DIR/train.json, images relative to MANUAL_DIR."),
        _config(
            "llava_v1_5_mix665k",
            "llava_v1_5_mix665k.json",
            "",
            "LLaVA-1.5 instruction mix: MANUAL_DIR/llava_v1_5_mix665k.json with coco/, gqa/, ocr_vqa/, textvqa/, vg/ beside it.",
        ),
        _config(
            "llava_instruct_150k",
            "llava_instruct_150k.json",
            "coco/train2017",
            "LLaVA-Instruct-150K: MANUAL_DIR/llava_instruct_150k.json, COCO images in MANUAL_DIR/coco/train2017.",
        ),
        _config(
            "blip_laion_cc_sbu_558k",
            "blip_laion_cc_sbu_558k.json",
            "images",
            "LCS-558K pretraining captions (LLaVA-Pretrain): the JSON and its images/ folder.",
        ),
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Choose one config with --config (without it every config is built). Put the LLaVA JSON file(s) "
        "named by the config's `splits` and the image folder in --manual_dir "
        '(or give absolute paths in --config \'{"name": ..., "splits": {...}, "image_folder": ...}\').'
    )

    def __init__(self, *, file_format: str | None = None, **kwargs):
        # ArrayRecord unless asked otherwise: the format tfds.data_source (and grain) read at random.
        super().__init__(file_format=file_format or "array_record", **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "id": tfds.features.Text(),
                    "image": tfds.features.Text(),
                    "image_bytes": tfds.features.Tensor(shape=(), dtype=np.object_),
                    "conversations": tfds.features.Sequence(
                        {"from": tfds.features.Text(), "value": tfds.features.Text()}
                    ),
                    "extra": tfds.features.Text(),
                }
            ),
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(),
            homepage="https://llava-vl.github.io/",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        config: LlavaJsonConfig = self.builder_config

        def resolve(path: str) -> str:
            return path if os.path.isabs(path) else os.fspath(dl_manager.manual_dir / path)

        image_folder = resolve(config.image_folder) if config.image_folder else None
        self.info.metadata["skipped"] = {}
        return {
            split: self._generate_examples(split, resolve(path), image_folder) for split, path in config.splits.items()
        }

    def _generate_examples(self, split: str, json_path: str, image_folder: str | None) -> Iterator[tuple[int, dict]]:
        config: LlavaJsonConfig = self.builder_config
        source = LlavaJsonSource(json_path, image_folder)
        reasons: collections.Counter = collections.Counter()
        bad: list[dict] = []
        for index in range(len(source)):
            record = source[index]
            try:
                example = to_example(record, pack.read_record_image(record, config.verify, config.max_pixels))
            except BadSample as e:
                if config.on_bad_record == "raise":
                    raise BadSample(
                        e.record_id,
                        f"{e.reason} (record {index} of {json_path}; on_bad_record='skip' leaves such records out)",
                        e.path,
                    ) from None
                log.warning("skipping %s", e)
                reasons[pack.reason_key(e.reason)] += 1
                bad.append({"index": index, "id": e.record_id, "path": e.path, "reason": e.reason})
                continue
            yield index, example
        self.info.metadata["skipped"][split] = {
            "json": json_path,
            "records_in": len(source),
            "records_skipped": len(bad),
            "by_reason": dict(reasons.most_common()),
            "records": bad,
        }
        if bad:
            log.warning(
                "%s: left out %d of %d records of %s: %s", split, len(bad), len(source), json_path, dict(reasons)
            )


def to_example(record: dict, image_bytes: bytes | None) -> dict:
    """A normalized JSON-source record + its image file -> a TFDS example (features above).

    Raises BadSample for turns that are not {"from": str, "value": str} objects.
    """
    turns = []
    for k, turn in enumerate(record["conversations"]):
        if not (isinstance(turn, dict) and isinstance(turn.get("from"), str) and isinstance(turn.get("value"), str)):
            raise BadSample(
                record["id"],
                f"turn {k} is not an object with text 'from' and 'value'; fix the record or drop it",
                record.get("image_path"),
            )
        turns.append({"from": turn["from"], "value": turn["value"]})
    extra = {k: v for k, v in record.items() if k not in RECORD_KEYS and k not in _SOURCE_KEYS}
    if not isinstance(record["id"], str):
        extra["id"] = record["id"]
    if any(set(turn) != {"from", "value"} for turn in record["conversations"]):
        extra["conversations"] = record["conversations"]  # turns with more fields: kept whole
    return {
        "id": str(record["id"]),
        "image": record["image"] or "",
        "image_bytes": image_bytes or b"",
        "conversations": turns,
        "extra": json.dumps(extra, ensure_ascii=False, separators=(",", ":")),
    }
