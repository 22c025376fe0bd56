"""The dataset checker: one sample per reason, agreement with the training pipeline, exit codes."""

import json

import numpy as np
import pytest
from PIL import Image

from llava_jax.data import check
from llava_jax.data.errors import BadSample
from llava_jax.data.pipeline import PrepareSample
from llava_jax.data.sources import LlavaJsonSource
from llava_jax.data.tokenizer import load_tokenizer

TOKENS = 4  # image tokens per image (--image-size 28 --patch-size 14)


def _turns(*values):
    return [{"from": ("human", "gpt")[i % 2], "value": v} for i, v in enumerate(values)]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(autouse=True)
def _shared_tokenizer(monkeypatch, tokenizer):
    """main() loads the tokenizer; reuse the module's (loading takes seconds)."""
    monkeypatch.setattr("llava_jax.data.tokenizer.load_tokenizer", lambda path=None: tokenizer)


@pytest.fixture
def dataset(tmp_path):
    Image.fromarray(np.full((40, 30, 3), 200, np.uint8)).save(tmp_path / "ok.png")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "junk.jpg").write_bytes(b"this is not an image at all")
    png = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(png[: len(png) // 2])
    long_answer = "word " * 300
    records = [
        {
            "id": "good",
            "image": "ok.png",
            "conversations": _turns("<image>\nWhat?", "A grey square."),
        },
        {"id": "text_only", "conversations": _turns("Hi", "Hello.")},
        {
            "id": "missing",
            "image": "nope.png",
            "conversations": _turns("<image>\nWhat?", "A."),
        },
        {
            "id": "empty_file",
            "image": "empty.jpg",
            "conversations": _turns("<image>\nWhat?", "A."),
        },
        {
            "id": "junk",
            "image": "junk.jpg",
            "conversations": _turns("<image>\nWhat?", "A."),
        },
        {
            "id": "no_placeholder",
            "image": "ok.png",
            "conversations": _turns("What?", "A."),
        },
        {
            "id": "two_placeholders",
            "image": "ok.png",
            "conversations": _turns("<image>\n<image> What?", "A."),
        },
        {
            "id": "roles",
            "image": "ok.png",
            "conversations": [
                {"from": "gpt", "value": "<image>\nX"},
                {"from": "human", "value": "Y"},
            ],
        },
        {
            "id": "empty_turn",
            "image": "ok.png",
            "conversations": _turns("<image>\nWhat?", "  "),
        },
        {
            "id": "no_reply",
            "image": "ok.png",
            "conversations": _turns("<image>\nWhat?"),
        },
        {
            "id": "cut",
            "image": "ok.png",
            "conversations": _turns("<image>\nWhat?", long_answer),
        },
        {
            "id": "no_target_left",
            "image": "ok.png",
            "conversations": _turns("<image>\n" + "word " * 60, "A.", "Q2", "B."),
        },
        {
            "id": "bad_record",
            "image": ["a.png", "b.png"],
            "conversations": _turns("<image>\nX", "Y"),
        },
        "not an object",
    ]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    return path, tmp_path


EXPECTED = {
    "missing": "missing_image",
    "empty_file": "unreadable_image",
    "junk": "unreadable_image",
    "no_placeholder": "placeholder_mismatch",
    "two_placeholders": "placeholder_mismatch",
    "roles": "bad_roles",
    "empty_turn": "empty_turn",
    "no_reply": "no_target_token",
    "cut": "text_cut",
    "no_target_left": "no_target_token",
    "bad_record": "malformed_record",
    13: "malformed_record",
}


def test_reports_each_reason_and_exits_nonzero(dataset, capsys):
    path, folder = dataset
    report = folder / "bad.jsonl"
    argv = [
        str(path),
        "--image-folder",
        str(folder),
        "--template",
        "v1",
        "--max-length",
        "64",
        "--image-size",
        "28",
        "--workers",
        "2",
        "--report",
        str(report),
        "--no-progress",
    ]
    assert check.main(argv) == 1
    rows = [json.loads(x) for x in report.read_text().splitlines()]
    got = {r["id"]: r["reason"] for r in rows}
    assert got == EXPECTED
    out = capsys.readouterr().out
    assert "checked 14 samples" in out and "would fail under on_bad_sample=raise" in out
    assert "missing_image" in out and "text_cut" in out and "token lengths" in out


def test_agrees_with_the_training_pipeline(dataset, tokenizer):
    """Samples flagged to fail are exactly those the pipeline's PrepareSample raises BadSample for."""
    path, folder = dataset
    result = check.run_checks(
        str(path),
        str(folder),
        template="v1",
        tokenizer=tokenizer,
        max_length=64,
        num_image_tokens=TOKENS,
        image_mode="decode",
        workers=1,
        progress=False,
    )
    flagged = {i for i, _, reason, _ in result["bad"] if reason in check.FAIL_REASONS}
    prepare = PrepareSample(
        tokenizer=tokenizer,
        template="v1",
        image_size=28,
        image_aspect_ratio="pad",
        num_image_tokens=TOKENS,
        max_length=64,
        on_bad_sample="raise",
    )
    source = LlavaJsonSource(path, folder)
    raised = set()
    for i in range(len(source)):
        try:
            sample = prepare.prepare(source[i])
        except BadSample:
            raised.add(i)
            continue
        n = result["lengths"][i]
        assert len(sample["input_ids"]) == min(n, 64)  # lengths are the pipeline's, before the cut
    assert flagged == raised
    assert 10 not in raised and (10, "cut", "text_cut") in {b[:3] for b in result["bad"]}  # trains, cut


def test_truncated_image_needs_decode_mode(dataset, tokenizer):
    path, folder = dataset
    path.write_text(
        json.dumps(
            [
                {
                    "id": "t",
                    "image": "truncated.png",
                    "conversations": _turns("<image>\nQ", "A."),
                }
            ]
        )
    )
    kw = {
        "template": "v1",
        "tokenizer": tokenizer,
        "max_length": 64,
        "num_image_tokens": TOKENS,
        "workers": 1,
        "progress": False,
    }
    assert check.run_checks(str(path), str(folder), image_mode="header", **kw)["bad"] == []
    (bad,) = check.run_checks(str(path), str(folder), image_mode="decode", **kw)["bad"]
    assert bad[2] == "unreadable_image" and "truncated.png" in bad[3]


def test_clean_data_exits_zero_and_strict_flags_cuts(dataset):
    path, folder = dataset
    good = [
        {
            "id": f"g{i}",
            "image": "ok.png",
            "conversations": _turns("<image>\nWhat?", "A grey square " * i),
        }
        for i in range(1, 30)
    ]
    path.write_text(json.dumps(good))
    argv = [
        str(path),
        "--image-folder",
        str(folder),
        "--image-size",
        "28",
        "--workers",
        "2",
        "--no-progress",
    ]
    assert check.main(argv + ["--max-length", "512"]) == 0
    assert check.main(argv + ["--max-length", "64"]) == 0  # cut, trained, not an error
    assert check.main(argv + ["--max-length", "64", "--strict"]) == 2
    report = folder / "r.jsonl"
    # the v1 system prompt alone is longer than 16 tokens: the image cannot fit
    assert check.main(argv + ["--max-length", "16", "--report", str(report)]) == 1
    assert {json.loads(x)["reason"] for x in report.read_text().splitlines()} == {"image_past_max_length"}
