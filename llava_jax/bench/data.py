"""Data pipeline throughput: llava_jax (grain) vs transformers' CLIPImageProcessor + tokenizer.

    python -m llava_jax.bench data [--num 1024] [--workers 2] [--batch-size 16] [--image-size 336]
                                   [--aspect square|pad] [--out result.json]

Builds `--num` JPEG photos of COCO-like sizes (640x480, 480x640, 640x427, ...; crops, flips and colour
changes of the scikit-image sample photos) and LLaVA v1 conversations about them, then runs, on the
same inputs in the same process:

* llava_jax: `make_batches` (decode + CLIP preprocessing to uint8 + tokenization with labels + batch),
  with `--workers` worker processes, and again with none (same core budget as the reference);
* reference: what a PyTorch LLaVA data loader does per sample: `Image.open(...).convert("RGB")`,
  `CLIPImageProcessor(size=S, crop_size=S)` (normalized float32) and the Hugging Face tokenizer on
  the rendered conversation, then stacking the batch; one process.

Prints samples/s for each and the ratios; steady-state rates exclude the first batch (worker start-up
is reported separately). Samples per CPU-second (this process plus its joined workers) is printed too:
it does not depend on what else runs on the machine, and times the core count it bounds what idle
cores would give.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import tempfile
import time

import numpy as np

COCO_SIZES = ((640, 480), (480, 640), (640, 427), (427, 640), (500, 375), (640, 512), (612, 612))
WORDS = [
    "the",
    "a",
    "person",
    "dog",
    "cat",
    "table",
    "street",
    "car",
    "window",
    "light",
    "red",
    "blue",
    "green",
    "small",
    "large",
    "left",
    "right",
    "near",
    "holding",
    "sitting",
    "standing",
    "looking",
    "image",
    "shows",
    "appears",
    "there",
    "is",
    "are",
    "with",
    "on",
    "in",
    "of",
    "and",
    "two",
    "three",
    "background",
    "foreground",
    "wooden",
    "metal",
    "bright",
    "dark",
    "people",
    "building",
    "tree",
    "sky",
    "road",
    "food",
    "plate",
]


def _photos() -> list[np.ndarray]:
    import skimage.data as d

    out = []
    for name in ("astronaut", "chelsea", "coffee", "rocket", "camera", "horse", "page", "motorcycle_right"):
        fn = getattr(d, name, None)
        if fn is None:
            continue
        try:
            a = fn()
        except Exception:  # a photo that needs a download in this scikit-image version
            continue
        if a.dtype == bool:
            a = a.astype(np.uint8) * 255
        if a.ndim == 2:
            a = np.stack([a] * 3, axis=-1)
        out.append(np.ascontiguousarray(a[..., :3]))
    return out


def _sentence(rng: np.random.Generator, n: int) -> str:
    words = [WORDS[i] for i in rng.integers(len(WORDS), size=n)]
    return " ".join(words).capitalize() + "."


def build_inputs(folder: str, num: int, seed: int = 0) -> str:
    """Writes `num` JPEGs into folder/images and a LLaVA JSON; returns the JSON path."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    photos = _photos()
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    records = []
    for i in range(num):
        a = photos[i % len(photos)]
        h, w = a.shape[:2]
        ch, cw = int(h * rng.uniform(0.6, 1.0)), int(w * rng.uniform(0.6, 1.0))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        crop = a[y : y + ch, x : x + cw]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        gain = rng.uniform(0.8, 1.2, size=3)
        crop = np.clip(crop.astype(np.float32) * gain, 0, 255).astype(np.uint8)
        size = COCO_SIZES[rng.integers(len(COCO_SIZES))]
        img = Image.fromarray(np.ascontiguousarray(crop)).resize(size, Image.Resampling.BILINEAR)
        name = f"images/{i:06d}.jpg"
        img.save(os.path.join(folder, name), quality=90)
        turns = []
        for t in range(int(rng.integers(1, 4))):
            q = _sentence(rng, int(rng.integers(6, 14))).rstrip(".") + "?"
            turns.append({"from": "human", "value": ("<image>\n" + q) if t == 0 else q})
            turns.append(
                {
                    "from": "gpt",
                    "value": " ".join(_sentence(rng, int(rng.integers(8, 20))) for _ in range(int(rng.integers(1, 5)))),
                }
            )
        records.append({"id": f"bench-{i:06d}", "image": name, "conversations": turns})
    path = os.path.join(folder, "bench.json")
    with open(path, "w") as f:
        json.dump(records, f)
    return path


