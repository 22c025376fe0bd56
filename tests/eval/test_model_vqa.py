"""model_vqa: batch invariance, resume after a kill, missing images, the original's answers format."""

from __future__ import annotations

import json

import pytest
from eval_fixtures import shared_checkpoint, write_questions

from llava_jax.eval import model_vqa
from llava_jax.eval.answers import read_answers

N = 12  # questions; 5 has a missing image, 9 a corrupt one


def _run(ckpt, questions, answers, *extra):
    args = model_vqa.parse_args(
        [
            "--model-path",
            str(ckpt),
            "--question-file",
            str(questions),
            "--image-folder",
            str(questions.parent / "images"),
            "--answers-file",
            str(answers),
            "--temperature",
            "0",
            "--max_new_tokens",
            "10",
            *extra,
        ]
    )
    return model_vqa.run(args)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vqa")
    ckpt = shared_checkpoint(tmp_path_factory)
    questions = write_questions(folder, N, missing=(5,), corrupt=(9,))
    return ckpt, questions, folder


def test_batch_invariant_greedy_answers(setup):
    ckpt, questions, folder = setup
    _run(ckpt, questions, folder / "b1.jsonl", "--batch-size", "1")
    _run(ckpt, questions, folder / "b16.jsonl", "--batch-size", "16")
    one, sixteen = read_answers(folder / "b1.jsonl"), read_answers(folder / "b16.jsonl")
    assert [r["question_id"] for r in one] == list(range(N))
    assert [r["text"] for r in one] == [r["text"] for r in sixteen]
    assert one == sixteen  # answer ids are deterministic too
    assert sum(bool(r["text"]) for r in one) >= N // 2  # the random model does say something


def test_answers_format_and_recorded_image_errors(setup):
    ckpt, questions, folder = setup
    answers = folder / "fmt.jsonl"
    counts = _run(ckpt, questions, answers, "--batch-size", "4")
    rows = read_answers(answers)
    assert counts["errors"] == 2 and counts["answered"] == N - 2
    for r in rows:
        assert list(r) == ["question_id", "prompt", "text", "answer_id", "model_id", "metadata"]
        assert r["model_id"] == "tiny_llava_stage2" or r["model_id"].endswith("_stage2")
    source = [json.loads(line) for line in questions.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [q["text"] for q in source]  # the original's cur_prompt
    assert "absent.png" in rows[5]["metadata"]["error"] and rows[5]["text"] == ""
    assert "broken.png" in rows[9]["metadata"]["error"]
    assert all("error" not in r["metadata"] for i, r in enumerate(rows) if i not in (5, 9))


def test_resume_after_a_torn_write(setup):
    ckpt, questions, folder = setup
    full = folder / "b16.jsonl"
    if not full.exists():
        _run(ckpt, questions, full, "--batch-size", "16")
    reference = full.read_text().splitlines(keepends=True)
    partial = folder / "resumed.jsonl"
    # 7 complete lines, then half a line: what a kill in the middle of a write leaves
    partial.write_text("".join(reference[:7]) + reference[7][: len(reference[7]) // 2])
    counts = _run(ckpt, questions, partial, "--batch-size", "4")
    assert counts["skipped"] == 7 and counts["answered"] + counts["errors"] == N - 7
    assert partial.read_text() == full.read_text()
    again = _run(ckpt, questions, partial, "--batch-size", "4")
    assert again["answered"] == 0 and again["skipped"] == N
