"""Synthetic LLaVA data: coloured shapes, in the real LLaVA JSON + image folder format.

    python -m llava_jax.data.synthetic --out data/shapes --image-size 64 \
        --num-pretrain 4000 --num-instruct 4000 --num-eval 500 --seed 0

Each image shows 1-4 copies of one shape in one colour, centred in one half of a near-white canvas
(a random light tint per image):

    colour    red, green, blue, yellow, purple
    shape     circle, square, triangle
    count     1, 2, 3, 4
    position  left, right, top, bottom (the half of the image the shapes are in)

Files written under OUT:
  images/{split}_{i:06d}.png   (or .jpg with --format jpg)
  pretrain.json  stage 1: [{"id", "image", "conversations": [human "<image>\\n" + a brief-description
                 instruction, gpt caption such as "2 red circles on the left."]}]
  instruct.json  stage 2: multi-turn Q&A, 2-4 questions per image about colour, shape, count and
                 position, answered with one word ("red", "circle", "2", "left")
  eval.json      held-out images (none pixel-identical to a pretrain/instruct image), one question per record:
                 {"id", "image", "conversations": [question, answer], "question", "answer",
                  "category": "color" | "shape" | "count" | "position", "choices": [...]}
                 `choices` lists every possible answer of that category, for scoring-based accuracy
                 (chance is 1 / len(choices)); `answer` is the exact string greedy decoding should give.
  meta.json      the vocabulary above and the arguments used.

The visual cues are large and few (5 x 3 x 4 x 4 = 240 scene types) so a tiny model trained for a few
minutes on a CPU gets far above chance. Output is a pure function of the arguments (seed included).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys

import numpy as np
from PIL import Image, ImageDraw

from llava_jax.paths import Path, as_path

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 200, 0),
    "purple": (140, 40, 180),
}
SHAPES = ("circle", "square", "triangle")
COUNTS = (1, 2, 3, 4)
POSITIONS = ("left", "right", "top", "bottom")
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
BACKGROUND_RANGE = (232, 255)  # per-channel background tint: near-white, varies per image

CAPTION_INSTRUCTIONS = (
    "Describe the image briefly.",
    "Give a short description of the picture.",
    "What is shown in this image? Answer in a few words.",
    "Write a brief caption for the image.",
    "Summarize the image in one short sentence.",
)
QUESTIONS = {
    "color": ("What color are the shapes?", "Which color do the shapes have?"),
    "shape": ("What shape are they?", "Which shape is shown?"),
    "count": ("How many shapes are there?", "How many objects can you see?"),
    "position": ("Where are the shapes?", "Which side of the image are the shapes on?"),
}
ANSWER_SUFFIX = " Answer with one word."
CHOICES = {
    "color": tuple(COLORS),
    "shape": SHAPES,
    "count": tuple(str(c) for c in COUNTS),
    "position": POSITIONS,
}


@dataclasses.dataclass(frozen=True)
class Scene:
    """What one image shows: `count` shapes of one `shape` and `color`, in the `position` half."""

    color: str
    shape: str
    count: int
    position: str

    def answer(self, category: str) -> str:
        return {"color": self.color, "shape": self.shape, "count": str(self.count), "position": self.position}[category]

    def caption(self) -> str:
        noun = self.shape if self.count == 1 else self.shape + "s"
        position = f"on the {self.position}" if self.position in ("left", "right") else f"at the {self.position}"
        return f"{self.count} {self.color} {noun} {position}."


def random_scene(rng: np.random.Generator) -> Scene:
    return Scene(
        color=list(COLORS)[rng.integers(len(COLORS))],
        shape=SHAPES[rng.integers(len(SHAPES))],
        count=int(COUNTS[rng.integers(len(COUNTS))]),
        position=POSITIONS[rng.integers(len(POSITIONS))],
    )


# Shape centres inside their half, in the half's own (u, v) in [0, 1] coordinates, for a tall half
# (left/right; transposed for top/bottom). Every layout is centred on the half, so the group's centre
# is the half's centre and the position answer is never ambiguous.
_LAYOUTS = {
    1: ((0.5, 0.5),),
    2: ((0.5, 0.27), (0.5, 0.73)),
    3: ((0.25, 0.3), (0.75, 0.3), (0.5, 0.72)),
    4: ((0.25, 0.27), (0.75, 0.27), (0.25, 0.73), (0.75, 0.73)),
}


def render(scene: Scene, image_size: int, rng: np.random.Generator) -> Image.Image:
    """Draws `scene` on an S x S near-white canvas: `count` shapes in a fixed layout centred on their half.

    Shapes are 0.34 x the half's short side (11 px at S = 64), on whole pixels, jittered by at most
    0.02 x that side, so they stay >= 2 px apart (counts stay countable) and inside their half.
    """
    s = image_size
    background = tuple(int(v) for v in rng.integers(BACKGROUND_RANGE[0], BACKGROUND_RANGE[1] + 1, size=3))
    img = Image.new("RGB", (s, s), background)
    draw = ImageDraw.Draw(img)
    tall = scene.position in ("left", "right")
    hx = s // 2 if scene.position == "right" else 0
    hy = s // 2 if scene.position == "bottom" else 0
    hw, hh = (s // 2, s) if tall else (s, s // 2)
    short = min(hw, hh)
    size = max(3, round(0.34 * short))  # whole pixels: rasterization never closes the gaps
    jitter = int(0.02 * short)
    color = COLORS[scene.color]
    for u, v in _LAYOUTS[scene.count]:
        if not tall:
            u, v = v, u
        x0 = round(hx + u * hw) - size // 2 + int(rng.integers(-jitter, jitter + 1))
        y0 = round(hy + v * hh) - size // 2 + int(rng.integers(-jitter, jitter + 1))
        x1, y1 = x0 + size - 1, y0 + size - 1  # inclusive corners
        if scene.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=color)
        elif scene.shape == "square":
            inset = round(0.08 * size)
            draw.rectangle((x0 + inset, y0 + inset, x1 - inset, y1 - inset), fill=color)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=color)
    return img


def _save(img: Image.Image, path: Path, image_format: str) -> None:
    with path.open("wb") as f:
        if image_format == "png":
            img.save(f, format="PNG", compress_level=1)
        else:
            img.save(f, format="JPEG", quality=95)


def _question(category: str, rng: np.random.Generator) -> str:
    options = QUESTIONS[category]
    return options[rng.integers(len(options))] + ANSWER_SUFFIX


def generate(
    out_dir: str,
    *,
    image_size: int = 64,
    num_pretrain: int = 2000,
    num_instruct: int = 2000,
    num_eval: int = 400,
    seed: int = 0,
    image_format: str = "png",
    questions: tuple[int, int] = (2, 4),
) -> dict:
    """Writes the dataset described in the module docstring; returns {split: json path} plus counts.

    questions: (min, max) questions per instruct image, each category at most once (1 <= min <= max <= 4).
    """
    if image_format not in ("png", "jpg"):
        raise ValueError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
    lo, hi = (int(q) for q in questions)
    if not 1 <= lo <= hi <= len(QUESTIONS):
        raise ValueError(f"questions must be (min, max) with 1 <= min <= max <= {len(QUESTIONS)}, got {questions!r}")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16 for the shapes to be recognisable, got {image_size}")
    out = as_path(out_dir)  # a local folder or a URL (gs://...)
    images = _ImageWriter(out / "images", image_size, image_format)
    images.folder.mkdir(parents=True, exist_ok=True)
    # Independent streams per split: changing one split's size never changes another split's data.
    rngs = {split: np.random.default_rng([seed, k]) for k, split in enumerate(("pretrain", "instruct", "eval"))}
    splits = {
        "pretrain": _pretrain_records(num_pretrain, images, rngs["pretrain"]),
        "instruct": _instruct_records(num_instruct, images, rngs["instruct"], (lo, hi)),
        "eval": _eval_records(num_eval, images, rngs["eval"]),
    }
    paths = {}
    for split, records in splits.items():
        paths[split] = os.fspath(out / f"{split}.json")
        (out / f"{split}.json").write_text(json.dumps(records, indent=1))
    meta = {
        "image_size": image_size,
        "seed": seed,
        "image_format": image_format,
        "questions": [lo, hi],
        "counts": {"pretrain": num_pretrain, "instruct": num_instruct, "eval": num_eval},
        "colors": list(COLORS),
        "shapes": list(SHAPES),
        "numbers": [str(c) for c in COUNTS],
        "positions": list(POSITIONS),
        "choices": {k: list(v) for k, v in CHOICES.items()},
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return {**paths, "image_folder": out_dir, "counts": meta["counts"]}


class _ImageWriter:
    """Draws and saves one image per record; held-out (eval) images are redrawn until they differ in
    pixels from every training (pretrain / instruct) image drawn before."""

    def __init__(self, folder: Path, image_size: int, image_format: str):
        self.folder, self.image_size, self.image_format = folder, image_size, image_format
        self.train_pixels: set[bytes] = set()  # pixel digests of pretrain/instruct images

    def __call__(self, split: str, i: int, rng: np.random.Generator) -> tuple[str, Scene]:
        """-> (the image path relative to the dataset folder, the scene it shows)."""
        for _ in range(1000):
            scene = random_scene(rng)
            img = render(scene, self.image_size, rng)
            digest = hashlib.sha1(img.tobytes()).digest()
            if split != "eval":
                self.train_pixels.add(digest)
                break
            if digest not in self.train_pixels:  # held out: never pixel-identical to a training image
                break
        else:
            raise RuntimeError("could not draw an eval image unlike every training image; lower the record counts")
        name = f"{split}_{i:06d}.{self.image_format}"
        _save(img, self.folder / name, self.image_format)
        return "images/" + name, scene


def _pretrain_records(n: int, images: _ImageWriter, rng: np.random.Generator) -> list[dict]:
    """Stage 1: a brief-description instruction and the scene's caption."""
    records = []
    for i in range(n):
        image, scene = images("pretrain", i, rng)
        instruction = CAPTION_INSTRUCTIONS[rng.integers(len(CAPTION_INSTRUCTIONS))]
        records.append(
            {
                "id": f"pretrain-{i:06d}",
                "image": image,
                "conversations": [
                    {"from": "human", "value": "<image>\n" + instruction},
                    {"from": "gpt", "value": scene.caption()},
                ],
            }
        )
    return records


