"""Judge client and LLaVA-Bench review pipeline against a scripted OpenAI-compatible stub."""

from __future__ import annotations

import json

import pytest
from judge_stub import VERSION, serve_stub

from llava_jax.eval import gpt_review, summarize_review
from llava_jax.eval.judge_client import JudgeClient, JudgeError, _RateLimit

RULES = {
    "conv": {"role": "Assistant", "prompt": "Rate them."},
    "detail": {"role": "Assistant", "prompt": "Rate the details."},
    "complex": {"role": "Helper", "prompt": "Rate the reasoning."},
    "llava_bench_conv": {"role": "Assistant", "prompt": "Rate the wild ones."},
}
QUESTIONS = [
    ("What is the dog doing?", "conv", "a.jpg"),
    ("Describe the image.", "detail", "a.jpg"),
    ("Why is it funny?", "complex", "b.jpg"),
    ("Count the cats.", "conv", "b.jpg"),
]


@pytest.mark.parametrize(
    "text, scores",
    [
        ("8 9\nbecause", [8.0, 9.0]),
        ("8,9", [8.0, 9.0]),
        ("8.5 7", [8.5, 7.0]),
        ("8, 9", None),  # the original's rule: ", " becomes two spaces, three parts
        ("Scores: 8 9", None),
        ("", None),
        ("eight nine", None),
        ("8 9 10", None),
    ],
)
def test_parse_score(text, scores):
    assert gpt_review.parse_score(text) == scores


def test_prompt_coco_and_wild():
    coco = {
        "image": "a.jpg",
        "captions": ["cap one", "cap two"],
        "instances": [{"category": "dog", "bbox": [0.1, 0.2, 0.3, 0.4]}, {"category": "cat", "bbox": [0, 0, 1, 1]}],
    }
    text = gpt_review.review_prompt(gpt_review.context_text(coco, "coco"), "Q?", "ref", "mine", RULES["complex"])
    assert text == (
        "[Context]\ncap one\ncap two\n\ndog: [0.1, 0.2, 0.3, 0.4]\ncat: [0, 0, 1, 1]\n\n[Question]\nQ?\n\n"
        "[Helper 1]\nref\n\n[End of Helper 1]\n\n[Helper 2]\nmine\n\n[End of Helper 2]\n\n"
        "[System]\nRate the reasoning.\n\n"
    )
    assert gpt_review.context_text({"caption": "a wild caption"}, "wild") == "a wild caption"
    assert gpt_review.detect_bench([coco]) == "coco" and gpt_review.detect_bench([{"caption": "x"}]) == "wild"


def test_wild_categories_get_the_llava_bench_prefix():
    q = [{"question_id": 3, "image": "w.jpg", "text": "Hi?", "category": "conv"}]
    jobs = gpt_review.build_jobs(
        q,
        [{"image": "w.jpg", "caption": "c"}],
        [{"question_id": 3, "text": "r"}],
        [{"question_id": 3, "text": "m", "answer_id": "z"}],
        RULES,
        "wild",
    )
    assert jobs[0]["record"] == {
        "id": 1,
        "question_id": 3,
        "answer1_id": 3,
        "answer2_id": "z",
        "category": "llava_bench_conv",
    }
    assert jobs[0]["prompt"].endswith("[System]\nRate the wild ones.\n\n")
    with pytest.raises(ValueError, match="llava_bench_detail"):
        gpt_review.build_jobs(
            [{**q[0], "category": "detail"}],
            [{"image": "w.jpg", "caption": "c"}],
            [{"question_id": 3, "text": "r"}],
            [{"question_id": 3, "text": "m"}],
            RULES,
            "wild",
        )


def test_rate_limit_spaces_request_starts():
    slept = []
    limit = _RateLimit(60, clock=lambda: 100.0, sleep=slept.append)
    for _ in range(3):
        limit.wait()
    assert slept == [1.0, 2.0]


def test_retries_give_up_with_a_clear_error():
    slept = []
    with serve_stub({"boom": [(503, "down")]}) as (url, stub):
        client = JudgeClient(url, "judge", retries=2, backoff=1.0, sleep=slept.append)
        with pytest.raises(JudgeError, match="after 3 attempts; last: HTTP 503"):
            client.complete([{"role": "user", "content": "boom"}])
        assert len(stub.requests) == 3
    assert len(slept) == 2 and 0.5 <= slept[0] <= 1.0 and 1.0 <= slept[1] <= 2.0  # exponential with jitter


def _files(tmp_path):
    contexts = [
        {
            "image": "a.jpg",
            "captions": ["A dog runs.", "Grass."],
            "instances": [{"category": "dog", "bbox": [0.1, 0.2, 0.5, 0.9]}],
        },
        {"image": "b.jpg", "captions": ["Two cats."], "instances": []},
    ]
    qs = [{"question_id": i, "image": img, "text": t, "category": c} for i, (t, c, img) in enumerate(QUESTIONS)]
    ref = [{"question_id": i, "text": f"reference {i}", "answer_id": f"r{i}"} for i in range(4)]
    mine = [{"question_id": i, "text": f"model {i}", "answer_id": f"m{i}"} for i in range(4)]
    paths = {}
    for name, rows in (("q", qs), ("c", contexts), ("a1", ref), ("a2", mine)):
        paths[name] = tmp_path / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    paths["r"] = tmp_path / "rule.json"
    paths["r"].write_text(json.dumps(RULES))
    return paths


