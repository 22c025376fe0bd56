"""The grain input pipeline: LLaVA records -> fixed-shape, host-local numpy batches.

    it = make_batches(source, tokenizer=tok, image_size=336, num_image_tokens=576, global_batch_size=128,
                      seed=0, num_epochs=None, template="v1", image_aspect_ratio="pad", worker_count=4)
                                      # or settings=DataSettings(...) (data/settings.py: fields, defaults)
    batch = next(it)                  # dict of numpy arrays, this process's share of the global batch
    state = it.get_state()            # save with the checkpoint; a fresh iterator + set_state(state)
    it.set_state(state)               # continues with exactly the batches the old one would have given

Stages (grain dataset API; everything up to batching runs inside the worker processes):
  1. `MapDataset.source(source)[shard_index::shard_count]`: this process's records (disjoint across
     processes, together the whole dataset).
  2. `.shuffle(seed).repeat(num_epochs)`: a seeded global shuffle of the shard, reshuffled every epoch
     (the epoch number is folded into the seed); `num_epochs=None` repeats forever. With
     `group_by_modality_length` instead: the original's modality- and length-grouped order of all
     records (`length_grouping.py`), then this process's share of each global batch.
  3. `.map(PrepareSample)`: render + tokenize (`tokenize_record`), then decode + CLIP-preprocess the
     image to uint8. A `BadSample` is raised (`on_bad_sample="raise"`) or turned into a skip marker
     (`"skip"`) that is counted into the batch.
  4. `.to_iter_dataset()` + `BatchRows`: fill rows (one sample per row, or several with `packing`) and
     emit fixed-shape batches.
  5. `.mp_prefetch(worker_count)` when `worker_count > 0`. With `worker_count=0` samples are still
     prepared in `read_threads` threads of this process (Pillow decodes and resizes without the
     GIL), which on a small machine is often as fast as worker processes and starts instantly.

Batch (B = global_batch_size // shard_count rows; L = max_length, or with `length_buckets` the smallest
bucket that holds the batch's longest sample; M = images per row: 1 without packing,
`max_images_per_row` with it; S = image_size):
  input_ids    int32 [B, L]  token ids; PAD_TOKEN_ID at padding; images are runs of IMAGE_TOKEN_ID
  labels       int32 [B, L]  HF-aligned (unshifted: labels[t] is the token at t or -100); -100 where
                             not trained, at padding and at the first token of every segment, so a
                             shifted loss never predicts across a segment boundary
  positions    int32 [B, L]  0, 1, 2, ... restarting at every segment; 0 at padding
  segment_ids  int32 [B, L]  1..k for the k samples in a row, 0 at padding
  images       uint8 [B, M, S, S, 3]  the i-th run of image tokens in row b is images[b, i]; zeros
                             where a row has fewer images (text-only rows are all zeros). The model
                             normalizes on device: (x / 255 - CLIP_MEAN) / CLIP_STD
  meta_skipped int32 [B]     records skipped (bad samples under "skip") while this batch was filled,
                             put on the row that received the last sample before each skip;
                             `meta_skipped.sum()` over batches counts every skipped record exactly once

Batches always have these shapes (one per length bucket). The last batch of a finite run (num_epochs set) is completed with
empty rows (segment_ids all 0, labels all -100); it can even be all padding when only skipped records
remained, so the loss must divide by max(1, number of target tokens).

Checkpointing: `get_state()`/`set_state()` of the returned grain iterator cover the shuffle position
and the packing buffer, so a restored iterator yields exactly the batches the saved one would have.
Restore with the same source, seed, batch size, packing settings and worker_count (grain hands each
worker a fixed slice of the records, so the worker count is part of the order).

Multi-host: use `num_epochs=None` and stop by step count; with a finite run processes may reach the
end at different steps. Worker processes are started with `spawn` and re-import the main module: a
script must keep its work under `if __name__ == "__main__":` and must not call
`jax.distributed.initialize()` when `in_data_worker()` is true (google/grain#802). Workers are also
pinned to JAX's CPU backend in case anything imports jax there. Keep `worker_buffer_size` small: each
buffered batch of 336 px images is ~0.34 MB per row in /dev/shm.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import multiprocessing
import os
import sys
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from llava_jax.data.conversation_tokens import tokenize_record
from llava_jax.data.errors import BadSample
from llava_jax.data.image import DEFAULT_MAX_PIXELS, load_image, preprocess
from llava_jax.data.length_grouping import ModalityGroupedDataset, modality_length
from llava_jax.data.settings import DataSettings
from llava_jax.data.templates import get_template
from llava_jax.data.tokenizer import IGNORE_INDEX, IMAGE_TOKEN_ID, PAD_TOKEN_ID, text_encoder

log = logging.getLogger(__name__)

BATCH_KEYS = ("input_ids", "labels", "positions", "segment_ids", "images", "meta_skipped")
_LOGGED_SKIPS_LIMIT = 20
_skips_logged = 0


def in_data_worker() -> bool:
    """True inside a data worker process (or any child process); skip distributed start-up there."""
    return multiprocessing.parent_process() is not None


def _log_skip(e: BadSample) -> None:
    global _skips_logged
    _skips_logged += 1
    if _skips_logged <= _LOGGED_SKIPS_LIMIT:
        log.warning(
            "skipping %s%s",
            e,
            " (further skips are logged at DEBUG level)" if _skips_logged == _LOGGED_SKIPS_LIMIT else "",
        )
    else:
        log.debug("skipping %s", e)


class PrepareSample:
    """Record (see `sources`) -> {"input_ids": int32 [n], "labels": int32 [n], "image": uint8 [S,S,3] | None}.

    Under `on_bad_sample="skip"` a bad record becomes {"skipped": 1}; under "raise" its BadSample
    propagates (through worker processes too) naming the record id and file.
    """

    def __init__(
        self,
        *,
        tokenizer,
        template,
        image_size: int,
        image_aspect_ratio: str,
        num_image_tokens: int,
        max_length: int,
        on_bad_sample: str = "raise",
        fast_image: bool = False,
        max_image_pixels: int = DEFAULT_MAX_PIXELS,
    ):
        self.tokenizer = text_encoder(tokenizer)  # small, picklable, exact SentencePiece semantics
        self.template = get_template(template)
        self.image_size = image_size
        self.image_aspect_ratio = image_aspect_ratio
        self.num_image_tokens = num_image_tokens
        self.max_length = max_length
        self.on_bad_sample = on_bad_sample
        self.fast_image = fast_image
        self.max_image_pixels = max_image_pixels

    def __call__(self, record: dict) -> dict:
        try:
            return self.prepare(record)
        except BadSample as e:
            if self.on_bad_sample == "raise":
                raise
            _log_skip(e)
            return {"skipped": 1}

    def prepare(self, record: dict) -> dict:
        rid = record.get("id")
        path = record.get("image_path") or record.get("image")
        if record.get("_error"):
            raise BadSample(rid, record["_error"], path=path)
        has_image = record.get("image") is not None
        tokens = tokenize_record(record, self.template, self.tokenizer, self.num_image_tokens, self.max_length)
        input_ids = np.asarray(tokens["input_ids"], dtype=np.int32)
        labels = np.asarray(tokens["labels"], dtype=np.int32)
        n = len(input_ids)
        if n > self.max_length:
            raise BadSample(
                rid,
                f"sample is {n} tokens, longer than max_length={self.max_length}; raise max_length or drop the record",
                path=path,
            )
        if n == 0:
            raise BadSample(rid, "sample has no tokens", path=path)
        n_image_tokens = int(np.count_nonzero(input_ids == IMAGE_TOKEN_ID))
        expected = self.num_image_tokens if has_image else 0
        if n_image_tokens != expected:
            what = "an image but" if has_image else "no image but"
            raise BadSample(
                rid,
                f"record has {what} {n_image_tokens} image tokens after tokenization (expected {expected}); "
                "an image record needs exactly one '<image>' in its first human turn, a text-only record none",
                path=path,
            )
        image = self._load_image(record, rid) if has_image else None
        return {"input_ids": input_ids, "labels": labels, "image": image}

    def _load_image(self, record: dict, rid) -> np.ndarray:
        kw = dict(record_id=rid, fast=self.fast_image, max_pixels=self.max_image_pixels)
        if record.get("image_bytes") is not None:
            return load_image(
                record["image_bytes"], self.image_size, self.image_aspect_ratio, path_hint=record.get("image"), **kw
            )
        if record.get("image_array") is not None:
            return preprocess(
                np.asarray(record["image_array"]), self.image_size, self.image_aspect_ratio, fast=self.fast_image
            )
        return load_image(record["image_path"], self.image_size, self.image_aspect_ratio, **kw)


# Batching.


@dataclasses.dataclass(frozen=True)
class BatchSpec:
    """Static shape of a batch: rows, tokens per row (max), images per row, image side."""

    batch_size: int
    max_length: int
    packing: bool
    max_images_per_row: int
    image_size: int
    length_buckets: tuple[int, ...] = ()

    def __post_init__(self):
        if self.batch_size < 1 or self.max_length < 1 or self.max_images_per_row < 1:
            raise ValueError(f"batch_size, max_length and max_images_per_row must be >= 1: {self}")
        if self.length_buckets and (
            list(self.length_buckets) != sorted(set(self.length_buckets)) or self.length_buckets[-1] != self.max_length
        ):
            raise ValueError(
                f"length_buckets must be strictly increasing and end at max_length={self.max_length}, got {self.length_buckets}"
            )


class _Row:
    __slots__ = ("samples", "length", "num_images")

    def __init__(self):
        self.samples: list[dict] = []
        self.length = 0
        self.num_images = 0

    def fits(self, sample: dict, spec: BatchSpec) -> bool:
        if not spec.packing and self.samples:
            return False
        has_image = sample["image"] is not None
        return (
            self.length + len(sample["input_ids"]) <= spec.max_length
            and self.num_images + has_image <= spec.max_images_per_row
        )

    def add(self, sample: dict) -> None:
        self.samples.append(sample)
        self.length += len(sample["input_ids"])
        self.num_images += sample["image"] is not None


def assemble(rows: Sequence[_Row], skipped: np.ndarray, spec: BatchSpec) -> dict[str, np.ndarray]:
    """Rows of samples -> the batch dict (see module docstring)."""
    longest = max((r.length for r in rows), default=0)
    length = spec.max_length
    if spec.length_buckets and not spec.packing:
        length = next(b for b in spec.length_buckets if b >= longest)
    B, M, S = spec.batch_size, (spec.max_images_per_row if spec.packing else 1), spec.image_size
    input_ids = np.full((B, length), PAD_TOKEN_ID, np.int32)
    labels = np.full((B, length), IGNORE_INDEX, np.int32)
    positions = np.zeros((B, length), np.int32)
    segment_ids = np.zeros((B, length), np.int32)
    images = np.zeros((B, M, S, S, 3), np.uint8)
    for b, row in enumerate(rows):
        offset, image_slot = 0, 0
        for k, sample in enumerate(row.samples):
            n = len(sample["input_ids"])
            input_ids[b, offset : offset + n] = sample["input_ids"]
            labels[b, offset + 1 : offset + n] = sample["labels"][1:]
            positions[b, offset : offset + n] = np.arange(n, dtype=np.int32)
            segment_ids[b, offset : offset + n] = k + 1
            if sample["image"] is not None:
                images[b, image_slot] = sample["image"]
                image_slot += 1
            offset += n
    return {
        "input_ids": input_ids,
        "labels": labels,
        "positions": positions,
        "segment_ids": segment_ids,
        "images": images,
        "meta_skipped": skipped.astype(np.int32),
    }


class BatchRows(grain.IterDataset):
    """Prepared samples -> fixed-shape batches (one sample per row, or first-fit packing).

    Packing keeps `batch_size` open rows and puts each sample into the first row with room for its
    tokens and its image; the first sample that fits nowhere closes the batch and opens the next one.
    A sample is never split across rows.
    """

    def __init__(self, parent: grain.IterDataset, spec: BatchSpec):
        super().__init__(parent)
        self._spec = spec

    def __iter__(self) -> _BatchRowsIterator:
        return _BatchRowsIterator(self._parent.__iter__(), self._spec)

    def __str__(self) -> str:
        return f"BatchRows({self._spec})"


class _BatchRowsIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, spec: BatchSpec):
        super().__init__(parent)
        self._spec = spec
        self._pending: dict | None = None  # read from the parent, did not fit the previous batch
        self._state_before_pending: Any = None

    def __next__(self) -> dict[str, np.ndarray]:
        return assemble(*self.fill_rows(), self._spec)

    def fill_rows(self) -> tuple[list[_Row], np.ndarray]:
        """The next batch's rows and skip counts (StopIteration when nothing is left)."""
        spec = self._spec
        rows = [_Row() for _ in range(spec.batch_size)]
        skipped = np.zeros(spec.batch_size, np.int64)
        last, placed = 0, 0
        if self._pending is not None:
            rows[0].add(self._pending)
            placed = 1
            self._pending = self._state_before_pending = None
        while spec.packing or placed < spec.batch_size:
            before = self._parent.get_state() if spec.packing else None
            try:
                sample = next(self._parent)
            except StopIteration:
                if placed == 0 and not skipped.any():
                    raise
                break
            if "skipped" in sample:
                skipped[last] += sample["skipped"]
                continue
            row = next((r for r, candidate in enumerate(rows) if candidate.fits(sample, spec)), None)
            if row is None:
                if placed == 0:
                    raise ValueError(
                        f"a sample of {len(sample['input_ids'])} tokens does not fit an empty row of {spec}"
                    )
                self._pending, self._state_before_pending = sample, before
                break
            rows[row].add(sample)
            last, placed = row, placed + 1
        return rows, skipped

    def get_state(self) -> dict:
        if self._pending is not None:
            return {"parent": self._state_before_pending}
        return {"parent": self._parent.get_state()}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self._pending = self._state_before_pending = None

    def __str__(self) -> str:
        return f"BatchRowsIterator({self._spec})"


