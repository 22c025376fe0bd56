"""CLIP preprocessing: pixel parity with transformers, mode conversion, and bad image files."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from llava_jax.data.errors import BadSample
from llava_jax.data.image import (
    CLIP_MEAN,
    CLIP_STD,
    PAD_BACKGROUND,
    expand_to_square,
    load_image,
    normalize,
    open_image,
    preprocess,
    work_pixels,
)

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "horse", "page")


def _processor(size):
    try:  # transformers >= 5 names the Pillow backend explicitly
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:
        from transformers import CLIPImageProcessor as Processor
    return Processor(size=size, crop_size=size)


def _photo(name) -> Image.Image:
    import skimage.data

    a = getattr(skimage.data, name)()
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    return Image.fromarray(a)


def _reference(proc, image: Image.Image, mode: str) -> np.ndarray:
    """transformers' output as HWC float32 (for `pad`: LLaVA's expand2square first)."""
    if mode == "pad":
        image = expand_to_square(image.convert("RGB"), PAD_BACKGROUND)
    return proc(image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)


def _jpeg(size=(64, 48), quality=90) -> bytes:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def test_constants():
    assert PAD_BACKGROUND == (122, 116, 104)
    assert CLIP_MEAN == (0.48145466, 0.4578275, 0.40821073)
    assert CLIP_STD == (0.26862954, 0.26130258, 0.27577711)


@pytest.mark.parametrize("size", [224, 336])
@pytest.mark.parametrize("mode", ["square", "pad"])
def test_parity_with_clip_image_processor(size, mode):
    proc = _processor(size)
    for name in PHOTOS:
        img = _photo(name)
        out = preprocess(img, size, mode)
        assert out.shape == (size, size, 3) and out.dtype == np.uint8, name
        err = np.abs(normalize(out) - _reference(proc, img, mode)).max()
        assert err < 1e-5, (name, size, mode, err)


def test_parity_through_jpeg_decode(tmp_path):
    """File -> load_image equals Image.open(file).convert('RGB') -> processor."""
    proc = _processor(224)
    path = tmp_path / "x.jpg"
    _photo("chelsea").save(path, quality=85)
    ref = _reference(proc, Image.open(path).convert("RGB"), "square")
    for source in (str(path), path.read_bytes()):
        out = load_image(source, 224, "square", record_id="r")
        assert np.abs(normalize(out) - ref).max() < 1e-5


def _mode_cases():
    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8))
    rgba = rgb.copy()
    rgba.putalpha(Image.fromarray(rng.integers(0, 256, (37, 53), dtype=np.uint8)))
    p_transparent = rgb.convert("P")
    p_transparent.info["transparency"] = 3
    i16 = Image.fromarray((rng.integers(0, 4000, (37, 53))).astype(np.uint16))
    return {
        "L": rgb.convert("L"),
        "1": rgb.convert("1"),
        "P": rgb.convert("P"),
        "P+transparency": p_transparent,
        "RGBA": rgba,
        "LA": rgba.convert("LA"),
        "CMYK": rgb.convert("CMYK"),
        "YCbCr": rgb.convert("YCbCr"),
        "I;16": i16,
        "I": i16.convert("I"),
    }


@pytest.mark.parametrize("case", list(_mode_cases()))
def test_mode_conversion_matches_processor(case):
    img = _mode_cases()[case]
    proc = _processor(32)
    out = preprocess(img, 32, "square")
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert np.abs(normalize(out) - proc(img, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)).max() < 1e-5


def test_transparency_composited_on_white():
    img = Image.new("RGBA", (8, 8), (10, 20, 30, 0))  # fully transparent
    assert (preprocess(img, 8) == 255).all()


def test_mode_files_round_trip(tmp_path):
    """Non-RGB files (grey PNG, palette GIF, RGBA PNG, CMYK JPEG, 16-bit PNG) all load to RGB uint8."""
    cases = _mode_cases()
    files = {
        "L.png": cases["L"],
        "P.gif": cases["P"],
        "RGBA.png": cases["RGBA"],
        "CMYK.jpg": cases["CMYK"],
        "I16.png": cases["I;16"],
    }
    for name, img in files.items():
        img.save(tmp_path / name)
        out = load_image(str(tmp_path / name), 16, "pad", record_id=name)
        assert out.shape == (16, 16, 3) and out.dtype == np.uint8, name


def test_array_input_and_pad_background():
    a = np.full((10, 40, 3), 200, np.uint8)  # wide: pad adds background rows above and below
    out = preprocess(a, 40, "pad")
    assert tuple(out[0, 20]) == PAD_BACKGROUND and tuple(out[20, 20]) == (200, 200, 200)
    assert preprocess(a[..., 0], 10).shape == (10, 10, 3)
    with pytest.raises(ValueError, match="uint8"):
        preprocess(a.astype(np.float32), 10)
    with pytest.raises(ValueError, match="image_aspect_ratio"):
        preprocess(a, 10, "keep")


def test_normalize_formula():
    x = np.arange(256, dtype=np.uint8).reshape(-1, 1).repeat(3, 1)
    want = (x / 255.0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    got = normalize(x)
    assert got.dtype == np.float32 and np.abs(got - want).max() < 1e-6


def test_fast_mode_is_close():
    for name in ("chelsea", "rocket"):
        img = _photo(name)
        exact = preprocess(img, 224).astype(int)
        fast = preprocess(img, 224, fast=True).astype(int)
        assert fast.shape == exact.shape and np.abs(fast - exact).mean() < 1.0
    data = _jpeg((640, 480))
    a = load_image(data, 112, fast=True).astype(int)  # JPEG draft decode at 1/4 scale
    b = load_image(data, 112).astype(int)
    assert a.shape == (112, 112, 3) and np.abs(a - b).mean() < 12  # noise image: hardest case


# Bad files: every case raises BadSample naming the record and the file.


def _png_header_only(width, height) -> bytes:
    """A PNG whose header claims width x height pixels (no pixel data): a decompression bomb stand-in."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def _bad_files(tmp_path):
    full = _jpeg((64, 48))
    files = {
        "zero.jpg": b"",
        "corrupt.jpg": b"this is not an image at all" * 10,
        "truncated.jpg": full[: len(full) // 2],
        "bomb.png": _png_header_only(100_000, 100_000),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return ["missing.jpg", *files]


@pytest.mark.parametrize(
    "name,reason",
    [
        ("missing.jpg", "not found"),
        ("zero.jpg", "empty"),
        ("corrupt.jpg", "not a recognised image"),
        ("truncated.jpg", "truncated"),
        ("bomb.png", "decompression bomb"),
    ],
)
def test_bad_files_raise_bad_sample(tmp_path, name, reason):
    _bad_files(tmp_path)
    path = str(tmp_path / name)
    with pytest.raises(BadSample) as info:
        load_image(path, 32, record_id="rec-7")
    e = info.value
    assert e.record_id == "rec-7" and e.path == path and reason in e.reason
    assert "rec-7" in str(e) and name in str(e)


def test_bad_bytes_name_the_file_hint(tmp_path):
    with pytest.raises(BadSample) as info:
        load_image(b"garbage", 32, record_id=3, path_hint="images/x.jpg")
    assert info.value.path == "images/x.jpg" and info.value.record_id == 3
    with pytest.raises(BadSample, match="empty"):
        load_image(b"", 32, record_id=3)


def test_max_pixels_is_explicit():
    data = _jpeg((64, 48))
    assert open_image(data, max_pixels=64 * 48).size == (64, 48)
    with pytest.raises(BadSample, match="max_pixels=3071"):
        open_image(data, record_id="r", max_pixels=64 * 48 - 1)


def _solid_png(width, height) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 90)).save(buf, format="PNG")
    return buf.getvalue()


