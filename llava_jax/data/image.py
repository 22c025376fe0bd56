"""CLIP image preprocessing on the host: decode, convert to RGB, resize + centre-crop, as uint8.

The host stops at uint8 pixels; the model normalizes on device with `(x / 255 - CLIP_MEAN) / CLIP_STD`
(see `normalize`, the same formula on numpy for tests and inference). Keeping uint8 on the host makes
batches 4x smaller in shared memory and skips every float pass on the CPU.

Two aspect-ratio modes, both matching `transformers.CLIPImageProcessor(size=S, crop_size=S)` pixel for
pixel (the processor also resizes uint8 images with Pillow's bicubic filter):

* `square`: resize the shortest side to S (the longer side becomes `int(S * long / short)`), then
  centre-crop S x S (offsets `(size - S) // 2`).
* `pad`: first paste the image centred on a square canvas of side max(W, H) filled with
  `PAD_BACKGROUND` = int(mean * 255) = (122, 116, 104), then the same as `square`.

Any Pillow mode is converted to RGB the way the processor does: images with transparency (an alpha band
or a `transparency` entry, e.g. RGBA, LA, PA, P with a transparent index) are composited over white;
everything else (L, 1, P, CMYK, YCbCr, I, I;16, F, ...) goes through `Image.convert("RGB")`.

`fast=True` trades exactness for speed: JPEG DCT-domain downscaling (`Image.draft`) when the file is
at least twice the needed size, a single resize of only the crop window (`resize(box=...)`), and for
`pad` a resize of the image alone pasted on the background. Pixels then differ from the processor by
about a grey level on average (more at `pad` borders, which may shift by a pixel); off by default.

Every failure to read an image (missing, empty, corrupt or truncated file, unknown format, more pixels
than `max_pixels`) raises `BadSample` naming the record id and the file. Optional limits for untrusted
input (the server sets them): `max_aspect_ratio` (long side / short side) and `max_work_pixels` (the
largest image preprocessing makes: the decoded image, the `pad` square, the `square` resize before its
crop; a 1 x 20000 px PNG of 100 bytes would need a 20000 x 20000 canvas). Both are checked from the
header, before any pixel is decoded or allocated (`size_problem`).
"""

from __future__ import annotations

import functools
import io
import os
from collections.abc import Callable

import numpy as np
from PIL import Image

from llava_jax.data.errors import BadSample
from llava_jax.paths import as_path, is_url

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PAD_BACKGROUND = tuple(int(m * 255) for m in CLIP_MEAN)  # (122, 116, 104)
ASPECT_RATIOS = ("square", "pad")

# Decompression-bomb guard: images with more pixels than this are rejected from the header, before any
# pixel is decoded. 2**26 = 67M pixels (e.g. 8192 x 8192) is far above any LLaVA training image and
# below Pillow's own warning threshold; raise it per call with `max_pixels=` when needed.
DEFAULT_MAX_PIXELS = 2**26

ImageSource = str | os.PathLike | bytes | bytearray | memoryview

_BICUBIC = Image.Resampling.BICUBIC


def _bad(record_id, path, reason: str) -> BadSample:
    return BadSample(record_id, reason, path=path)


def open_image(
    source: ImageSource,
    *,
    record_id=None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft: Callable[[int, int], tuple[int, int]] | None = None,
    path_hint: str | None = None,
    check_size: Callable[[int, int], str | None] | None = None,
) -> Image.Image:
    """Decodes an image file (path) or encoded bytes into a fully loaded Pillow image (any mode).

    `check_size`, when given, maps the header's (w, h) to a reason to refuse the image (or None); it
    runs before decoding (see `size_problem`).

    `draft`, when given, maps the header's (w, h) to a minimum decode size; a JPEG may then decode at a
    reduced DCT scale that is still at least that size (changes pixels; `fast` preprocessing only). `path_hint` names the file in errors
    when `source` is bytes (e.g. the original file name of a packed record).

    Raises BadSample(record_id, reason, path) for a missing, empty, undecodable or oversized image.
    """
    path, opener = _opener(source, record_id, path_hint)
    return _decode(opener, path, record_id, max_pixels=max_pixels, draft=draft, check_size=check_size)