def _pin_worker_to_cpu(*_args) -> None:
    """Data workers never touch accelerators: JAX in a worker (if imported at all) uses the CPU."""
    os.environ["JAX_PLATFORMS"] = "cpu"
    if "jax" in sys.modules:
        with contextlib.suppress(Exception):  # backend already initialised in this process: nothing more to do
            sys.modules["jax"].config.update("jax_platforms", "cpu")


def _ensure_absl_flags_parsed() -> None:
    """grain reads its absl flags when starting workers and fails if the program never parsed flags
    (a plain script, pytest); mark them parsed with their defaults. Programs run under absl.app
    have parsed them already and are left alone."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _process_shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
    if shard_index is None or shard_count is None:
        import jax

        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index must be in [0, shard_count={shard_count}), got {shard_index}")
    return shard_index, shard_count


def make_batches(
    source,
    *,
    tokenizer,
    image_size: int,
    num_image_tokens: int,
    global_batch_size: int,
    seed: int,
    num_epochs: int | None,
    shard_index: int | None = None,
    shard_count: int | None = None,
    settings: DataSettings | None = None,
    **fields,
) -> grain.DatasetIterator:
    """Builds the pipeline and returns its checkpointable iterator of batches (module docstring).

    Args:
      source: random-access records (`sources.LlavaJsonSource`, `ArrayRecordSource`, `TfdsSource`, or
        any sequence of normalized record dicts).
      tokenizer: from `tokenizer.load_tokenizer()`.
      image_size: S; num_image_tokens: tokens per image (both from the model config).
      global_batch_size: rows across all processes; this process yields global_batch_size // shard_count.
      seed: shuffle seed (0 <= seed < 2**32); num_epochs: passes over the data, None = forever.
      shard_index, shard_count: this process's shard; default jax.process_index() / process_count().
      settings: a `DataSettings` (default: its defaults); `fields` (template="v1", packing=True,
        on_bad_sample="raise", max_images_per_row, length_buckets, worker_count, ...) replace its
        fields; see `settings.DataSettings` for each field and its default.
    """
    settings = dataclasses.replace(settings or DataSettings(), **fields)
    if num_epochs is not None and (not isinstance(num_epochs, int) or num_epochs < 1):
        raise ValueError(f"num_epochs must be a positive int or None (repeat forever), got {num_epochs!r}")
    shard_index, shard_count = _process_shard(shard_index, shard_count)
    if global_batch_size % shard_count:
        raise ValueError(
            f"global_batch_size={global_batch_size} is not divisible by the {shard_count} processes; choose a multiple of {shard_count}"
        )
    if len(source) == 0:
        raise ValueError(f"data source {source!r} has no records")
    spec = _batch_spec(settings, global_batch_size // shard_count, image_size, num_image_tokens)
    prepare = PrepareSample(
        tokenizer=tokenizer,
        template=settings.template,
        image_size=image_size,
        image_aspect_ratio=settings.image_aspect_ratio,
        num_image_tokens=num_image_tokens,
        max_length=settings.max_length,
        on_bad_sample=settings.on_bad_sample,
        fast_image=settings.fast_image,
        max_image_pixels=settings.max_image_pixels,
    )
    ds = _ordered_records(source, settings, spec.batch_size, shard_index, shard_count, seed, num_epochs)
    return _batched_iterator(ds.map(prepare), spec, settings)


def _ordered_records(source, settings: DataSettings, rows: int, shard_index, shard_count, seed, num_epochs):
    """This process's records in training order (stages 1-2 of the module docstring)."""
    ds = grain.MapDataset.source(source)
    if settings.group_by_modality_length:
        return _modality_grouped(ds, source, rows, shard_index, shard_count, seed, num_epochs)
    if shard_count > 1:
        ds = ds[shard_index::shard_count]
    if settings.shuffle:
        ds = ds.shuffle(seed=seed)
    return ds.repeat(num_epochs)


