"""GPT-4 ensembles on a hand-built split; expected choices and counts worked out by hand."""

from __future__ import annotations

import json

import pytest
from judge_stub import VERSION, serve_stub

from llava_jax.eval import science_qa_gpt4


def _problem(n, answer, pid):
    return {
        "subject": "natural science",
        "hint": "",
        "image": None,
        "grade": "grade4",
        "choices": [f"c{i}" for i in range(n)],
        "answer": answer,
        "question": f"Which is p{pid}?",
    }


PROBLEMS = {
    "1": _problem(3, 1, 1),
    "2": _problem(2, 0, 2),
    "3": _problem(4, 2, 3),
    "4": _problem(2, 1, 4),
    "5": _problem(2, 0, 5),
}
OURS = {"1": "The answer is B.", "2": "A", "3": "B", "4": "B"}  # 5: no answer line
GPT4 = {
    "1": "The answer is B.",
    "2": "Hmm, unclear.",
    "3": "The answer is C.",
    "4": "The answer is A.",
    "5": "The answer is A.",
}
REQUERY = {
    "Which is p2?": "The answer is A.",
    "Which is p3?": "I cannot tell.",
    "Which is p4?": "The answer is B.",
    "Which is p5?": "The answer is B.",
}


@pytest.fixture
def files(tmp_path):
    (tmp_path / "problems.json").write_text(json.dumps(PROBLEMS))
    (tmp_path / "pid_splits.json").write_text(json.dumps({"test": list(PROBLEMS)}))
    (tmp_path / "ours.jsonl").write_text(
        "".join(
            json.dumps({"question_id": pid, "prompt": f"Question: Which is p{pid}?\nOptions: ...", "text": t}) + "\n"
            for pid, t in OURS.items()
        )
    )
    (tmp_path / "gpt4.json").write_text(json.dumps({"acc": 0, "outputs": GPT4}))
    return tmp_path


def _argv(d, mode, *extra):
    return [
        "--mode",
        mode,
        "--base-dir",
        str(d),
        "--gpt4-result",
        str(d / "gpt4.json"),
        "--our-result",
        str(d / "ours.jsonl"),
        "--output-result",
        str(d / f"{mode}.json"),
        *extra,
    ]


def test_complement(files, capsys):
    assert science_qa_gpt4.main(_argv(files, "complement")) == 0
    out = capsys.readouterr().out
    assert "Our-Correct: 3, Accuracy: 60.00%" in out and "GPT-4-Correct: 3, Accuracy: 60.00%" in out
    assert "GPT-4 NO-ANS: 1, Percentage: 20.00%" in out
    assert "Ensemble (complement)-Correct: 4, Accuracy: 80.00%" in out and "Correct upper: 5, Accuracy: 100.00%" in out
    result = json.loads((files / "complement.json").read_text())
    assert result["results"] == {"1": 1, "2": 0, "3": 2, "4": 0, "5": 0} and result["correct"] == 4


def test_judge_requeries_disagreements_once(files, capsys, monkeypatch):
    script = {marker: [("ok", text)] for marker, text in REQUERY.items()}
    with serve_stub(script) as (url, stub):
        monkeypatch.setenv("OPENAI_BASE_URL", url)
        argv = _argv(files, "judge", "--requery-result", str(files / "requery.jsonl"), "--judge-model", "j")
        assert science_qa_gpt4.main(argv) == 0
        assert sorted(r.split("\n")[0] for r in stub.requests) == [
            "Question: Which is p2?",
            "Question: Which is p3?",
            "Question: Which is p4?",
            "Which is p5?",
        ]
        prompt = next(r for r in stub.requests if "p4?" in r)
        assert "Answer 1:\nThe answer is A.\n\nAnswer 2:\nB\n\n" in prompt
        out = capsys.readouterr().out
        assert "Re-queried: 4 (1 without a parsable answer)" in out
        assert "Ensemble (judge)-Correct: 3, Accuracy: 60.00%" in out
        result = json.loads((files / "judge.json").read_text())
        assert result["results"] == {"1": 1, "2": 0, "3": 1, "4": 1, "5": 1}
        requery = [json.loads(line) for line in (files / "requery.jsonl").read_text().splitlines()]
        assert {r["question_id"] for r in requery} == {"2", "3", "4", "5"}
        assert all(r["judge_model_version"] == VERSION for r in requery)
        asked = len(stub.requests)
        assert science_qa_gpt4.main(argv) == 0  # a rerun reads the re-query file and asks nothing
        assert len(stub.requests) == asked


def test_judge_reads_an_original_requery_file(files, capsys):
    (files / "requery.jsonl").write_text(
        "".join(
            json.dumps({"question_id": pid, "text": t}) + "\n"
            for pid, t in {"2": "x", "3": "The answer is C.", "4": "y", "5": "z"}.items()
        )
    )
    assert (
        science_qa_gpt4.main(
            _argv(
                files,
                "judge",
                "--requery-result",
                str(files / "requery.jsonl"),
                "--judge-model",
                "j",
                "--base-url",
                "http://127.0.0.1:9/v1",
            )
        )
        == 0
    )
    # 2: ours A (right); 3: re-query C (right); 4: ours B (right); 5: ours missing (wrong)
    assert "Ensemble (judge)-Correct: 4, Accuracy: 80.00%" in capsys.readouterr().out
