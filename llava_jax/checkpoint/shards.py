"""Writing sharded safetensors checkpoints the way Hugging Face lays them out.

    write_shards(tensors, out_dir, max_shard_bytes=parse_size("5GB"))

writes `model-00001-of-0000N.safetensors`, ... and `model.safetensors.index.json`
(`{"metadata": {"total_size": bytes}, "weight_map": {key: file}}`), always with the index, also for
a single shard. Tensors are `TensorPlan`s: key, shape, dtype and a function that makes the array, so
shards are planned from shapes alone and only one shard's arrays exist in memory at a time.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Sequence

import numpy as np

from llava_jax.paths import as_path

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(size: str | int) -> int:
    """'5GB' -> 5_000_000_000 (decimal units, as transformers reads them; KiB/MiB/GiB are binary)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(size))
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"max shard size {size!r}: write a number with a unit, e.g. 5GB, 500MB, 2GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


@dataclasses.dataclass(frozen=True)
class TensorPlan:
    """One tensor to write: `make()` returns an array of `shape` (cast to `dtype` by the writer)."""

    key: str
    shape: tuple[int, ...]
    make: Callable[[], np.ndarray]

    def nbytes(self, dtype) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def plan_shards(tensors: Sequence[TensorPlan], dtype, max_shard_bytes: int) -> list[list[TensorPlan]]:
    """Greedy, in order: a shard is closed when the next tensor would push it past the limit (a
    tensor larger than the limit gets a shard of its own)."""
    shards: list[list[TensorPlan]] = [[]]
    size = 0
    for t in tensors:
        n = t.nbytes(dtype)
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += n
    return [s for s in shards if s]


def write_shards(
    tensors: Sequence[TensorPlan],
    out_dir,
    *,
    dtype,
    max_shard_bytes: int,
    prefix: str = "model",
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Write the tensors as safetensors shards + index into `out_dir`; returns the index dict."""
    from safetensors.numpy import save_file

    out_dir = as_path(out_dir)
    keys = [t.key for t in tensors]
    if len(set(keys)) != len(keys):
        dup = sorted({k for k in keys if keys.count(k) > 1})
        raise ValueError(f"duplicate tensor keys in export: {dup[:5]}")
    shards = plan_shards(tensors, dtype, max_shard_bytes)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        name = f"{prefix}-{i:05d}-of-{len(shards):05d}.safetensors"
        arrays = {}
        for t in shard:
            a = np.ascontiguousarray(np.asarray(t.make()).astype(dtype, copy=False))
            if tuple(a.shape) != tuple(t.shape):
                raise ValueError(f"export of {t.key!r} made shape {a.shape}, planned {t.shape}")
            arrays[t.key] = a
            weight_map[t.key] = name
            total += a.nbytes
        save_file(arrays, str(out_dir / name), metadata={"format": "pt"})
        if progress:
            progress(f"wrote {name} ({len(shard)} tensors)")
        del arrays
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / f"{prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return index
