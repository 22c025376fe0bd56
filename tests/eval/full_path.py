"""The whole evaluation path on one model: answer a ScienceQA-style file and a LLaVA-Bench-style file,
score the first, review the second with ``python -m llava_jax.serve`` (the same model) as the judge,
and summarize. Used by the slow end-to-end test; also runnable on any model:

    python tests/eval/full_path.py MODEL_PATH WORKDIR
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

import httpx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "inference"))
from eval_fixtures import png_bytes, write_questions
from serving_fixtures import free_port

RULES = {
    c: {
        "role": "Assistant",
        "prompt": "Rate the two answers from 1 to 10. Output the two scores on the first "
        "line, separated by a space, then explain.",
    }
    for c in ("conv", "detail", "complex")
}


def scienceqa_files(folder: pathlib.Path, n: int = 6) -> pathlib.Path:
    """problems.json + pid_splits.json + images for n problems (every other one with an image)."""
    folder.mkdir(parents=True, exist_ok=True)
    problems = {}
    for i in range(n):
        pid = str(100 + i)
        image = "image.png" if i % 2 == 0 else None
        if image:
            (folder / "images" / pid).mkdir(parents=True, exist_ok=True)
            (folder / "images" / pid / image).write_bytes(png_bytes(50, 40, seed=i))
        problems[pid] = {
            "question": f"Which shape is number {i}?",
            "choices": ["circle", "square", "star"][: 2 + i % 2],
            "answer": i % 2,
            "hint": "Look closely." if i % 3 == 0 else "",
            "image": image,
            "subject": ["natural science", "social science", "language science"][i % 3],
            "grade": f"grade{1 + 2 * i}",
            "lecture": "",
            "solution": "",
            "task": "closed choice",
        }
    (folder / "problems.json").write_text(json.dumps(problems))
    (folder / "pid_splits.json").write_text(json.dumps({"test": list(problems)}))
    return folder


def run(argv: list[str]) -> None:
    print("$", " ".join(argv), flush=True)
    subprocess.run([sys.executable, "-m", *argv], check=True, timeout=1800)


def full_path(model: str, work: pathlib.Path, *, batch_size: int = 4, max_new_tokens: int = 16) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    sqa = scienceqa_files(work / "scienceqa")
    run(
        [
            "llava_jax.data.scienceqa",
            "--problems",
            str(sqa / "problems.json"),
            "--splits",
            str(sqa / "pid_splits.json"),
            "--split",
            "test",
            "--format",
            "CQM-A",
            "--out",
            str(work / "llava_test_CQM-A.json"),
        ]
    )
    run(
        [
            "llava_jax.eval.model_vqa",
            "--science",
            "--model-path",
            model,
            "--question-file",
            str(work / "llava_test_CQM-A.json"),
            "--image-folder",
            str(sqa / "images"),
            "--answers-file",
            str(work / "sqa_answers.jsonl"),
            "--single-pred-prompt",
            "--temperature",
            "0",
            "--batch-size",
            str(batch_size),
            "--max_new_tokens",
            str(max_new_tokens),
        ]
    )
    run(
        [
            "llava_jax.eval.science_qa",
            "--base-dir",
            str(sqa),
            "--result-file",
            str(work / "sqa_answers.jsonl"),
            "--output-file",
            str(work / "sqa_output.json"),
            "--output-result",
            str(work / "sqa_result.json"),
        ]
    )

    bench = work / "bench"
    questions = write_questions(bench, 6)
    contexts = [
        {
            "image": f"img{k}.png",
            "captions": [f"Picture {k}.", "Random pixels."],
            "instances": [{"category": "blob", "bbox": [0.1, 0.1, 0.5, 0.5]}],
        }
        for k in range(4)
    ]
    (bench / "context.jsonl").write_text("".join(json.dumps(c) + "\n" for c in contexts))
    refs = [{"question_id": i, "text": "A reference answer.", "answer_id": f"ref{i}"} for i in range(6)]
    (bench / "reference.jsonl").write_text("".join(json.dumps(r) + "\n" for r in refs))
    (bench / "rule.json").write_text(json.dumps(RULES))
    run(
        [
            "llava_jax.eval.model_vqa",
            "--model-path",
            model,
            "--question-file",
            str(questions),
            "--image-folder",
            str(bench / "images"),
            "--answers-file",
            str(bench / "answers.jsonl"),
            "--temperature",
            "0",
            "--batch-size",
            str(batch_size),
            "--max_new_tokens",
            str(max_new_tokens),
        ]
    )

    port = free_port()
    env = {**os.environ, "OPENAI_API_KEY": "unused"}
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llava_jax.serve",
            "--checkpoint",
            model,
            "--port",
            str(port),
            "--model-name",
            "judge-under-test",
        ],
        env=env,
    )
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the judge server did not come up")
            time.sleep(1)
        run(
            [
                "llava_jax.eval.gpt_review",
                "-q",
                str(questions),
                "-c",
                str(bench / "context.jsonl"),
                "-a",
                str(bench / "reference.jsonl"),
                str(bench / "answers.jsonl"),
                "-r",
                str(bench / "rule.json"),
                "-o",
                str(bench / "reviews.jsonl"),
                "--judge-model",
                "judge-under-test",
                "--base-url",
                f"http://127.0.0.1:{port}/v1",
                "--max-tokens",
                "16",
                "--parse-retries",
                "1",
                "--timeout",
                "300",
            ]
        )
    finally:
        server.terminate()
        server.wait(timeout=60)
    run(["llava_jax.eval.summarize_review", "-f", str(bench / "reviews.jsonl")])
    return {
        "sqa_result": json.loads((work / "sqa_result.json").read_text()),
        "reviews": [json.loads(line) for line in (bench / "reviews.jsonl").read_text().splitlines()],
        "bench_answers": [json.loads(line) for line in (bench / "answers.jsonl").read_text().splitlines()],
    }


if __name__ == "__main__":
    out = full_path(sys.argv[1], pathlib.Path(sys.argv[2]))
    print(
        json.dumps(
            {
                "sqa_acc": out["sqa_result"]["acc"],
                "reviews": len(out["reviews"]),
                "failed_reviews": sum(bool(r.get("failed")) for r in out["reviews"]),
            }
        )
    )