class _TokensOnly(PrepareSample):
    """PrepareSample without reading images (a placeholder stands for the image): what row filling needs."""

    def _load_image(self, record: dict, rid) -> bool:
        return True


def count_batches(
    source,
    *,
    tokenizer,
    num_image_tokens: int,
    global_batch_size: int,
    seed: int,
    epochs: float,
    settings: DataSettings,
    shard_index: int = 0,
    shard_count: int = 1,
) -> int:
    """Batches that `make_batches` gives shard `shard_index` for `epochs` passes over the data (a
    fraction of a pass counts its first records), computed by tokenizing every record and filling
    rows as the pipeline does, without reading images. With packing this is the only way to know the
    number of steps of an epoch: it depends on the lengths and the shuffle."""
    if epochs <= 0:
        raise ValueError(f"epochs must be > 0, got {epochs}")
    spec = _batch_spec(settings, global_batch_size // shard_count, 1, num_image_tokens)
    prepare = _TokensOnly(
        tokenizer=tokenizer,
        template=settings.template,
        image_size=1,
        image_aspect_ratio=settings.image_aspect_ratio,
        num_image_tokens=num_image_tokens,
        max_length=settings.max_length,
        on_bad_sample=settings.on_bad_sample,
    )
    ds = _ordered_records(source, settings, spec.batch_size, shard_index, shard_count, seed, math.ceil(epochs))
    per_epoch = len(ds) // math.ceil(epochs)
    ds = ds[: max(1, round(per_epoch * epochs))].map(prepare)
    it = _BatchRowsIterator(iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=1))), spec)
    count = 0
    with contextlib.suppress(StopIteration):
        while True:
            it.fill_rows()
            count += 1
    return count


