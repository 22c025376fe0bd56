"""Generated data trains: annotations -> generate (stub API) -> build + stage-1 captions -> data.check ->
python -m llava_jax.train (demo-sized, both stages)."""

import json
import math
import subprocess
import sys

import pytest
from api_stub import ApiStub

from llava_jax.data import check
from llava_jax.data.synthetic import generate as synthetic_images
from llava_jax.datagen import build, captions, generate

pytestmark = pytest.mark.slow


def test_generated_json_trains(tmp_path, repo_root):
    data = tmp_path / "data"
    synthetic_images(str(data), image_size=32, num_pretrain=48, num_instruct=0, num_eval=0)
    shapes = json.loads((data / "pretrain.json").read_text())
    ann = tmp_path / "ann.jsonl"
    ann.write_text(
        "\n".join(json.dumps({"image": r["image"], "captions": [r["conversations"][1]["value"]]}) for r in shapes)
    )

    with ApiStub(script=["429", "500"]) as stub:
        assert (
            generate.main(
                [
                    "--input",
                    str(ann),
                    "--out",
                    str(tmp_path / "gen"),
                    "--base-url",
                    stub.base_url,
                    "--backoff-base",
                    "0.01",
                    "--no-progress",
                ]
            )
            == 0
        )
    stats = build.build([str(tmp_path / "gen")], str(data / "instruct_gen.json"))
    assert stats["kept"] == {"conversation": 48, "detail": 48, "complex": 48} and stats["rejected_total"] == 0
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        "\n".join(json.dumps({"image": r["image"], "caption": r["conversations"][1]["value"]}) for r in shapes)
    )
    assert captions.main(["--input", str(pairs), "--out", str(data / "chat.json")]) == 0

    for path, template in (
        (data / "instruct_gen.json", "v1"),
        (data / "chat.json", "plain"),
    ):
        assert (
            check.main(
                [
                    str(path),
                    "--image-folder",
                    str(data),
                    "--template",
                    template,
                    "--max-length",
                    "256",
                    "--image-size",
                    "64",
                    "--patch-size",
                    "8",
                    "--workers",
                    "1",
                    "--no-progress",
                ]
            )
            == 0
        )

    workdir = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "llava_jax.train",
        "--config",
        str(repo_root / "configs" / "demo.py"),
        "--workdir",
        str(workdir),
        "--config.stages=stage1,stage2",
        "--config.synthetic.enabled=False",
        "--config.eval.json_path=",
        f"--config.stage1.data.json_path={data / 'chat.json'}",
        f"--config.stage1.data.image_folder={data}",
        f"--config.stage2.data.json_path={data / 'instruct_gen.json'}",
        f"--config.stage2.data.image_folder={data}",
        "--config.stage1.batch_size=8",
        "--config.stage2.batch_size=8",
        "--config.stage1.num_steps=3",
        "--config.stage2.num_steps=3",
        "--config.stage2.data.max_length=256",
        "--config.log_every=1",
    ]
    proc = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=3000, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(x) for p in workdir.rglob("metrics.jsonl") for x in p.read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) >= 6 and all(math.isfinite(v) for v in losses)
    skipped = [r.get("skipped_samples", 0) for r in rows]
    assert not any(skipped)