def test_review_pipeline_retries_failures_cache_and_summary(tmp_path, monkeypatch, capsys):
    script = {
        "What is the dog doing?": [(429, "slow down"), (500, "oops"), ("ok", "7 8\nAssistant 2 is better.")],
        "Describe the image.": [("hang", 8.0), ("ok", "6 9\nfine")],
        "Why is it funny?": [("ok", "I like both."), ("ok", "Both are good."), ("ok", "no scores here")],
        "Count the cats.": [(400, "bad request")],
    }
    p = _files(tmp_path)
    out = tmp_path / "reviews.jsonl"
    argv = [
        "-q",
        str(p["q"]),
        "-c",
        str(p["c"]),
        "-a",
        str(p["a1"]),
        str(p["a2"]),
        "-r",
        str(p["r"]),
        "-o",
        str(out),
        "--judge-model",
        "judge-x",
        "--timeout",
        "3",
        "--retries",
        "3",
    ]
    monkeypatch.setattr("llava_jax.eval.judge_client.time.sleep", lambda s: None)  # no backoff pauses
    with serve_stub(script) as (url, stub):
        monkeypatch.setenv("OPENAI_BASE_URL", url)
        assert gpt_review.main(argv) == 0
        reviews = [json.loads(line) for line in out.read_text().splitlines()]
        assert [r["question_id"] for r in reviews] == [0, 1, 2, 3]
        assert [r["id"] for r in reviews] == [1, 2, 3, 4]
        assert reviews[0]["tuple"] == [7.0, 8.0] and reviews[1]["tuple"] == [6.0, 9.0]
        assert reviews[0]["content"] == "7 8\nAssistant 2 is better."
        assert {
            k: reviews[0][k] for k in ("answer1_id", "answer2_id", "category", "judge_model", "judge_model_version")
        } == {
            "answer1_id": "r0",
            "answer2_id": "m0",
            "category": "conv",
            "judge_model": "judge-x",
            "judge_model_version": VERSION,
        }
        assert reviews[2]["failed"] and reviews[2]["tuple"] == [-1, -1] and reviews[2]["content"] == "no scores here"
        assert reviews[3]["failed"] and reviews[3]["content"].startswith("JUDGE REQUEST FAILED")
        assert "HTTP 400" in reviews[3]["content"]
        assert sum("Why is it funny?" in r for r in stub.requests) == 3  # asked again twice
        assert sum("Count the cats." in r for r in stub.requests) == 1  # a 400 is not retried
        dog = [r for r in stub.requests if "What is the dog doing?" in r]
        assert len(dog) == 3 and dog[0].startswith("[Context]\nA dog runs.\nGrass.\n\ndog: [0.1, 0.2, 0.5, 0.9]\n\n")

        # a rerun skips reviewed questions; from a fresh output, the cache answers all but the failed request
        seen = len(stub.requests)
        assert gpt_review.main(argv) == 0
        assert len(stub.requests) == seen
        first = out.read_text()
        out.unlink()
        assert gpt_review.main(argv) == 0
        assert stub.requests[seen:] == [r for r in stub.requests if "Count the cats." in r][1:]
        assert out.read_text() == first
    capsys.readouterr()
    assert summarize_review.main(["-f", str(out)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "reviews",
        "all 130.8 65.0 85.0",
        "conv 114.3 70.0 80.0",
        "detail 150.0 60.0 90.0",
        "(2 reviews without scores left out of the means)",
        "=================================",
    ]


def test_summarize_original_format(tmp_path, capsys):
    rows = [
        {"id": 1, "question_id": 0, "category": "llava_bench_conv", "tuple": [8, 6]},
        {"id": 2, "question_id": 1, "category": "llava_bench_conv", "tuple": [6, 3]},
        {"id": 3, "question_id": 2, "category": "llava_bench_detail", "tuple": [10, 5]},
        {"id": 4, "question_id": 3, "category": "llava_bench_conv", "tuple": [-1, -1]},
    ]
    path = tmp_path / "gpt4_text_llava-13b.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert summarize_review.main(["-f", str(path)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "llava-13b",
        "all 58.3 80.0 46.7",
        "llava_bench_conv 64.3 70.0 45.0",
        "llava_bench_detail 50.0 100.0 50.0",
        "(1 review without scores left out of the means)",
        "=================================",
    ]
    assert (
        summarize_review.main(["-f", str(path), "-i", "2"]) == 0
    )  # ignore question 2: only the two conv reviews remain
    assert "all 64.3 70.0 45.0" in capsys.readouterr().out