def _modality_grouped(ds, source, rows: int, shard_index: int, shard_count: int, seed: int, num_epochs):
    """All records in the original's `group_by_modality_length` order (one global batch = one
    megabatch: `rows` per process x `shard_count`), then this process's share of every global batch
    (positions shard_index, shard_index + shard_count, ...). Reads every record once for its length."""
    lengths = [modality_length(source[i]) for i in range(len(source))]
    ds = ModalityGroupedDataset(ds, lengths, batch_size=rows, world_size=shard_count, seed=seed, num_epochs=num_epochs)
    return ds[shard_index::shard_count] if shard_count > 1 else ds


def _batch_spec(settings: DataSettings, rows: int, image_size: int, num_image_tokens: int) -> BatchSpec:
    max_length, length_buckets = settings.max_length, settings.length_buckets
    buckets = tuple(sorted(set(length_buckets or ()) | ({max_length} if length_buckets else set())))
    if buckets and buckets[-1] > max_length:
        raise ValueError(f"length_buckets {tuple(length_buckets)} exceed max_length={max_length}")
    return BatchSpec(rows, max_length, settings.packing, settings.images_per_row(num_image_tokens), image_size, buckets)


def _batched_iterator(ds: grain.MapDataset, spec: BatchSpec, settings: DataSettings) -> grain.DatasetIterator:
    """Prepared samples -> batches, read in threads and (with worker_count > 0) in worker processes."""
    workers, read_threads = settings.worker_count, settings.read_threads
    if read_threads is None:
        read_threads = 1 if workers > 0 else max(1, min(4, os.cpu_count() or 1))
    iter_ds = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=max(8, 2 * spec.batch_size))
    )
    iter_ds = BatchRows(iter_ds, spec)
    if workers > 0:
        _ensure_absl_flags_parsed()
        options = grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=settings.worker_buffer_size)
        iter_ds = iter_ds.mp_prefetch(options, worker_init_fn=_pin_worker_to_cpu)
    return iter(iter_ds)


