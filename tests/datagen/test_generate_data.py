"""Contexts, prompt sets and the generator: end to end against the scripted stub, kill and resume."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from api_stub import ApiStub

from llava_jax.datagen import generate
from llava_jax.datagen.context import (
    format_context,
    load_coco,
    load_jsonl,
)
from llava_jax.datagen.prompts import load_prompt_set
from llava_jax.datagen.rawlog import RawLog, read_raw


def _write(path, data):
    path.write_text(json.dumps(data))
    return str(path)


def test_coco_context_as_in_the_paper(tmp_path):
    caps = _write(
        tmp_path / "caps.json",
        {
            "images": [
                {"id": 7, "file_name": "000000000007.jpg", "width": 640, "height": 480},
                {"id": 9, "file_name": "000000000009.jpg", "width": 100, "height": 100},
            ],
            "annotations": [
                {"image_id": 7, "id": 1, "caption": "A man wearing ties. "},
                {"image_id": 7, "id": 2, "caption": "A young man smiles.\n"},
            ],
        },
    )
    inst = _write(
        tmp_path / "inst.json",
        {
            "images": [{"id": 7, "file_name": "000000000007.jpg", "width": 640, "height": 480}],
            "categories": [{"id": 1, "name": "person"}, {"id": 32, "name": "tie"}],
            "annotations": [
                {
                    "image_id": 7,
                    "id": 5,
                    "category_id": 32,
                    "bbox": [367.36, 143.04, 113.92, 194.88],
                },
                {"image_id": 7, "id": 6, "category_id": 1, "bbox": [0, 0, 640, 480]},
            ],
        },
    )
    (a,) = load_coco(caps, inst)  # image 9 has no captions: left out
    assert a.image == "000000000007.jpg"
    # 367.36/640 = 0.574, 143.04/480 = 0.298, 481.28/640 = 0.752, 337.92/480 = 0.704
    boxes = "tie: [0.574, 0.298, 0.752, 0.704]\nperson: [0.0, 0.0, 1.0, 1.0]"
    assert format_context(a, "detail") == "A man wearing ties.\nA young man smiles.\n\n" + boxes
    assert format_context(a, "complex") == format_context(a, "detail")
    assert format_context(a, "conversation") == "A man wearing ties.\nA young man smiles."


def test_jsonl_input_and_its_errors(tmp_path):
    good = {
        "image": "a.jpg",
        "captions": ["One.", " "],
        "boxes": [{"category": "dog", "bbox": [0.1, 0.2, 0.3, 0.44444]}],
    }
    (tmp_path / "in.jsonl").write_text(json.dumps(good) + "\n\n")
    (a,) = load_jsonl(str(tmp_path / "in.jsonl"))
    assert format_context(a, "detail") == "One.\n\ndog: [0.1, 0.2, 0.3, 0.444]"
    pixel = {
        "image": "b.jpg",
        "captions": ["Two."],
        "boxes": [{"category": "cat", "bbox": [10, 20, 300, 400]}],
    }
    (tmp_path / "bad.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(pixel) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: box 0 .* not a normalized"):
        load_jsonl(str(tmp_path / "bad.jsonl"))


def test_vendored_prompt_sets_and_custom_folders(tmp_path):
    sizes = {k: len(load_prompt_set(None, k).examples) for k in ("conversation", "detail", "complex")}
    assert sizes == {
        "conversation": 2,
        "detail": 3,
        "complex": 3,
    }  # docs/Data.md of the original
    ps = load_prompt_set(None, "complex")
    msgs = ps.messages("QUERY")
    assert [m["role"] for m in msgs] == ["system"] + ["user", "assistant"] * 3 + ["user"]
    assert msgs[-1]["content"] == "QUERY" and msgs[1]["content"].startswith("A man wearing multiple neck ties")
    assert msgs[2]["content"].startswith("Question:\nWhat is unusual about this photo?")

    own = tmp_path / "prompts" / "conversation"
    own.mkdir(parents=True)
    (own / "system_message.txt").write_text("Be brief.")
    (own / "000_caps.txt").write_text("caps")
    with pytest.raises(FileNotFoundError, match="000_conv.txt is missing"):
        load_prompt_set(tmp_path / "prompts", "conversation")
    (own / "000_conv.txt").write_text("Question:\nQ\n===\nAnswer:\nA")
    assert load_prompt_set(tmp_path / "prompts", "conversation").examples == (
        ("caps", "Question:\nQ\n===\nAnswer:\nA"),
    )
    with pytest.raises(FileNotFoundError, match="detail_description"):
        load_prompt_set(tmp_path / "prompts", "detail")


def _annotations_file(tmp_path, n):
    path = tmp_path / "ann.jsonl"
    with open(path, "w") as f:
        f.writelines(
            json.dumps(
                {
                    "image": f"{i:012d}.jpg",
                    "captions": [f"Scene number {i}.", "Another one."],
                    "boxes": [{"category": "dog", "bbox": [0.1, 0.1, 0.5, 0.5]}],
                }
            )
            + "\n"
            for i in range(n)
        )
    return str(path)


def _keys(out):
    return [(r["image"], r["kind"]) for r in read_raw(os.path.join(out, "raw.jsonl"))]


def test_generate_end_to_end_with_failures_and_rerun(tmp_path, capsys):
    ann, out = _annotations_file(tmp_path, 5), str(tmp_path / "gen")
    argv = [
        "--input",
        ann,
        "--kinds",
        "conversation,detail",
        "--out",
        out,
        "--concurrency",
        "3",
        "--no-progress",
        "--backoff-base",
        "0.01",
        "--max-retries",
        "3",
        "--model",
        "stub-model",
        "--limit",
        "4",
    ]
    script = ["429", "500", "malformed", "400"]  # three retried, one fails for good
    with ApiStub(script=script) as stub:
        rc = generate.main(argv + ["--base-url", stub.base_url])
        assert rc == 1  # one request failed (HTTP 400)
        assert stub.ok_count == 7
    keys = _keys(out)
    assert len(keys) == 7 == len(set(keys))
    errors = [json.loads(line) for line in (tmp_path / "gen" / "errors.jsonl").read_text().splitlines()]
    assert len(errors) == 1 and errors[0]["status"] == 400
    assert (errors[0]["image"], errors[0]["kind"]) not in keys
    for r in read_raw(os.path.join(out, "raw.jsonl")):
        n = int(r["image"][:12])
        assert r["request"]["query"].startswith(f"Scene number {n}.")  # reply matches its request
        assert f"Scene number {n}." in r["content"]
        assert r["model"] == "stub-model-stub" and r["request"]["model"] == "stub-model"
        assert ("dog: [0.1, 0.1, 0.5, 0.5]" in r["request"]["query"]) == (r["kind"] == "detail")
    usage = json.loads((tmp_path / "gen" / "usage.jsonl").read_text().splitlines()[-1])
    assert usage["requests"] == 7 and usage["written"] == 7 and usage["errors"] == 1 and usage["retries"] == 3
    assert "estimated cost" in capsys.readouterr().out

    with ApiStub() as stub:  # the rerun sends only the missing request
        assert generate.main(argv + ["--base-url", stub.base_url]) == 0
        assert stub.ok_count == 1
    assert sorted(_keys(out)) == sorted({(f"{i:012d}.jpg", k) for i in range(4) for k in ("conversation", "detail")})


def test_dry_run_sends_nothing(tmp_path, capsys):
    ann = _annotations_file(tmp_path, 3)
    with ApiStub() as stub:
        rc = generate.main(
            [
                "--input",
                ann,
                "--out",
                str(tmp_path / "g"),
                "--base-url",
                stub.base_url,
                "--dry-run",
                "--model",
                "gpt-4o",
            ]
        )
    assert rc == 0 and stub.actions == []
    assert "9 requests to send" in capsys.readouterr().out


def test_raw_log_cuts_a_torn_line_and_refuses_a_second_writer(tmp_path):
    out = str(tmp_path / "g")
    with RawLog(out) as raw:
        raw.append({"image": "a", "kind": "detail", "content": "x"})
        with pytest.raises(RuntimeError, match="another generator"):
            RawLog(out)
    with open(os.path.join(out, "raw.jsonl"), "ab") as f:
        f.write(b'{"image": "b", "kind": "det')
    assert _keys(out) == [("a", "detail")]
    with RawLog(out) as raw:
        assert raw.torn_bytes == len(b'{"image": "b", "kind": "det') and raw.done == {("a", "detail")}
        raw.append({"image": "b", "kind": "detail", "content": "y"})
    lines = (tmp_path / "g" / "raw.jsonl").read_bytes().splitlines()
    assert [json.loads(x)["image"] for x in lines] == ["a", "b"]


def test_sigkill_and_resume_lose_only_in_flight_requests_and_duplicate_nothing(
    tmp_path,
):
    n_images, kinds, concurrency, first = (
        10,
        ("conversation", "detail", "complex"),
        4,
        7,
    )
    ann, out = _annotations_file(tmp_path, n_images), str(tmp_path / "gen")
    raw_path = os.path.join(out, "raw.jsonl")

    def cmd(url):
        return [
            sys.executable,
            "-m",
            "llava_jax.datagen.generate",
            "--input",
            ann,
            "--kinds",
            ",".join(kinds),
            "--out",
            out,
            "--base-url",
            url,
            "--concurrency",
            str(concurrency),
            "--no-progress",
        ]

    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    with ApiStub(hold_after=first) as stub:
        proc = subprocess.Popen(
            cmd(stub.base_url),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 240
        # wait until `first` answers are written and every worker is waiting on a held answer
        while not (os.path.exists(raw_path) and len(_keys(out)) == first and stub.in_flight == concurrency):
            assert proc.poll() is None, "generator exited early"
            assert time.monotonic() < deadline, "generator did not reach the kill point"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        stub.release()
    assert len(_keys(out)) == first
    with open(raw_path, "ab") as f:  # as if the kill had hit in the middle of writing a line
        f.write(b'{"image": "000000000009.jpg", "kind": "complex", "content": "cut')

    with ApiStub() as stub:
        subprocess.run(
            cmd(stub.base_url),
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        resent = stub.ok_count
    keys = _keys(out)
    expected = {(f"{i:012d}.jpg", k) for i in range(n_images) for k in kinds}
    assert len(keys) == len(expected) and set(keys) == expected  # each (image, kind) exactly once
    assert resent == len(expected) - first  # the rerun asked only for what was missing
    lines = (tmp_path / "gen" / "raw.jsonl").read_bytes().split(b"\n")
    assert lines[-1] == b"" and all(json.loads(x) for x in lines[:-1])  # no torn line left


def test_malformed_replies_are_kept_raw_and_rejected_by_build(tmp_path):
    """Paid-for replies are never dropped at generation time; build counts the broken ones per reason."""
    from api_stub import reply_for

    from llava_jax.datagen import build

    def reply(messages):
        n = int(messages[-1]["content"].split()[2].rstrip("."))  # "Scene number {n}."
        if n % 3 == 1:
            return "Sure! Here is a conversation about the image."  # no blocks
        if n % 3 == 2:
            return reply_for(messages).replace("Answer:", "Answer:\nThe caption says that")
        return reply_for(messages)

    ann, out = _annotations_file(tmp_path, 9), str(tmp_path / "gen")
    with ApiStub(reply=reply) as stub:
        assert (
            generate.main(
                [
                    "--input",
                    ann,
                    "--kinds",
                    "conversation,complex",
                    "--out",
                    out,
                    "--base-url",
                    stub.base_url,
                    "--no-progress",
                ]
            )
            == 0
        )
    assert len(_keys(out)) == 18
    stats = build.build([out], str(tmp_path / "data.json"))
    assert stats["kept"] == {"conversation": 3, "detail": 0, "complex": 3}
    assert stats["rejected"]["conversation"] == {
        "no_blocks": 3,
        "mentions_annotations": 3,
    }
    assert stats["rejected"]["complex"] == {"no_blocks": 3, "mentions_annotations": 3}
    kept = json.loads((tmp_path / "data.json").read_text())
    assert sorted(int(r["image"][:12]) for r in kept) == [0, 0, 3, 3, 6, 6]