def _opener(source: ImageSource, record_id, path_hint: str | None) -> tuple[str | None, Callable]:
    """(path named in errors, a callable returning a fresh binary file object) for `source`: bytes are
    wrapped as they are, an object-store URL is read once into memory, a local file is opened on call.

    Raises BadSample for empty bytes or a missing, unreadable or empty file.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        path = path_hint
        if len(source) == 0:
            raise _bad(record_id, path, "image bytes are empty (0 bytes)")
        opener = lambda: io.BytesIO(source)  # noqa: E731
    elif is_url(source):  # an object store: one read, then decoded from memory
        path = os.fspath(source)
        try:
            data = as_path(path).read_bytes()
        except FileNotFoundError:
            raise _bad(record_id, path, "image file not found; check image_folder and the record's 'image'") from None
        except OSError as e:
            raise _bad(record_id, path, f"cannot read image file: {e}") from None
        if not data:
            raise _bad(record_id, path, "image file is empty (0 bytes)")
        opener = lambda: io.BytesIO(data)  # noqa: E731
    else:
        path = os.fspath(source)
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            raise _bad(record_id, path, "image file not found; check image_folder and the record's 'image'") from None
        except OSError as e:
            raise _bad(record_id, path, f"cannot stat image file: {e}") from None
        if size == 0:
            raise _bad(record_id, path, "image file is empty (0 bytes)")
        opener = lambda: open(path, "rb")  # noqa: E731, SIM115 (the caller closes what it opens)
    return path, opener


def _decode(
    opener: Callable,
    path: str | None,
    record_id,
    *,
    max_pixels: int,
    draft: Callable[[int, int], tuple[int, int]] | None,
    check_size: Callable[[int, int], str | None] | None,
) -> Image.Image:
    """The fully loaded Pillow image in the file `opener()` returns, its header size checked first (see
    `open_image`). Raises BadSample for an empty, oversized, refused or undecodable image."""
    try:
        with opener() as fp:
            img = Image.open(fp)
            w, h = img.size
            if w <= 0 or h <= 0:
                raise _bad(record_id, path, f"image has an empty size {w}x{h}")
            if w * h > max_pixels:
                raise _bad(
                    record_id,
                    path,
                    f"image is {w}x{h} = {w * h} pixels, more than max_pixels={max_pixels} (possible "
                    "decompression bomb); raise max_pixels if such images are intended",
                )
            problem = check_size(w, h) if check_size is not None else None
            if problem:
                raise _bad(record_id, path, problem)
            if draft is not None and img.format == "JPEG":
                img.draft(img.mode, draft(w, h))
            img.load()
    except BadSample:
        raise
    except Image.DecompressionBombError as e:
        raise _bad(record_id, path, f"image too large (decompression bomb guard): {e}") from None
    except Image.UnidentifiedImageError:
        raise _bad(record_id, path, "not a recognised image format (corrupt file?)") from None
    except Exception as e:  # Pillow decoders raise OSError, SyntaxError, ValueError, struct.error, ...
        raise _bad(record_id, path, f"corrupt or truncated image data ({type(e).__name__}: {e})") from None
    return img


def to_rgb(image: Image.Image | np.ndarray) -> Image.Image:
    """Any Pillow image (or uint8 array HW / HWC with C in 1, 3, 4) -> RGB Pillow image.

    Transparency is composited over white, as `transformers` does; other modes use `convert("RGB")`.
    """
    if isinstance(image, np.ndarray):
        image = _array_to_pil(image)
    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _array_to_pil(array: np.ndarray) -> Image.Image:
    if array.dtype != np.uint8:
        raise ValueError(f"image arrays must be uint8 (HW or HWC), got {array.dtype}; convert pixels to 0..255 first")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        return Image.fromarray(array)  # 2-D uint8 -> mode L
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        return Image.fromarray(np.ascontiguousarray(array))
    raise ValueError(f"image array must be HW or HWC with 1, 3 or 4 channels, got shape {array.shape}")


def expand_to_square(image: Image.Image, background: tuple[int, ...] = PAD_BACKGROUND) -> Image.Image:
    """Pastes `image` centred on a max(W, H) square canvas of `background` (LLaVA's `pad` mode)."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new(image.mode, (side, side), background)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def resized_size(width: int, height: int, image_size: int) -> tuple[int, int]:
    """(w, h) after resizing the shortest side to `image_size` (longer side truncated, as transformers)."""
    if width <= height:
        return image_size, int(image_size * height / width)
    return int(image_size * width / height), image_size


def work_pixels(width: int, height: int, image_size: int, aspect_ratio: str) -> int:
    """Pixels of the largest image that exact preprocessing of a (width, height) image holds at once:
    the decoded image, the `pad` square canvas, and the resized image before its centre crop."""
    if aspect_ratio == "pad":
        side = max(width, height)
        return max(width * height, side * side, image_size * image_size)
    nw, nh = resized_size(width, height, image_size)
    return max(width * height, nw * nh)


def size_problem(
    width: int,
    height: int,
    image_size: int,
    aspect_ratio: str,
    *,
    max_aspect_ratio: float | None = None,
    max_work_pixels: int | None = None,
) -> str | None:
    """Why a (width, height) image is refused under the given limits (None = accepted, or no limits)."""
    ratio = max(width, height) / min(width, height)
    if max_aspect_ratio is not None and ratio > max_aspect_ratio:
        return (
            f"image is {width}x{height}: its aspect ratio {ratio:.1f}:1 is more than "
            f"max_aspect_ratio={max_aspect_ratio:g}; crop or pad it to a less extreme shape"
        )
    if max_work_pixels is not None:
        work = work_pixels(width, height, image_size, aspect_ratio)
        if work > max_work_pixels:
            return (
                f"image is {width}x{height}: preprocessing it ({aspect_ratio!r} at {image_size} px) needs a "
                f"{work}-pixel intermediate image, more than max_work_pixels={max_work_pixels}; send a smaller "
                "or less elongated image"
            )
    return None


def _resize_center_crop(image: Image.Image, image_size: int, fast: bool) -> np.ndarray:
    w, h = image.size
    nw, nh = resized_size(w, h, image_size)
    left, top = (nw - image_size) // 2, (nh - image_size) // 2
    if fast:
        sx, sy = w / nw, h / nh
        box = (left * sx, top * sy, (left + image_size) * sx, (top + image_size) * sy)
        out = image.resize((image_size, image_size), _BICUBIC, box=box)
        return np.asarray(out)
    if (nw, nh) != (w, h):
        image = image.resize((nw, nh), _BICUBIC)
    if (nw, nh) != (image_size, image_size):
        image = image.crop((left, top, left + image_size, top + image_size))
    return np.asarray(image)


def preprocess(
    image: Image.Image | np.ndarray,
    image_size: int,
    aspect_ratio: str = "square",
    *,
    fast: bool = False,
) -> np.ndarray:
    """A decoded image (any Pillow mode, or a uint8 array) -> uint8 [S, S, 3] CLIP pixels (unnormalized).

    `aspect_ratio`: "square" (resize shortest side + centre crop) or "pad" (expand to a mean-coloured
    square first). `fast=True` allows small pixel differences for speed (see module docstring).
    """
    if aspect_ratio not in ASPECT_RATIOS:
        raise ValueError(f"image_aspect_ratio must be one of {ASPECT_RATIOS}, got {aspect_ratio!r}")
    image = to_rgb(image)
    if aspect_ratio == "pad":
        if fast:
            return _fast_pad(image, image_size)
        image = expand_to_square(image)
    return _resize_center_crop(image, image_size, fast)


def _fast_pad(image: Image.Image, image_size: int) -> np.ndarray:
    w, h = image.size
    scale = image_size / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    canvas = Image.new("RGB", (image_size, image_size), PAD_BACKGROUND)
    canvas.paste(image.resize((nw, nh), _BICUBIC), ((image_size - nw) // 2, (image_size - nh) // 2))
    return np.asarray(canvas)


def _draft_target(width: int, height: int, image_size: int, aspect_ratio: str) -> tuple[int, int]:
    """Smallest decode size from which `fast` preprocessing still downsamples (never upsamples)."""
    if aspect_ratio == "pad":
        side = max(width, height)
        return max(1, image_size * width // side), max(1, image_size * height // side)
    return resized_size(width, height, image_size)


def load_image(
    source: ImageSource,
    image_size: int,
    aspect_ratio: str = "square",
    *,
    record_id=None,
    fast: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    path_hint: str | None = None,
    max_aspect_ratio: float | None = None,
    max_work_pixels: int | None = None,
) -> np.ndarray:
    """File path or encoded bytes -> uint8 [S, S, 3]; decode errors raise BadSample naming record and file.

    `max_aspect_ratio` / `max_work_pixels` (None = unlimited) refuse images from the header, before
    decoding (see `size_problem`).
    """
    draft = (lambda w, h: _draft_target(w, h, image_size, aspect_ratio)) if fast else None
    check = None
    if max_aspect_ratio is not None or max_work_pixels is not None:
        check = functools.partial(
            size_problem,
            image_size=image_size,
            aspect_ratio=aspect_ratio,
            max_aspect_ratio=max_aspect_ratio,
            max_work_pixels=max_work_pixels,
        )
    img = open_image(
        source, record_id=record_id, max_pixels=max_pixels, path_hint=path_hint, draft=draft, check_size=check
    )
    try:
        return preprocess(img, image_size, aspect_ratio, fast=fast)
    except (OSError, ValueError) as e:  # e.g. a mode Pillow cannot convert
        path = path_hint if not isinstance(source, (str, os.PathLike)) else os.fspath(source)
        raise _bad(record_id, path, f"cannot convert image to RGB ({type(e).__name__}: {e})") from None


def normalize(pixels: np.ndarray) -> np.ndarray:
    """uint8 [..., 3] -> float32 [..., 3]: `(x / 255 - CLIP_MEAN) / CLIP_STD` (the model's on-device step)."""
    x = np.asarray(pixels, dtype=np.float32) * np.float32(1.0 / 255.0)
    return (x - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)
