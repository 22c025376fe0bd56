"""The data settings of a run: one typed record, one set of defaults.

A stage's `data` section of the config schema is built from `DataSettings` (its config fields, with
these defaults), `pipeline.from_config` and `pipeline.make_batches` read it, and the training loop
passes it through unchanged. A new data option is one field here (plus its use in the pipeline).

    settings = DataSettings.from_mapping(config.stage2.data)      # ConfigDict, dict or DataSettings
    settings = DataSettings(json_path="llava.json", packing=True)   # direct use

Fields marked `config=False` in their metadata are tuning knobs for direct callers of the pipeline;
they are not keys of the config schema.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from llava_jax.data.image import ASPECT_RATIOS, DEFAULT_MAX_PIXELS

ON_BAD_SAMPLE = ("raise", "skip")


def _tuning(default: Any) -> Any:
    return dataclasses.field(default=default, metadata={"config": False})


@dataclasses.dataclass(frozen=True)
class DataSettings:
    """Where the records are and how they become rows (see `pipeline` for the batch they give)."""

    # Source: exactly one of json_path, array_record_path, tfds_name.
    json_path: str = ""  # LLaVA JSON / JSONL (local or gs://)
    image_folder: str = ""  # images of json_path; '' = the JSON's folder
    array_record_path: str = ""  # shards from `python -m llava_jax.data.pack` (file, glob or folder)
    tokenizer_path: str = ""  # '' = the vendored LLaMA tokenizer
    # A TFDS build (ArrayRecord format), e.g. tfds_name="llava_json/llava_v1_5_mix665k",
    # tfds_data_dir="gs://bucket/tensorflow_datasets"; tfds_record_fn ("module:function") only for
    # builds of other builders than llava_json.
    tfds_name: str = ""
    tfds_split: str = "train"
    tfds_data_dir: str = ""
    tfds_record_fn: str = ""
    # Samples -> rows.
    template: str = "v1"  # conversation template name (data/templates.py)
    image_aspect_ratio: str = "square"  # square | pad
    max_length: int = 2048  # tokens per row; a longer sample is a bad sample
    packing: bool = False  # several samples per row (segment ids) instead of one padded sample
    max_images_per_row: int = 0  # with packing; 0 = max(1, max_length // (num_image_tokens + 1))
    worker_count: int = 0  # data worker processes; 0 = prepare in threads of this process
    on_bad_sample: str = "skip"  # skip (counted in meta_skipped, logged) | raise
    shuffle: bool = True  # False keeps source order (evaluation)
    # The original's `group_by_modality_length` order (data/length_grouping.py): image and text-only
    # samples in separate batches, each global batch of samples of similar length; replaces the shuffle.
    group_by_modality_length: bool = False
    # Tuning for direct callers.
    length_buckets: tuple[int, ...] | None = _tuning(None)  # without packing: pad to the smallest that fits
    read_threads: int | None = _tuning(None)  # None: 1 with workers, min(4, CPUs) without
    worker_buffer_size: int = _tuning(2)  # batches buffered per worker
    fast_image: bool = _tuning(False)  # faster, inexact resizing (see data/image.py)
    max_image_pixels: int = _tuning(DEFAULT_MAX_PIXELS)  # decompression-bomb guard

    def __post_init__(self):
        if self.on_bad_sample not in ON_BAD_SAMPLE:
            raise ValueError(f"on_bad_sample must be one of {ON_BAD_SAMPLE}, got {self.on_bad_sample!r}")
        if self.image_aspect_ratio not in ASPECT_RATIOS:
            raise ValueError(f"image_aspect_ratio must be one of {ASPECT_RATIOS}, got {self.image_aspect_ratio!r}")
        if self.worker_count < 0:
            raise ValueError(f"worker_count must be >= 0, got {self.worker_count}")
        if self.max_images_per_row is None:  # the pipeline's older spelling of "derived"
            object.__setattr__(self, "max_images_per_row", 0)
        if self.length_buckets is not None:
            object.__setattr__(self, "length_buckets", tuple(self.length_buckets))

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def config_defaults(cls, **values) -> dict[str, Any]:
        """The config schema's `data` section: the config fields with their defaults (or `values`)."""
        base = cls(**values)
        return {f.name: getattr(base, f.name) for f in dataclasses.fields(cls) if f.metadata.get("config", True)}

    @classmethod
    def from_mapping(cls, values: Mapping | DataSettings, **overrides) -> DataSettings:
        """Settings from a config section or dict (keys that are not fields are ignored; see
        `pipeline.from_config` for the others), with `overrides` on top."""
        names = cls.field_names()
        overrides = {k: v for k, v in overrides.items() if k in names}
        if isinstance(values, DataSettings):
            return dataclasses.replace(values, **overrides)
        return cls(**{**{k: values[k] for k in names if k in values}, **overrides})

    def images_per_row(self, num_image_tokens: int) -> int:
        """M: images a packed row may hold (1 without packing)."""
        if not self.packing:
            return 1
        return self.max_images_per_row or max(1, self.max_length // (num_image_tokens + 1))