def source_from_config(data_config) -> Any:
    """The source named by data settings (a `DataSettings`, config section or dict): `json_path`
    (+ `image_folder`), `array_record_path`, or `tfds_name` (+ `tfds_split`, `tfds_data_dir`, and for
    builds of other builders than `llava_json` `tfds_record_fn` = "package.module:function")."""
    from llava_jax.data import sources

    s = DataSettings.from_mapping(data_config)
    chosen = [k for k in ("json_path", "array_record_path", "tfds_name") if getattr(s, k)]
    if len(chosen) != 1:
        raise ValueError(
            f"data config must set exactly one of json_path, array_record_path, tfds_name; got {chosen or 'none'}"
        )
    if chosen[0] == "json_path":
        return sources.LlavaJsonSource(s.json_path, s.image_folder or None)
    if chosen[0] == "array_record_path":
        return sources.ArrayRecordSource(s.array_record_path)
    record_fn = None  # a build of the llava_json TFDS builder: sources.llava_tfds_record
    if s.tfds_record_fn:
        if ":" not in s.tfds_record_fn:
            raise ValueError(
                f"tfds_record_fn must be 'package.module:function' mapping a TFDS example to a LLaVA record, got {s.tfds_record_fn!r}"
            )
        import importlib

        module, _, name = s.tfds_record_fn.partition(":")
        record_fn = getattr(importlib.import_module(module), name)
    return sources.TfdsSource(s.tfds_name, s.tfds_split or "train", record_fn, data_dir=s.tfds_data_dir or None)