def _instruct_records(n: int, images: _ImageWriter, rng: np.random.Generator, questions: tuple[int, int]) -> list[dict]:
    """Stage 2: `questions` = (min, max) one-word questions per image, each category at most once."""
    categories = tuple(QUESTIONS)
    lo, hi = questions
    records = []
    for i in range(n):
        image, scene = images("instruct", i, rng)
        order = rng.permutation(len(categories))[: int(rng.integers(lo, hi + 1))]
        conversations = []
        for t, c in enumerate(order):
            question = _question(categories[c], rng)
            conversations.append({"from": "human", "value": ("<image>\n" + question) if t == 0 else question})
            conversations.append({"from": "gpt", "value": scene.answer(categories[c])})
        records.append({"id": f"instruct-{i:06d}", "image": image, "conversations": conversations})
    return records


def _eval_records(n: int, images: _ImageWriter, rng: np.random.Generator) -> list[dict]:
    """Held-out questions, categories in turn, with the answer and the category's choices."""
    categories = tuple(QUESTIONS)
    records = []
    for i in range(n):
        image, scene = images("eval", i, rng)
        category = categories[i % len(categories)]  # balanced categories
        question = _question(category, rng)
        answer = scene.answer(category)
        records.append(
            {
                "id": f"eval-{i:06d}",
                "image": image,
                "conversations": [
                    {"from": "human", "value": "<image>\n" + question},
                    {"from": "gpt", "value": answer},
                ],
                "question": question,
                "answer": answer,
                "category": category,
                "choices": list(CHOICES[category]),
            }
        )
    return records


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m llava_jax.data.synthetic", description="Write the synthetic coloured-shapes LLaVA dataset."
    )
    p.add_argument("--out", required=True, help="output folder (images/ and the JSON files go here)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--num-pretrain", type=int, default=2000)
    p.add_argument("--num-instruct", type=int, default=2000)
    p.add_argument("--num-eval", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", choices=("png", "jpg"), default="png")
    p.add_argument(
        "--questions", type=int, nargs=2, default=(2, 4), metavar=("MIN", "MAX"), help="questions per instruct image"
    )
    a = p.parse_args(argv)
    r = generate(
        a.out,
        image_size=a.image_size,
        num_pretrain=a.num_pretrain,
        num_instruct=a.num_instruct,
        num_eval=a.num_eval,
        seed=a.seed,
        image_format=a.format,
        questions=tuple(a.questions),
    )
    c = r["counts"]
    print(
        f"wrote {c['pretrain']} pretrain, {c['instruct']} instruct, {c['eval']} eval records to {a.out} "
        f"(image folder: {r['image_folder']})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
