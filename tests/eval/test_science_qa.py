"""ScienceQA scorer on a hand-built split; every expected number below is worked out by hand."""

from __future__ import annotations

import json
import random

import pytest

from llava_jax.eval import science_qa
from llava_jax.eval.science_qa import FAILED, choice_index, parse_answer


@pytest.mark.parametrize(
    "text, letter",
    [
        ("A", "A"),
        ("E", "E"),
        ("F", FAILED),  # not an option letter, too short for the other rules
        ("C. because ferns", "C"),  # letter + ". " prefix
        ("C.because", FAILED),
        ("B.", FAILED),
        ("The answer is D.", "D"),
        ("so The answer is B, clearly", "B"),  # the original's pattern: its dot matches any character
        ("The answer is B", FAILED),  # nothing after the letter
        ("The answer is A. Also, The answer is A.", FAILED),  # must occur exactly once
        ("The answer is F.", "F"),
        ("", FAILED),
        ("b", FAILED),
    ],
)
def test_parse_answer(text, letter):
    assert parse_answer(text) == letter


def test_choice_index():
    assert choice_index("B", 3) == 1
    assert choice_index("D", 3) == -1  # beyond the problem's choices
    assert choice_index(FAILED, 2) == -1
    rng, ref = random.Random(3), random.Random(3)
    assert [choice_index(FAILED, 4, rng=rng) for _ in range(5)] == [ref.randrange(4) for _ in range(5)]


def _problem(subject, hint, image, grade, n, answer):
    return {
        "subject": subject,
        "hint": hint,
        "image": image,
        "grade": f"grade{grade}",
        "choices": [f"c{i}" for i in range(n)],
        "answer": answer,
        "question": "q",
    }


PROBLEMS = {
    "1": _problem("natural science", "", "image.png", 3, 3, 1),
    "2": _problem("social science", "a context", None, 8, 2, 0),
    "3": _problem("language science", "", None, 10, 4, 2),
    "4": _problem("natural science", "hint", "image.png", 5, 2, 0),
    "5": _problem("social science", "", None, 12, 2, 1),
    "6": _problem("natural science", "", None, 7, 3, 0),
    "7": _problem("language science", "", "image.png", 1, 2, 1),
    "8": _problem("natural science", "", None, 2, 2, 0),  # train split
}
ANSWERS = [  # (pid, prompt has an image, text); pid 6 has no answer line
    ("1", True, "B"),  # exact letter: right
    ("2", False, "A. a context"),  # prefix: right
    ("3", False, "Ferns make spores. The answer is C."),  # pattern: right
    ("4", True, "The answer is A. The answer is B."),  # two matches: FAILED
    ("5", False, "C"),  # a letter beyond the 2 choices: wrong
    ("7", True, "B."),  # FAILED
    ("8", False, "A"),  # not in the test split: ignored
]


@pytest.fixture
def base(tmp_path):
    (tmp_path / "problems.json").write_text(json.dumps(PROBLEMS))
    (tmp_path / "pid_splits.json").write_text(json.dumps({"test": ["1", "2", "3", "4", "5", "6", "7"], "train": ["8"]}))
    lines = [
        {
            "question_id": pid,
            "prompt": ("<image>\n" if img else "") + "Question: q",
            "text": text,
            "answer_id": f"a{pid}",
            "model_id": "m",
            "metadata": {},
        }
        for pid, img, text in ANSWERS
    ]
    (tmp_path / "answers.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return tmp_path


def test_scores_files_and_table(base, capsys):
    out = base / "out"
    assert (
        science_qa.main(
            [
                "--base-dir",
                str(base),
                "--result-file",
                str(base / "answers.jsonl"),
                "--output-file",
                str(out / "o.json"),
                "--output-result",
                str(out / "r.json"),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "Total: 7, Correct: 3, Accuracy: 42.86%, IMG-Accuracy: 33.33%" in printed
    assert "| NAT | SOC | LAN | TXT | IMG | NO | G1-6 | G7-12 | Avg |" in printed
    assert "| 33.33 | 50.00 | 50.00 | 50.00 | 33.33 | 33.33 | 33.33 | 50.00 | 42.86 |" in printed
    result = json.loads((out / "r.json").read_text())
    assert result["correct"] == 3 and result["count"] == 7 and result["acc"] == pytest.approx(300 / 7)
    assert result["results"] == {"1": 1, "2": 0, "3": 2, "4": -1, "5": -1, "6": -1, "7": -1}
    assert result["outputs"]["6"] == FAILED and result["outputs"]["3"] == "Ferns make spores. The answer is C."
    analysis = json.loads((out / "o.json").read_text())
    assert [a["question_id"] for a in analysis["correct"]] == ["1", "2", "3"]
    assert [a["parsed_ans"] for a in analysis["incorrect"]] == [FAILED, "C", FAILED, FAILED]
    assert analysis["incorrect"][2] == {
        "question_id": "6",
        "parsed_ans": FAILED,
        "ground_truth": "A",
        "question": "Unknown",
        "pred": FAILED,
        "is_multimodal": False,
    }
    rows = json.loads((out / "r_table.json").read_text())
    assert {c: (rows[c]["correct"], rows[c]["count"]) for c in rows} == {
        "NAT": (1, 3),
        "SOC": (1, 2),
        "LAN": (1, 2),
        "TXT": (1, 2),
        "IMG": (1, 3),
        "NO": (1, 3),
        "G1-6": (1, 3),
        "G7-12": (2, 4),
        "Avg": (3, 7),
    }


def test_failed_random_is_seeded(base):
    problems = science_qa.load_split(base, "test")
    preds = science_qa.read_predictions(base / "answers.jsonl")
    _, sqa, _ = science_qa.score(problems, preds, failed="random", seed=7)
    rng = random.Random(7)  # draws in split order for pids 4 (2 choices), 5 (2), 6 (3), 7 (2)
    drawn = {"4": rng.randrange(2), "5": rng.randrange(2), "6": rng.randrange(3), "7": rng.randrange(2)}
    assert sqa["results"] == {"1": 1, "2": 0, "3": 2, **drawn}
    answers = {"4": 0, "5": 1, "6": 0, "7": 1}
    assert sqa["correct"] == 3 + sum(drawn[p] == answers[p] for p in drawn)
    _, again, _ = science_qa.score(problems, preds, failed="random", seed=7)
    assert again == sqa


def test_bad_base_dir_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="problems.json"):
        science_qa.load_split(tmp_path, "test")
