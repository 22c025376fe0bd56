"""Random-access sources: LLaVA JSON/JSONL, pack -> ArrayRecord round trip, TFDS wrapper."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from llava_jax.data import pack, sources


def _write_dataset(root, bad=True):
    """A small LLaVA JSON with image and text-only records (and some bad ones when `bad`)."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    records = []
    for i in range(6):
        name = f"img/{i}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(rng.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8)).save(root / name)
        records.append(
            {
                "id": f"r{i}",
                "image": name,
                "conversations": [
                    {"from": "human", "value": f"<image>\nWhat is in picture {i}?"},
                    {"from": "gpt", "value": f"Noise number {i}."},
                ],
            }
        )
    records.append(
        {"id": "text", "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi."}]}
    )
    if bad:
        (root / "img/zero.jpg").write_bytes(b"")
        (root / "img/corrupt.jpg").write_bytes(b"nope" * 20)
        records += [
            {"id": "missing", "image": "img/none.jpg", "conversations": records[0]["conversations"]},
            {"id": "zero", "image": "img/zero.jpg", "conversations": records[0]["conversations"]},
            {"id": "corrupt", "image": "img/corrupt.jpg", "conversations": records[0]["conversations"]},
            {"id": "noconv", "image": "img/0.jpg"},
        ]
    path = root / "data.json"
    path.write_text(json.dumps(records))
    return path, records


def test_json_source(tmp_path):
    path, records = _write_dataset(tmp_path, bad=False)
    src = sources.LlavaJsonSource(path, tmp_path)
    assert len(src) == len(records)
    r = src[1]
    assert r["id"] == "r1" and r["image"] == "img/1.png" and r["image_path"] == str(tmp_path / "img/1.png")
    assert r["conversations"] == records[1]["conversations"] and r["image_bytes"] is None
    text = src[6]
    assert text["image"] is None and text["image_path"] is None
    assert src.raw(3) == records[3]
    with pytest.raises(IndexError):
        src[len(src)]
    # image_folder defaults to the JSON's folder; open_source picks the source type.
    assert sources.open_source(path)[0]["image_path"] == str(tmp_path / "img/0.jpg")


