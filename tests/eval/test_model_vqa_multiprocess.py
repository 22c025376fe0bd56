"""model_vqa sharded over 2 processes x 2 CPU devices (gloo) gives the file a 1-process run gives."""

from __future__ import annotations

import os
import pathlib
import subprocess

import pytest
from eval_fixtures import write_questions
from serving_fixtures import write_tiny_checkpoint

REPO = pathlib.Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch" / "local_multiprocess.sh"


def _answer(nproc: int, ckpt, questions, answers, logs):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["LOG_DIR"] = str(logs)
    cmd = [
        "bash",
        str(LAUNCH),
        str(nproc),
        "2",
        "python",
        "-m",
        "llava_jax.eval.model_vqa",
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
        "8",
        "--batch-size",
        "4",
    ]
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=900, cwd=REPO)
    text = "".join((logs / f"process_{i}.log").read_text() for i in range(nproc))
    assert proc.returncode == 0, text[-4000:]
    return text


@pytest.mark.slow
def test_two_processes_write_the_one_process_file(tmp_path):
    ckpt = write_tiny_checkpoint(tmp_path / "tiny" / "stage2")
    questions = write_questions(tmp_path, 11, missing=(4,))
    _answer(1, ckpt, questions, tmp_path / "one.jsonl", tmp_path / "logs1")
    logs = _answer(2, ckpt, questions, tmp_path / "two.jsonl", tmp_path / "logs2")
    assert "(process 0 of 2)" in logs
    assert (tmp_path / "two.jsonl").read_text() == (tmp_path / "one.jsonl").read_text()
    assert len((tmp_path / "one.jsonl").read_text().splitlines()) == 11
    assert not list(tmp_path.glob("two.jsonl.part-*"))
