"""ScienceQA -> LLaVA conversion, with expected texts written out from the original prompt formats."""

import json
import subprocess
import sys

import pytest

from llava_jax.data.scienceqa import convert, convert_files, main, problem_texts, split_format

PROBLEMS = {
    "11": {
        "question": "Which tense does the sentence use?\nMona will print her name with care.",
        "choices": ["present tense", "future tense", "past tense"],
        "answer": 1,
        "hint": "",
        "image": None,
        "lecture": "Present tense verbs tell you about something that is happening now.\nFuture tense verbs tell you about something that is going to happen.",
        "solution": "The sentence is in future tense. You can tell because it uses will before the main verb, print.",
        "subject": "language science",
        "grade": "grade2",
    },
    "25": {
        "question": "Which of these states is farthest north?",
        "choices": ["West Virginia", "Louisiana", "Arizona", "Oklahoma"],
        "answer": 0,
        "hint": "Figure: the map.  ",
        "image": "image.png",
        "lecture": "Maps have four cardinal directions, or main directions.",
        "solution": "To find the answer, look at the compass rose.  West Virginia is farthest north.",
        "subject": "social science",
        "grade": "grade5",
    },
    "40": {
        "question": "What does the picture show?",
        "choices": ["a magnet", "a rock"],
        "answer": 1,
        "hint": "",
        "image": "image.png",
        "lecture": "",
        "solution": "",
        "subject": "natural science",
        "grade": "grade3",
    },
}
SPLITS = {"train": ["25", "11"], "test": ["40"]}


def test_qcm_lea():
    records = convert(PROBLEMS, SPLITS["train"], "QCM-LEA")
    assert records == [
        {
            "id": "25",
            "image": "25/image.png",
            "conversations": [
                {
                    "from": "human",
                    "value": "Which of these states is farthest north?\nContext: Figure: the map.\n"
                    "Options: (A) West Virginia (B) Louisiana (C) Arizona (D) Oklahoma\n<image>",
                },
                {
                    "from": "gpt",
                    "value": "Maps have four cardinal directions, or main directions. To find the answer, look at "
                    "the compass rose. West Virginia is farthest north. The answer is A.",
                },
            ],
        },
        {
            "id": "11",
            "conversations": [
                {
                    "from": "human",
                    "value": "Which tense does the sentence use?\nMona will print her name with care.\nContext: N/A\n"
                    "Options: (A) present tense (B) future tense (C) past tense",
                },
                {
                    "from": "gpt",
                    "value": "Present tense verbs tell you about something that is happening now.\nFuture tense "
                    "verbs tell you about something that is going to happen. The sentence is in future tense. "
                    "You can tell because it uses will before the main verb, print. The answer is B.",
                },
            ],
        },
    ]
    assert list(records[0]) == ["id", "image", "conversations"]


def test_other_formats():
    assert problem_texts("11", PROBLEMS["11"], "QCM-A")[1] == "The answer is B."
    assert problem_texts("40", PROBLEMS["40"], "QCM-A") == (
        "What does the picture show?\nContext: N/A\nOptions: (A) a magnet (B) a rock",
        "The answer is B.",
    )
    assert problem_texts("11", PROBLEMS["11"], "QCM-LEPA")[1] == (
        "LECTURE: Present tense verbs tell you about something that is happening now.\nFuture tense verbs tell "
        "you about something that is going to happen.\nSOLUTION: The sentence is in future tense. You can tell "
        "because it uses will before the main verb, print.\n###\nANSWER: B."
    )
    assert problem_texts("40", PROBLEMS["40"], "QCM-LEPA")[1] == "###\nANSWER: B."
    # no lecture or solution: "Answer:   The answer..." loses one of its three spaces to the single
    # double-space replacement and then "Answer: ", leaving a leading space, as in the original
    assert problem_texts("40", PROBLEMS["40"], "QCM-LEA")[1] == " The answer is B."
    # CQM keeps the "Question: " label (it does not start the input)
    assert problem_texts("40", PROBLEMS["40"], "CQM-A")[0] == (
        "Context: N/A\nQuestion: What does the picture show?\nOptions: (A) a magnet (B) a rock"
    )
    # an empty BECAUSE: at the end is dropped
    assert problem_texts("40", PROBLEMS["40"], "QCML-A")[0] == (
        "What does the picture show?\nContext: N/A\nOptions: (A) a magnet (B) a rock"
    )
    assert problem_texts("40", PROBLEMS["40"], "QCM-AE")[1] == "The answer is B."
    assert problem_texts("11", PROBLEMS["11"], "QCM-AL")[1].startswith("The answer is B. BECAUSE: The sentence is")


def test_bad_formats_and_problems():
    assert split_format("QCM-LEA") == ("QCM", "LEA")
    for bad in ["QCM", "QCM-XYZ", "QMC-A", "QCM-A-B"]:
        with pytest.raises(ValueError, match="unknown ScienceQA format"):
            split_format(bad)
    with pytest.raises(KeyError, match="99"):
        convert(PROBLEMS, ["99"], "QCM-A")
    broken = dict(PROBLEMS["40"], answer=5)
    with pytest.raises(ValueError, match="answer index 5"):
        convert({"40": broken}, ["40"], "QCM-A")


def test_cli(tmp_path):
    (tmp_path / "problems.json").write_text(json.dumps(PROBLEMS))
    (tmp_path / "pid_splits.json").write_text(json.dumps(SPLITS))
    out = tmp_path / "out.json"
    args = [
        "--problems",
        str(tmp_path / "problems.json"),
        "--splits",
        str(tmp_path / "pid_splits.json"),
        "--split",
        "test",
        "--format",
        "QCM-LEPA",
        "--out",
        str(out),
        "--image-prefix",
        "test",
    ]
    assert main(args) == 0
    records = json.loads(out.read_text())
    assert records == convert(PROBLEMS, ["40"], "QCM-LEPA", image_prefix="test")
    assert records[0]["image"] == "test/40/image.png"
    assert records[0]["conversations"][0]["value"].endswith("(B) a rock\n<image>")
    assert (
        convert_files(str(tmp_path / "problems.json"), str(tmp_path / "pid_splits.json"), "train", "QCM-A")[1]["id"]
        == "11"
    )
    with pytest.raises(SystemExit):
        main(args[:5] + ["--split", "nope", "--out", str(out)])
    # the module runs as a program
    run = subprocess.run(
        [sys.executable, "-m", "llava_jax.data.scienceqa", *args[:6], "--format", "QCM-A", "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert "1 samples (1 with an image)" in run.stderr
    assert json.loads(out.read_text())[0]["conversations"][1]["value"] == "The answer is B."
