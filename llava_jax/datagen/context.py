"""Image annotations -> the symbolic context a text-only model reads in place of the image.

Inputs (one `Annotation` per image, in input order):

* COCO: a captions file (``captions_train2017.json``: images + annotations with ``caption``) and
  optionally an instances file (``instances_train2017.json``: annotations with ``bbox`` = pixel
  ``[x, y, width, height]`` and ``category_id``, plus ``categories``). Images come in the captions
  file's order; an image without captions is left out (counted).
* JSON Lines: ``{"image": "000000033471.jpg", "captions": ["...", ...],
  "boxes": [{"category": "person", "bbox": [x1, y1, x2, y2]}, ...]}`` with boxes already normalized
  to 0-1 (top-left, bottom-right).

Context, as in the paper: the captions, one per line; for ``detail`` and ``complex`` also a blank line
and one ``category: [x1, y1, x2, y2]`` line per object, coordinates normalized to the image size and
rounded to 3 decimals (printed as Python prints the rounded float: ``0.0``, ``0.44``, ``0.298``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Iterable

log = logging.getLogger(__name__)

BOX_KINDS = ("detail", "complex")


@dataclasses.dataclass(frozen=True)
class Box:
    category: str
    bbox: tuple[float, float, float, float]  # normalized x1, y1, x2, y2


@dataclasses.dataclass(frozen=True)
class Annotation:
    """One image's annotations: `image` is its file name (the key of every generated sample)."""

    image: str
    captions: tuple[str, ...]
    boxes: tuple[Box, ...] = ()


def _num(v: float) -> str:
    return repr(round(float(v), 3) + 0.0)  # + 0.0 turns -0.0 into 0.0


def box_line(box: Box) -> str:
    return f"{box.category}: [{', '.join(_num(v) for v in box.bbox)}]"


def format_context(annotation: Annotation, kind: str) -> str:
    """The query text for one image and kind (see the module docstring)."""
    text = "\n".join(annotation.captions)
    if kind in BOX_KINDS and annotation.boxes:
        text += "\n\n" + "\n".join(box_line(b) for b in annotation.boxes)
    return text


def _load_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"annotation file not found: {path}")
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict) or "annotations" not in data or "images" not in data:
        raise ValueError(f"{path} is not a COCO annotation file (needs 'images' and 'annotations')")
    return data


def load_coco(captions_path: str, instances_path: str | None = None) -> list[Annotation]:
    """COCO captions (+ instances) files -> annotations, in the captions file's image order."""
    caps = _load_json(captions_path)
    captions: dict[int, list[str]] = {}
    for a in caps["annotations"]:
        text = str(a.get("caption", "")).strip()
        if text:
            captions.setdefault(a["image_id"], []).append(text)
    images = {im["id"]: im for im in caps["images"]}
    boxes: dict[int, list[Box]] = {}
    if instances_path:
        inst = _load_json(instances_path)
        names = {c["id"]: c["name"] for c in inst.get("categories", [])}
        sizes = {im["id"]: (im["width"], im["height"]) for im in inst["images"]}
        sizes.update({i: (im["width"], im["height"]) for i, im in images.items() if "width" in im})
        for a in inst["annotations"]:
            image_id = a["image_id"]
            if image_id not in sizes:
                raise ValueError(
                    f"{instances_path}: annotation {a.get('id')} refers to image {image_id}, which has no width/height"
                )
            if a["category_id"] not in names:
                raise ValueError(
                    f"{instances_path}: annotation {a.get('id')} has category {a['category_id']} not in 'categories'"
                )
            w, h = sizes[image_id]
            x, y, bw, bh = a["bbox"]
            boxes.setdefault(image_id, []).append(
                Box(names[a["category_id"]], (x / w, y / h, (x + bw) / w, (y + bh) / h))
            )
    out, no_captions = [], 0
    for image_id, im in images.items():
        if image_id not in captions:
            no_captions += 1
            continue
        out.append(
            Annotation(
                im["file_name"],
                tuple(captions[image_id]),
                tuple(boxes.get(image_id, ())),
            )
        )
    if no_captions:
        log.warning(
            "%d images in %s have no captions and are left out",
            no_captions,
            captions_path,
        )
    return out


def _jsonl_annotation(raw: dict, where: str) -> Annotation:
    if not isinstance(raw, dict) or not isinstance(raw.get("image"), str) or not raw["image"]:
        raise ValueError(f"{where}: needs an 'image' file name")
    captions = raw.get("captions")
    if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
        raise ValueError(f"{where}: 'captions' must be a list of strings")
    captions = tuple(c.strip() for c in captions if c.strip())
    if not captions:
        raise ValueError(f"{where}: no non-empty caption")
    boxes = []
    for i, b in enumerate(raw.get("boxes") or []):
        try:
            bbox = tuple(float(v) for v in b["bbox"])
            category = str(b["category"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(
                f"{where}: box {i} must be {{'category': str, 'bbox': [x1, y1, x2, y2]}}, got {b!r:.80}"
            ) from None
        if len(bbox) != 4 or not all(-0.01 <= v <= 1.01 for v in bbox) or bbox[2] < bbox[0] or bbox[3] < bbox[1]:
            raise ValueError(
                f"{where}: box {i} {list(bbox)} is not a normalized [x1, y1, x2, y2] box (0-1, top-left then "
                "bottom-right); divide pixel coordinates by the image width and height"
            )
        boxes.append(Box(category, bbox))
    return Annotation(raw["image"], captions, tuple(boxes))


def load_jsonl(path: str) -> list[Annotation]:
    """A JSON Lines annotation file (see the module docstring); errors name the line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"annotation file not found: {path}")
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e})") from None
            out.append(_jsonl_annotation(raw, f"{path}:{lineno}"))
    return out


def unique_images(annotations: Iterable[Annotation]) -> list[Annotation]:
    """Drop repeated images (the first wins): (image, kind) is the key of a generated sample."""
    seen, out = set(), []
    for a in annotations:
        if a.image not in seen:
            seen.add(a.image)
            out.append(a)
    return out
