"""Generation against `python -m llava_jax.serve` (a real OpenAI-compatible endpoint, tiny random model)."""

import contextlib
import json
import subprocess
import sys
import time

import httpx
import pytest
from inference.serving_fixtures import (
    free_port,
    shared_checkpoint,
)  # tests/ is on sys.path

from llava_jax.datagen import build, generate
from llava_jax.datagen.rawlog import read_raw

pytestmark = pytest.mark.slow


def _prompt_folder(root):
    """Short prompts: the tiny model's context is 1024 tokens."""
    for folder in ("conversation", "detail_description", "complex_reasoning"):
        d = root / folder
        d.mkdir(parents=True)
        (d / "system_message.txt").write_text("You describe images from captions.")
        (d / "000_caps.txt").write_text("A dog on grass.")
        (d / "000_conv.txt").write_text("Question:\nWhat animal is it?\n===\nAnswer:\nA dog.")
    return root


@contextlib.contextmanager
def serve_process(checkpoint, tmp_path):
    """`python -m llava_jax.serve` in a subprocess; yields its base URL once /health answers."""
    port = free_port()
    log_path = tmp_path / "serve.log"
    cmd = [
        sys.executable,
        "-m",
        "llava_jax.serve",
        "--checkpoint",
        str(checkpoint),
        "--port",
        str(port),
        "--model-name",
        "tiny-llava",
        "--max-batch",
        "4",
        "--batch-wait-ms",
        "20",
    ]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 600
            while True:
                assert proc.poll() is None, log_path.read_text()[-3000:]
                assert time.monotonic() < deadline, "server did not start"
                try:
                    if httpx.get(url + "/health", timeout=5).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.5)
            yield url
        finally:
            proc.terminate()
            proc.wait(timeout=60)


def test_generate_and_build_against_llava_jax_serve(tmp_path, tmp_path_factory):
    checkpoint = shared_checkpoint(tmp_path_factory)
    ann = tmp_path / "ann.jsonl"
    ann.write_text(
        "\n".join(
            json.dumps(
                {
                    "image": f"{i}.jpg",
                    "captions": [f"Caption {i}."],
                    "boxes": [{"category": "cat", "bbox": [0.1, 0.2, 0.3, 0.4]}],
                }
            )
            for i in range(3)
        )
    )
    out = tmp_path / "gen"
    with serve_process(checkpoint, tmp_path) as url:
        rc = generate.main(
            [
                "--input",
                str(ann),
                "--kinds",
                "conversation,detail",
                "--out",
                str(out),
                "--base-url",
                url + "/v1",
                "--model",
                "tiny-llava",
                "--max-tokens",
                "8",
                "--prompts",
                str(_prompt_folder(tmp_path / "prompts")),
                "--no-progress",
            ]
        )
    assert rc == 0
    records = list(read_raw(str(out / "raw.jsonl")))
    assert sorted((r["image"], r["kind"]) for r in records) == sorted(
        (f"{i}.jpg", k) for i in range(3) for k in ("conversation", "detail")
    )
    for r in records:
        assert r["model"] == "tiny-llava" and r["finish_reason"] in ("stop", "length")
        assert r["usage"]["prompt_tokens"] > 20 and 1 <= r["usage"]["completion_tokens"] <= 8
    usage = json.loads((out / "usage.jsonl").read_text().splitlines()[-1])
    assert usage["prompt_tokens"] == sum(r["usage"]["prompt_tokens"] for r in records)

    stats = build.build([str(out)], str(tmp_path / "data.json"))  # random weights: mostly rejects, all counted
    assert stats["kept_total"] + stats["rejected_total"] == 6
