"""Reading and writing checkpoint tensors: safetensors first, PyTorch `.bin` only with
`torch.load(weights_only=True)` (no arbitrary pickles).

A *source* is anything with `keys() -> list[str]` and `get(key) -> np.ndarray`; tensors are read
one at a time, so a 13B checkpoint never has to fit in host memory twice.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from typing import Protocol

import numpy as np

from llava_jax.paths import Path, as_path, is_url, local_copy


class TensorSource(Protocol):
    def keys(self) -> list[str]: ...

    def get(self, key: str) -> np.ndarray: ...


class DictSource:
    """In-memory tensors (numpy arrays or torch tensors), e.g. a `state_dict()`."""

    def __init__(self, tensors: Mapping[str, object]):
        self._tensors = dict(tensors)

    def keys(self) -> list[str]:
        return list(self._tensors)

    def get(self, key: str) -> np.ndarray:
        return _to_numpy(self._tensors[key])


class SafetensorsSource:
    """One or more `.safetensors` files (a sharded checkpoint's index maps keys to files)."""

    def __init__(self, files: Iterable[Path]):
        from safetensors import safe_open

        self._where: dict[str, Path] = {}
        self._handles = {}
        for f in _local(files):
            h = safe_open(str(f), framework="numpy")
            self._handles[f] = h
            for k in h.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                self._where[k] = f

    def keys(self) -> list[str]:
        return list(self._where)

    def get(self, key: str) -> np.ndarray:
        return self._handles[self._where[key]].get_tensor(key)


class TorchBinSource:
    """PyTorch `.bin` files, loaded with `weights_only=True` (refuses pickled code)."""

    def __init__(self, files: Iterable[Path]):
        import torch

        self._tensors: dict[str, object] = {}
        for f in _local(files):
            self._tensors.update(torch.load(str(f), map_location="cpu", weights_only=True, mmap=True))

    def keys(self) -> list[str]:
        return list(self._tensors)

    def get(self, key: str) -> np.ndarray:
        return _to_numpy(self._tensors[key])


def _local(files: Iterable[Path]) -> list[Path]:
    """The files as local paths (the safetensors and torch readers open local files only): files at a
    URL (gs://...) are downloaded into one temporary folder (`TMPDIR`), kept while the process runs."""
    out, cache = [], None
    for f in files:
        if is_url(f):
            cache = cache or tempfile.mkdtemp(prefix="llava_jax_weights_")
            f = local_copy(f, cache)
        out.append(f)
    return out


def _to_numpy(t) -> np.ndarray:
    if isinstance(t, np.ndarray):
        return t
    import torch

    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.detach().cpu().contiguous().view(torch.uint16).numpy().view(ml_dtypes.bfloat16)
    return t.detach().cpu().numpy()


def open_checkpoint(path: str | os.PathLike) -> TensorSource:
    """A checkpoint directory (or a single file): safetensors (plain or sharded with an index) is
    preferred; `.bin` files are read with `torch.load(weights_only=True)`."""
    path = as_path(path)
    if path.is_file():
        if path.suffix == ".safetensors":
            return SafetensorsSource([path])
        if path.suffix in (".bin", ".pt", ".pth"):
            return TorchBinSource([path])
        raise ValueError(f"{path}: not a .safetensors or .bin checkpoint file")
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    for index_name, cls in (
        ("model.safetensors.index.json", SafetensorsSource),
        ("pytorch_model.bin.index.json", TorchBinSource),
    ):
        index = path / index_name
        if index.exists():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            missing = [s for s in shards if not (path / s).exists()]
            if missing:
                raise FileNotFoundError(f"{index} names shards that are missing: {missing[:5]}")
            return cls([path / s for s in shards])
    st = sorted(path.glob("*.safetensors"))
    if st:
        return SafetensorsSource(st)
    bins = sorted(p for p in path.glob("*.bin") if p.name not in ("training_args.bin",))
    if bins:
        return TorchBinSource(bins)
    raise FileNotFoundError(f"{path}: no *.safetensors or *.bin weights found")