def run_llava_jax(source, tokenizer, args, workers: int) -> dict:
    from llava_jax.data.pipeline import make_batches

    num_image_tokens = (args.image_size // 14) ** 2
    cpu0 = _cpu_seconds()
    t0 = time.perf_counter()
    it = make_batches(
        source,
        tokenizer=tokenizer,
        template="v1",
        image_size=args.image_size,
        image_aspect_ratio=args.aspect,
        num_image_tokens=num_image_tokens,
        max_length=args.max_length,
        global_batch_size=args.batch_size,
        seed=0,
        num_epochs=1,
        packing=False,
        worker_count=workers,
        on_bad_sample="raise",
        shard_index=0,
        shard_count=1,
        fast_image=args.fast,
    )
    samples, first, t_first = 0, None, None
    for batch in it:
        n = int((batch["segment_ids"].max(axis=1) > 0).sum())
        samples += n
        if first is None:
            first, t_first = n, time.perf_counter()
    t1 = time.perf_counter()
    it.close()  # joins the workers, so their CPU time is counted
    return _rates(samples, first, t0, t_first, t1, _cpu_seconds() - cpu0)


def run_reference(source, tokenizer, args) -> dict:
    from PIL import Image

    try:
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:  # older transformers: the PIL processor is CLIPImageProcessor itself
        from transformers import CLIPImageProcessor as Processor
    from llava_jax.data.templates import get_template

    processor = Processor(size=args.image_size, crop_size=args.image_size)
    template = get_template("v1")
    num_image_tokens = (args.image_size // 14) ** 2
    background = tuple(int(m * 255) for m in processor.image_mean)
    cpu0 = _cpu_seconds()
    t0 = time.perf_counter()
    samples, first, t_first = 0, None, None
    for start in range(0, len(source), args.batch_size):
        pixels, ids = [], []
        for i in range(start, min(start + args.batch_size, len(source))):
            record = source[i]
            image = Image.open(record["image_path"]).convert("RGB")
            if args.aspect == "pad":
                image = _expand2square(image, background)
            pixels.append(processor(image, return_tensors="np")["pixel_values"][0])
            text = template.render([t["value"] for t in record["conversations"]])
            text = text.replace("<image>", "<image>" * num_image_tokens)
            ids.append(tokenizer(text, truncation=True, max_length=args.max_length)["input_ids"])
        batch_pixels = np.stack(pixels)
        batch_ids = np.full((len(ids), args.max_length), tokenizer.pad_token_id, np.int32)
        for r, row in enumerate(ids):
            batch_ids[r, : len(row)] = row
        samples += len(ids)
        if first is None:
            first, t_first = len(ids), time.perf_counter()
        del batch_pixels
    t1 = time.perf_counter()
    return _rates(samples, first, t0, t_first, t1, _cpu_seconds() - cpu0)


def _expand2square(image, background):
    from PIL import Image

    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new(image.mode, (side, side), background)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (worker processes once joined)."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _rates(samples: int, first: int, t0: float, t_first: float, t1: float, cpu: float) -> dict:
    steady = (samples - first) / (t1 - t_first) if t1 > t_first and samples > first else float("nan")
    return {
        "samples": samples,
        "seconds": t1 - t0,
        "samples_per_s": samples / (t1 - t0),
        "steady_samples_per_s": steady,
        "first_batch_s": t_first - t0,
        "cpu_seconds": cpu,
        "samples_per_cpu_s": samples / cpu if cpu > 0 else float("nan"),
    }


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m llava_jax.bench data", description=__doc__.split("\n\n")[0])
    p.add_argument("--num", type=int, default=1024, help="number of samples (JPEG + conversation)")
    p.add_argument("--workers", type=int, default=2, help="llava_jax worker processes")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=336)
    p.add_argument("--aspect", choices=("square", "pad"), default="square")
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--fast", action="store_true", help="llava_jax fast_image=True (inexact resize)")
    p.add_argument("--skip-inprocess", action="store_true", help="skip the llava_jax run without workers")
    p.add_argument("--data", default=None, help="reuse/keep the generated inputs in this folder")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    a = p.parse_args(argv)

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from llava_jax.data.sources import LlavaJsonSource
    from llava_jax.data.tokenizer import load_tokenizer

    tmp = None
    folder = a.data
    if folder is None:
        tmp = tempfile.TemporaryDirectory(prefix="llava_jax_bench_data_")
        folder = tmp.name
    json_path = os.path.join(folder, "bench.json")
    if not os.path.exists(json_path) or len(json.loads(pathlib.Path(json_path).read_text())) != a.num:
        t = time.perf_counter()
        json_path = build_inputs(folder, a.num)
        print(f"built {a.num} JPEG samples in {time.perf_counter() - t:.1f}s at {folder}", flush=True)
    source = LlavaJsonSource(json_path)
    tokenizer = load_tokenizer()

    results = {
        "config": {k: v for k, v in vars(a).items() if k not in ("out", "data")},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }
    results["llava_jax"] = run_llava_jax(source, tokenizer, a, a.workers)
    print(_line(f"llava_jax ({a.workers} workers)", results["llava_jax"]), flush=True)
    if not a.skip_inprocess and a.workers:
        results["llava_jax_inprocess"] = run_llava_jax(source, tokenizer, a, 0)
        print(_line("llava_jax (in-process)", results["llava_jax_inprocess"]), flush=True)
    results["transformers"] = run_reference(source, tokenizer, a)
    print(_line("transformers (in-process)", results["transformers"]), flush=True)
    ref = results["transformers"]
    for key in ("llava_jax", "llava_jax_inprocess"):
        if key in results:
            results[f"ratio_{key}"] = results[key]["samples_per_s"] / ref["samples_per_s"]
            results[f"ratio_{key}_steady"] = results[key]["steady_samples_per_s"] / ref["steady_samples_per_s"]
            print(
                f"ratio {key} / transformers: {results[f'ratio_{key}']:.2f}x end-to-end, "
                f"{results[f'ratio_{key}_steady']:.2f}x steady state"
            )
    if a.out:
        with open(a.out, "w") as f:
            json.dump(results, f, indent=2)
    if tmp is not None:
        tmp.cleanup()
    return 0


def _line(name: str, r: dict) -> str:
    return (
        f"{name:26s} {r['samples_per_s']:7.1f} samples/s end-to-end ({r['samples']} in {r['seconds']:.1f}s), "
        f"{r['steady_samples_per_s']:7.1f} steady, first batch after {r['first_batch_s']:.1f}s, "
        f"{r['samples_per_cpu_s']:6.1f} samples per CPU-second"
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
