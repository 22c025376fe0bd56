"""Synthetic shapes data: format, determinism, held-out images, and answers that match the pixels."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from llava_jax.data import pipeline, sources, synthetic
from llava_jax.data.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    synthetic.generate(str(root), image_size=48, num_pretrain=60, num_instruct=60, num_eval=80, seed=0)
    return root


def _load(root, split):
    return json.loads((root / f"{split}.json").read_text())


def analyze(path):
    """Reads colour, count, position and shape off the pixels, independently of the generator."""
    from skimage.measure import label, regionprops

    a = np.asarray(Image.open(path).convert("RGB")).astype(int)
    s = a.shape[0]
    mask = np.abs(a - a[0, 0]).sum(-1) > 60  # corners are always background
    median = np.median(a[mask], axis=0)
    color = min(synthetic.COLORS, key=lambda c: np.abs(np.array(synthetic.COLORS[c]) - median).sum())
    regions = regionprops(label(mask, connectivity=2))
    ys, xs = np.nonzero(mask)
    centres = {"left": (s / 4, s / 2), "right": (3 * s / 4, s / 2), "top": (s / 2, s / 4), "bottom": (s / 2, 3 * s / 4)}
    position = min(centres, key=lambda p: (xs.mean() - centres[p][0]) ** 2 + (ys.mean() - centres[p][1]) ** 2)
    fill = np.mean([r.area / r.area_bbox for r in regions])
    shape = "square" if fill > 0.9 else "circle" if fill > 0.65 else "triangle"
    return {"color": color, "count": str(len(regions)), "position": position, "shape": shape}


def test_files_and_format(out):
    meta = json.loads((out / "meta.json").read_text())
    assert meta["counts"] == {"pretrain": 60, "instruct": 60, "eval": 80}
    pre, ins, ev = _load(out, "pretrain"), _load(out, "instruct"), _load(out, "eval")
    assert (len(pre), len(ins), len(ev)) == (60, 60, 80)
    for r in pre:
        h, g = r["conversations"]
        assert h["from"] == "human" and h["value"].startswith("<image>\n") and g["from"] == "gpt"
        assert h["value"][len("<image>\n") :] in synthetic.CAPTION_INSTRUCTIONS
    for r in ins:
        turns = r["conversations"]
        assert 4 <= len(turns) <= 8 and turns[0]["value"].startswith("<image>\n")
        assert sum("<image>" in t["value"] for t in turns) == 1
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
    for r in ev:
        assert r["answer"] in r["choices"] and r["conversations"][1]["value"] == r["answer"]
        assert r["conversations"][0]["value"] == "<image>\n" + r["question"]
    assert {r["category"] for r in ev} == set(synthetic.QUESTIONS)
    with Image.open(out / ins[0]["image"]) as img:
        assert img.size == (48, 48) and img.mode == "RGB"


def test_eval_images_are_held_out(out):
    train = {r["image"] for split in ("pretrain", "instruct") for r in _load(out, split)}
    held = [r["image"] for r in _load(out, "eval")]
    assert len(set(held)) == len(held) and not train & set(held)
    train_pixels = {np.asarray(Image.open(out / p)).tobytes() for p in train}
    assert not any(np.asarray(Image.open(out / p)).tobytes() in train_pixels for p in held)


def test_answers_match_the_pixels(out):
    for r in _load(out, "eval"):
        assert analyze(out / r["image"])[r["category"]] == r["answer"], r
    keys = {synthetic.QUESTIONS[c][k] + synthetic.ANSWER_SUFFIX: c for c in synthetic.QUESTIONS for k in range(2)}
    for r in _load(out, "instruct"):
        seen = analyze(out / r["image"])
        turns = r["conversations"]
        for q, a in zip(turns[::2], turns[1::2], strict=True):
            assert seen[keys[q["value"].replace("<image>\n", "")]] == a["value"], r
    for r in _load(out, "pretrain"):
        seen = analyze(out / r["image"])
        caption = r["conversations"][1]["value"]
        assert caption.startswith(f"{seen['count']} {seen['color']} {seen['shape']}") and seen["position"] in caption


def test_deterministic_from_seed(out, tmp_path):
    synthetic.generate(str(tmp_path / "a"), image_size=48, num_pretrain=60, num_instruct=60, num_eval=80, seed=0)
    for split in ("pretrain", "instruct", "eval"):
        assert (tmp_path / "a" / f"{split}.json").read_text() == (out / f"{split}.json").read_text()
    for r in _load(out, "eval")[:10]:
        assert (tmp_path / "a" / r["image"]).read_bytes() == (out / r["image"]).read_bytes()
    synthetic.generate(str(tmp_path / "b"), image_size=48, num_pretrain=60, num_instruct=60, num_eval=80, seed=1)
    assert (tmp_path / "b" / "eval.json").read_text() != (out / "eval.json").read_text()


def test_answer_vocabulary_is_small(out):
    answers = {t["value"] for r in _load(out, "instruct") for t in r["conversations"][1::2]}
    assert answers <= {a for c in synthetic.CHOICES.values() for a in c}
    assert sum(len(c) for c in synthetic.CHOICES.values()) <= 20


def test_feeds_the_pipeline(out):
    tok = load_tokenizer()
    for split, template in (("pretrain", "plain"), ("instruct", "v1"), ("eval", "v1")):
        src = sources.LlavaJsonSource(out / f"{split}.json")
        batches = list(
            pipeline.make_batches(
                src,
                tokenizer=tok,
                template=template,
                image_size=32,
                image_aspect_ratio="pad",
                num_image_tokens=4,
                max_length=192,
                global_batch_size=8,
                seed=0,
                num_epochs=1,
                packing=True,
                worker_count=0,
                on_bad_sample="raise",
                shard_index=0,
                shard_count=1,
            )
        )
        assert sum(int(b["segment_ids"].max(axis=1).sum()) for b in batches) == len(src)


def test_cli(tmp_path, repo_root):
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "llava_jax.data.synthetic",
            "--out",
            str(tmp_path),
            "--image-size",
            "32",
            "--num-pretrain",
            "5",
            "--num-instruct",
            "6",
            "--num-eval",
            "7",
            "--format",
            "jpg",
        ],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert "wrote 5 pretrain, 6 instruct, 7 eval records" in res.stdout
    assert len(list((tmp_path / "images").glob("*.jpg"))) == 18


@pytest.mark.parametrize("questions", [(4, 4), (1, 2)])
def test_questions_per_image(tmp_path, questions):
    synthetic.generate(str(tmp_path), image_size=48, num_pretrain=4, num_instruct=40, num_eval=4, questions=questions)
    counts = set()
    for r in _load(tmp_path, "instruct"):
        asked = [t["value"].removeprefix("<image>\n") for t in r["conversations"][0::2]]
        categories = [
            c for q in asked for c, options in synthetic.QUESTIONS.items() if q.split(" Answer")[0] in options
        ]
        assert len(categories) == len(asked) == len(set(categories))  # each category at most once
        counts.add(len(asked))
    assert counts == set(range(questions[0], questions[1] + 1))
    assert json.loads((tmp_path / "meta.json").read_text())["questions"] == list(questions)


@pytest.mark.parametrize("questions", [(0, 2), (3, 2), (2, 5)])
def test_bad_questions_range_is_refused(tmp_path, questions):
    with pytest.raises(ValueError, match="questions"):
        synthetic.generate(str(tmp_path), num_pretrain=1, num_instruct=1, num_eval=1, questions=questions)
