"""Question files with images for the evaluation tests."""

from __future__ import annotations

import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "inference"))
from serving_fixtures import png_bytes, shared_checkpoint  # noqa: F401  (re-exported)


def write_questions(
    folder: pathlib.Path, n: int = 12, *, missing: tuple[int, ...] = (), corrupt: tuple[int, ...] = ()
) -> pathlib.Path:
    """A model_vqa JSONL question file of n questions over images in folder/images; question i uses
    image i % 4; indices in `missing` point at absent files, in `corrupt` at a file that is not an image."""
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    for k in range(4):
        (images / f"img{k}.png").write_bytes(png_bytes(40 + 13 * k, 30 + 7 * k, seed=k))
    (images / "broken.png").write_bytes(b"not an image at all")
    words = [
        "What is shown?",
        "Describe the picture in detail, please.",
        "Colour?",
        "Which object is on the left side of the image and why is it there?",
    ]
    lines = []
    for i in range(n):
        image = "absent.png" if i in missing else "broken.png" if i in corrupt else f"img{i % 4}.png"
        lines.append(
            {
                "question_id": i,
                "image": image,
                "text": words[i % 4] + " " * (i % 3),
                "category": ["conv", "detail", "complex"][i % 3],
            }
        )
    path = folder / "questions.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path