# What `from_config` takes beside the data settings: the model's image size and tokens per image, and
# the run's batch size, seed and epochs (normally passed as keyword overrides by the caller).
RUN_FIELDS = dict(image_size=336, num_image_tokens=576, global_batch_size=None, seed=0, num_epochs=None)


def from_config(
    data_config,
    *,
    tokenizer=None,
    source=None,
    shard_index: int | None = None,
    shard_count: int | None = None,
    **overrides,
) -> grain.DatasetIterator:
    """`make_batches` driven by data settings: a `DataSettings`, or an ml_collections ConfigDict / dict
    with its fields (defaults: `DataSettings`) and the RUN_FIELDS (image_size [336], num_image_tokens
    [576], global_batch_size (required), seed [0], num_epochs [None = forever]).
    Tokenizer: settings.tokenizer_path (default the vendored LLaMA tokenizer); ignored if `tokenizer=`.
    Keyword `overrides` replace config fields (e.g. image_size/num_image_tokens from the model config).
    """
    unknown = set(overrides) - set(RUN_FIELDS) - set(DataSettings.field_names())
    if unknown:
        raise TypeError(
            f"unknown data fields {sorted(unknown)}; known: {sorted([*RUN_FIELDS, *DataSettings.field_names()])}"
        )
    settings = DataSettings.from_mapping(data_config, **overrides)
    given = {} if isinstance(data_config, DataSettings) else data_config
    run = {k: overrides[k] if k in overrides else given.get(k, v) for k, v in RUN_FIELDS.items()}
    if run["global_batch_size"] is None:
        raise ValueError("data config needs global_batch_size (rows per step across all processes)")
    if tokenizer is None:
        from llava_jax.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(settings.tokenizer_path) if settings.tokenizer_path else load_tokenizer()
    if source is None:
        source = source_from_config(settings)
    return make_batches(
        source, tokenizer=tokenizer, shard_index=shard_index, shard_count=shard_count, settings=settings, **run
    )
