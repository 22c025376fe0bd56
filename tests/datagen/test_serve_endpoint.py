"""Generation against llava_jax's own OpenAI-compatible server (a real endpoint, tiny random model)."""

import json

import pytest
from inference.serving_fixtures import (  # tests/ is on sys.path
    running_server,
    shared_chat_model,
)

from llava_jax.datagen import build, generate
from llava_jax.datagen.rawlog import read_raw
from llava_jax.inference.server import ServerConfig, create_app

pytestmark = pytest.mark.slow


def _prompt_folder(root):
    """Short prompts: the tiny model's context is 1024 tokens."""
    for folder in ("conversation", "detail_description", "complex_reasoning"):
        d = root / folder
        d.mkdir(parents=True)
        (d / "system_message.txt").write_text("You describe images from captions.")
        (d / "000_caps.txt").write_text("A dog on grass.")
        (d / "000_conv.txt").write_text(
            "Question:\nWhat animal is it?\n===\nAnswer:\nA dog."
        )
    return root


def test_generate_and_build_against_llava_jax_serve(tmp_path, tmp_path_factory):
    chat = shared_chat_model(tmp_path_factory)
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
    app = create_app(
        chat,
        ServerConfig(
            model_name="tiny-llava", max_batch=4, max_queue=16, batch_wait_ms=20
        ),
    )
    with running_server(app) as url:
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
        assert (
            r["usage"]["prompt_tokens"] > 20
            and 1 <= r["usage"]["completion_tokens"] <= 8
        )
    usage = json.loads((out / "usage.jsonl").read_text().splitlines()[-1])
    assert usage["prompt_tokens"] == sum(r["usage"]["prompt_tokens"] for r in records)

    stats = build.build(
        [str(out)], str(tmp_path / "data.json")
    )  # random weights: mostly rejects, all counted
    assert stats["kept_total"] + stats["rejected_total"] == 6
