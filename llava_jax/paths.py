"""One path type for local files and cloud URLs (`gs://bucket/run`, `s3://...`): etils `epath`.

Every file the project reads or writes goes through `as_path` (or `absolute`), so a workdir, a stage
directory, an export or a data file may live on a local disk or in a bucket. `pathlib` and `os.path`
would turn `gs://bucket/run` into a local folder `gs:/bucket/run`; epath (which orbax uses for
checkpoints, with tensorstore for the arrays) keeps the URL.

    p = as_path("gs://bucket/run") / "stage1" / "model.json"   # epath.Path
    p.write_text(...); p.read_text(); p.exists(); p.glob("*.json"); p.open("rb")

URLs need the filesystem package of their scheme (gs://: `pip install gcsfs`, the `gcs` extra).
Libraries that only read local files (safetensors' lazy reader, tokenizers) get a local copy through
`local_copy`; writers that only write local files use `staged_dir`.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator

from etils import epath

# Schemes epath understands (through fsspec: gcsfs, s3fs, adlfs, huggingface_hub).
URL_SCHEMES = ("gs", "s3", "az", "hf")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")

Path = epath.Path
PathLike = str | os.PathLike


def is_url(path: PathLike) -> bool:
    """Whether `path` names an object store location (`gs://...`) rather than a local file."""
    return _SCHEME.match(os.fspath(path)) is not None


def as_path(path: PathLike) -> epath.Path:
    """`path` (a local path or a URL) as an `epath.Path`; a URL of an unknown scheme is refused
    rather than taken for a local folder named after it."""
    text = os.fspath(path)
    m = _SCHEME.match(text)
    if m and m.group(1) not in URL_SCHEMES:
        raise ValueError(
            f"{text}: the {m.group(1)}:// scheme is not supported; use a local path or one of "
            + ", ".join(f"{s}://" for s in URL_SCHEMES)
        )
    return epath.Path(text)


def absolute(path: PathLike) -> epath.Path:
    """`as_path(path)`, with a local path made absolute (independent of the working directory, as
    orbax requires). URLs are already absolute: `epath.Path("gs://b/x").absolute()` would prefix
    the working directory and make a local folder of the bucket, so they are returned unchanged."""
    p = as_path(path)
    return p if is_url(p) else p.absolute()


def local_copy(path: PathLike, cache: PathLike | None = None) -> epath.Path:
    """A local file or folder with the contents of `path`: `path` itself when it is local, else a copy
    downloaded into `cache` (default: a fresh temporary folder). For readers that need a local file."""
    src = as_path(path)
    if not is_url(src):
        return src
    root = epath.Path(cache) if cache is not None else epath.Path(tempfile.mkdtemp(prefix="llava_jax_"))
    dst = root / src.name
    if src.is_dir():
        copy_tree(src, dst)
    else:
        copy_file(src, dst)
    return dst


def copy_file(src: PathLike, dst: PathLike) -> None:
    """Copy one file, streamed; either side may be a URL (also across filesystems)."""
    src, dst = as_path(src), as_path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with src.open("rb") as fin, dst.open("wb") as fout:
        shutil.copyfileobj(fin, fout, 16 << 20)


def copy_tree(src: PathLike, dst: PathLike) -> None:
    """Copy a folder's files (recursively) from `src` to `dst`; either may be a URL."""
    src, dst = as_path(src), as_path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for child in src.iterdir():
        if child.is_dir():
            copy_tree(child, dst / child.name)
        else:
            copy_file(child, dst / child.name)


@contextlib.contextmanager
def staged_dir(out: PathLike) -> Iterator[epath.Path]:
    """A local folder to write `out`'s files into: `out` itself when local; for a URL, a temporary
    folder whose files are uploaded to `out` when the block ends without an error."""
    out = as_path(out)
    if not is_url(out):
        yield out
        return
    tmp = tempfile.mkdtemp(prefix="llava_jax_")
    try:
        yield epath.Path(tmp)
        copy_tree(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class _RewritingAppender:
    """Append-mode text file on an object store: objects cannot be appended to, so `flush` rewrites the
    whole object (existing text + everything written). Meant for small logs such as metrics.jsonl."""

    def __init__(self, path: epath.Path):
        self.path = path
        self._text = path.read_text() if path.exists() else ""
        self._dirty = False

    def write(self, text: str) -> int:
        self._text += text
        self._dirty = True
        return len(text)

    def flush(self) -> None:
        if self._dirty:
            self.path.write_text(self._text)
            self._dirty = False

    def close(self) -> None:
        self.flush()


def open_append(path: PathLike):
    """A text file opened for appending, whose `flush()` makes the written lines durable: a plain
    local file, or on an object store a small appender that rewrites the object on flush."""
    p = as_path(path)
    if is_url(p):
        return _RewritingAppender(p)
    return open(p, "a", encoding="utf-8")