def test_work_pixels_of_thin_images():
    # square: the shortest side goes to S first; 2 x 3000 at 336 px -> 336 x 504000 before the crop
    assert work_pixels(2, 3000, 336, "square") == 336 * 504_000
    # pad: a max(W, H) square canvas first; 1 x 20000 -> 20000 x 20000
    assert work_pixels(1, 20_000, 336, "pad") == 20_000 * 20_000
    # an ordinary photo: the decoded image itself is the largest
    assert work_pixels(640, 480, 336, "square") == 640 * 480
    assert work_pixels(640, 480, 336, "pad") == 640 * 640


@pytest.mark.parametrize(
    "width,height,mode,limits,reason",
    [
        (2, 3000, "square", dict(max_aspect_ratio=20), "aspect ratio 1500.0:1 is more than max_aspect_ratio=20"),
        (1, 20_000, "pad", dict(max_aspect_ratio=20), "aspect ratio 20000.0:1"),
        (2, 3000, "square", dict(max_work_pixels=2**26), "169344000-pixel intermediate image"),
        (9000, 450, "pad", dict(max_aspect_ratio=20, max_work_pixels=2**26), "81000000-pixel intermediate"),
    ],
)
def test_shape_limits_refuse_before_decoding(monkeypatch, width, height, mode, limits, reason):
    data = _solid_png(width, height)
    assert len(data) < 20_000  # a small file that would need hundreds of MB to preprocess

    def no_decode(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    with pytest.raises(BadSample) as info:
        load_image(data, 336, mode, record_id="r1", path_hint="thin.png", **limits)
    assert reason in info.value.reason and info.value.path == "thin.png"


def test_shape_limits_keep_ordinary_images():
    data = _jpeg((64, 48))
    for mode in ("square", "pad"):
        want = load_image(data, 32, mode)
        got = load_image(data, 32, mode, max_aspect_ratio=20, max_work_pixels=64 * 64)
        np.testing.assert_array_equal(got, want)
    # without limits (the data pipeline's default) a thin image is still preprocessed
    assert load_image(_solid_png(3, 100), 32, "square").shape == (32, 32, 3)