def test_jsonl_and_malformed_records(tmp_path):
    lines = [
        json.dumps({"id": 1, "image": ["a.jpg"], "conversations": []}),
        "{not json",
        json.dumps({"image": ["a.jpg", "b.jpg"], "conversations": []}),
        json.dumps([1, 2]),
        json.dumps({"id": "t", "conversations": [{"from": "human", "value": "x"}]}),
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n\n")
    src = sources.LlavaJsonSource(path)
    assert len(src) == 5
    assert src[0]["image"] == "a.jpg" and "_error" not in src[0]  # one-element list -> the name
    assert "invalid JSON on line 2" in src[1]["_error"] and src[1]["id"] == "d.jsonl:2"
    assert "2 images" in src[2]["_error"] and src[2]["id"] == 2  # no id: the index
    assert "not an object" in src[3]["_error"]
    assert src[4]["id"] == "t" and src[4]["image"] is None


def test_json_source_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        sources.LlavaJsonSource(tmp_path / "nope.json")
    (tmp_path / "obj.json").write_text('{"a": 1}')
    with pytest.raises(ValueError, match="JSON list"):
        sources.LlavaJsonSource(tmp_path / "obj.json")
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(ValueError, match="not valid JSON"):
        sources.LlavaJsonSource(tmp_path / "broken.json")
    (tmp_path / "ok.json").write_text("[]")
    with pytest.raises(FileNotFoundError, match="image folder"):
        sources.LlavaJsonSource(tmp_path / "ok.json", tmp_path / "no_such_dir")


def test_pack_round_trip(tmp_path, capsys):
    path, records = _write_dataset(tmp_path / "in")
    out = tmp_path / "packed"
    assert pack.main(["--json", str(path), "--out", str(out), "--num-shards", "3", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 7 of 11 records into 3 shards" in printed and "skipped 4 bad records" in printed

    summary = json.loads((out / "pack_summary.json").read_text())
    assert summary["records_written"] == 7 and summary["records_skipped"] == 4
    assert sum(s["records"] for s in summary["shards"]) == 7 and len(summary["shards"]) == 3
    bad = [json.loads(line) for line in (out / "bad_records.jsonl").read_text().splitlines()]
    assert {b["id"] for b in bad} == {"missing", "zero", "corrupt", "noconv"}
    assert all(b["reason"] for b in bad) and any(b["path"] and b["path"].endswith("none.jpg") for b in bad)

    src = sources.ArrayRecordSource(out)
    assert len(src) == 7 and len(src.paths) == 3
    for i in range(7):
        got, want = src[i], records[i]
        assert got["id"] == want["id"] and got["conversations"] == want["conversations"]
        assert got["image"] == want.get("image") and got["image_path"] is None
        if want.get("image"):
            assert got["image_bytes"] == (tmp_path / "in" / want["image"]).read_bytes()
        else:
            assert got["image_bytes"] is None
    # A glob and a single shard work too.
    assert len(sources.ArrayRecordSource(str(out / "*.array_record"))) == 7
    with pytest.raises(FileNotFoundError, match="pack"):
        sources.ArrayRecordSource(tmp_path / "empty_dir_that_is_missing")


def test_pack_more_shards_than_records_and_decode_verify(tmp_path):
    path, _ = _write_dataset(tmp_path / "in", bad=False)
    (tmp_path / "in/img/3.png").write_bytes((tmp_path / "in/img/3.png").read_bytes()[:60])  # truncated
    summary = pack.pack(str(path), None, str(tmp_path / "o"), 9, verify="decode", progress=False)
    assert len(summary["shards"]) == 9 and summary["records_written"] == 6 and summary["records_skipped"] == 1
    assert len(sources.ArrayRecordSource(tmp_path / "o")) == 6


def test_pack_cli_subprocess(tmp_path, repo_root):
    path, _ = _write_dataset(tmp_path / "in", bad=False)
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "llava_jax.data.pack",
            "--json",
            str(path),
            "--out",
            str(tmp_path / "o"),
            "--num-shards",
            "2",
        ],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert "wrote 7 of 7 records into 2 shards" in res.stdout and "skipped 0 records" in res.stdout
    assert "pack data" in res.stderr  # the tqdm progress bar


def test_bad_payload_is_a_record_error():
    r = sources.decode_record(b"XXXX-garbage", 5)
    assert "bad magic" in r["_error"] and r["id"] == 5
    payload = sources.encode_record({"id": "a", "image": "x.jpg", "conversations": [], "extra": 1}, b"\xff\xd8")
    r = sources.decode_record(payload)
    assert r["image_bytes"] == b"\xff\xd8" and r["extra"] == 1 and r["image"] == "x.jpg"


def test_mapped_source_normalizes():
    data = [{"img": np.zeros((4, 4, 3), np.uint8), "q": "hi"}]

    def record_fn(ex, i):
        return {
            "id": f"tf{i}",
            "image_array": ex["img"],
            "conversations": [{"from": "human", "value": "<image>\n" + ex["q"]}],
        }

    src = sources.MappedSource(data, record_fn)
    r = src[0]
    assert len(src) == 1 and r["id"] == "tf0" and r["image"] == "<tf0>" and r["image_array"].shape == (4, 4, 3)
    assert r["image_path"] is None


def test_llava_tfds_record_of_another_dataset_names_the_fix():
    """The default TFDS mapping (llava_json builds) on another dataset's examples: a record error
    that says to set tfds_record_fn, raised by the pipeline as a BadSample."""
    from llava_jax.data.errors import BadSample
    from llava_jax.data.pipeline import PrepareSample
    from llava_jax.data.tokenizer import load_tokenizer

    src = sources.MappedSource([{"image": np.zeros((4, 4, 3), np.uint8), "label": 3}], sources.llava_tfds_record)
    r = src[0]
    assert r["id"] == 0 and "tfds_record_fn" in r["_error"]
    prepare = PrepareSample(
        tokenizer=load_tokenizer(),
        template="v1",
        image_size=8,
        image_aspect_ratio="square",
        num_image_tokens=4,
        max_length=64,
    )
    with pytest.raises(BadSample, match="not a llava_json build"):
        prepare(r)


def test_tfds_source_without_tfds_explains_install():
    try:
        import tensorflow_datasets  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"llava_jax\[tfds\]"):
            sources.TfdsSource("coco", "train", lambda ex, i: ex)
        # A data config naming a TFDS build needs no record function (llava_json builds by default).
        from llava_jax.data import pipeline

        with pytest.raises(ImportError, match=r"llava_jax\[tfds\]"):
            pipeline.source_from_config({"tfds_name": "llava_json/default", "tfds_data_dir": "/nonexistent"})
    else:
        pytest.skip("tensorflow-datasets is installed")
