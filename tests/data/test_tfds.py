"""TFDS round trip: a LLaVA JSON + image folder, built by the `llava_json` builder with TFDS's own
`build` command, read back with `tfds.data_source` through the grain pipeline, gives the same records,
tokens and pixels as the JSON source.

Needs tensorflow-datasets (TensorFlow is not needed, and CI does not install it), which the jax test
environment does not carry: `.ci/tfds`, called by `.ci/run`, runs these tests in their own virtual
environment (`pytest -m tfds`, README "TFDS"). There LLAVA_JAX_TFDS_REQUIRED=1 turns a missing package
into a failure, not a skip.
"""

import json
import os
import pickle
import subprocess
import sys
import types

import numpy as np
import pytest
from PIL import Image

from llava_jax.data import pipeline, sources
from llava_jax.data.tokenizer import IMAGE_TOKEN_ID, load_tokenizer

pytestmark = pytest.mark.tfds


@pytest.fixture(autouse=True, scope="module")
def _tfds_installed():
    if os.environ.get("LLAVA_JAX_TFDS_REQUIRED") == "1":
        import tensorflow_datasets  # noqa: F401
    else:
        pytest.importorskip("tensorflow_datasets", reason="pip install 'llava_jax[tfds]' (CI: its own venv, .ci/run)")


BUILDER_DIR = os.path.join("llava_jax", "data", "tfds_builders", "llava_json")
S, T = 32, 4  # image size, image tokens per image


def _records_and_images(root):
    """Records in the published layout of llava_v1_5_mix665k.json (COCO / GQA / OCR-VQA / VG image
    paths relative to the data folder, ShareGPT text-only records, string ids), images of several
    formats and colour modes, and bad records. Returns (records, ids that must be left out)."""
    rng = np.random.default_rng(7)

    def image(name, mode, fmt, size=(40, 30)):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8)
        img = Image.fromarray(pixels, "RGBA").convert(mode)
        img.save(path, fmt)
        return name

    def conv(*turns):
        return [{"from": "human" if k % 2 == 0 else "gpt", "value": v} for k, v in enumerate(turns)]

    records = [
        {
            "id": "000000033471",
            "image": image("coco/train2017/000000033471.jpg", "RGB", "JPEG"),
            "conversations": conv(
                "<image>\nWhat are the colors of the bus in the image?",
                "The bus in the image is white and red.",
                "What feature can be seen on the back of the bus?",
                "The back of the bus features an advertisement.",
            ),
        },
        {
            "id": "000000052846",
            "image": image("coco/train2017/000000052846.jpg", "L", "JPEG", (33, 51)),
            "conversations": conv("Where is the cat positioned?\n<image>", "On the windowsill."),
        },
        {
            "id": "2354786",
            "image": image("gqa/images/2354786.jpg", "RGB", "JPEG", (64, 20)),
            "conversations": conv(
                "<image>\nIs the sky dark?\nAnswer the question using a single word or phrase.", "Yes"
            ),
        },
        {
            "id": "71055855",
            "image": [image("ocr_vqa/images/71055855.png", "P", "PNG")],  # a one-element list
            "conversations": conv(
                "<image>\nWho wrote this book?", "Sandra Boynton", "What is the title?", "Moo, Baa, La La La!"
            ),
        },
        {
            "id": "i6IyJda_0",
            "model": "",
            "conversations": conv("How do I reverse a list in Python?", "Use reversed(x) or x[::-1]."),
        },
        {
            "id": 12,
            "image": image("vg/VG_100K/12.png", "RGBA", "PNG", (25, 25)),
            "conversations": conv("<image>\nDescribe the region.", "A patch of noise."),
        },
        {"conversations": conv("Say hi.", "Hi."), "source": "no id: the index is the id"},
        {
            "id": "weighted",
            "conversations": [
                {"from": "human", "value": "Name a colour."},
                {"from": "gpt", "value": "Blue.", "weight": 0.5},
            ],
        },  # a turn field
        # Bad records: the build leaves them out and lists them.
        {"id": "missing", "image": "coco/train2017/none.jpg", "conversations": conv("<image>\nHm?", "No.")},
        {"id": "empty", "image": "coco/train2017/empty.jpg", "conversations": conv("<image>\nHm?", "No.")},
        {"id": "corrupt", "image": "gqa/images/corrupt.jpg", "conversations": conv("<image>\nHm?", "No.")},
        {"id": "badturn", "conversations": [{"from": "human", "value": None}, {"from": "gpt", "value": "x"}]},
    ]
    (root / "coco/train2017/empty.jpg").write_bytes(b"")
    (root / "gqa/images/corrupt.jpg").write_bytes(b"not an image" * 10)
    return records, {"missing", "empty", "corrupt", "badturn"}


def _build(repo_root, *args, check=True):
    """TFDS's `build` command (as `tfds build`) in a fresh process."""
    res = subprocess.run(
        [sys.executable, "-m", "llava_jax.data.tfds_builders", *map(str, args)],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if check:
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


@pytest.fixture(scope="module")
def built(tmp_path_factory, repo_root):
    manual = tmp_path_factory.mktemp("manual")
    records, bad_ids = _records_and_images(manual)
    (manual / "llava_v1_5_mix665k.json").write_text(json.dumps(records))
    data_dir = tmp_path_factory.mktemp("tfds")
    _build(repo_root, BUILDER_DIR, "--manual_dir", manual, "--data_dir", data_dir, "--config", "llava_v1_5_mix665k")
    return {
        "manual": manual,
        "data_dir": data_dir,
        "records": records,
        "bad_ids": bad_ids,
        "build_dir": data_dir / "llava_json" / "llava_v1_5_mix665k" / "1.0.0",
    }


def test_build_is_array_record_and_lists_left_out_records(built):
    files = sorted(p.name for p in built["build_dir"].iterdir())
    assert any(".array_record-" in f for f in files), files
    skipped = json.loads((built["build_dir"] / "metadata.json").read_text())["skipped"]["train"]
    assert skipped["records_in"] == len(built["records"]) and skipped["records_skipped"] == 4
    reasons = {r["id"]: r["reason"] for r in skipped["records"]}
    assert set(reasons) == built["bad_ids"]
    assert (
        "not found" in reasons["missing"]
        and "empty" in reasons["empty"]
        and "not a readable image" in reasons["corrupt"]
        and "turn 0" in reasons["badturn"]
    )


def test_records_equal_the_json_file(built):
    """Every kept record, in file order: id (with its JSON type), turns, image name, the image file's
    bytes as on disk, and the other fields; read without TensorFlow."""
    tf_loaded_before = "tensorflow" in sys.modules
    src = sources.TfdsSource("llava_json/llava_v1_5_mix665k", "train", data_dir=str(built["data_dir"]))
    want = [(i, r) for i, r in enumerate(built["records"]) if r.get("id") not in built["bad_ids"]]
    assert len(src) == len(want) == 8
    for k, (index, raw) in enumerate(want):
        got = src[k]
        assert got["id"] == raw.get("id", index) and type(got["id"]) is type(raw.get("id", index))
        assert got["conversations"] == raw["conversations"]
        name = raw.get("image")
        name = name[0] if isinstance(name, list) else name
        assert got["image"] == name
        if name:
            assert got["image_bytes"] == (built["manual"] / name).read_bytes()
        else:
            assert got["image_bytes"] is None
        assert got["image_path"] is None and "_error" not in got
        extra = {key: v for key, v in raw.items() if key not in ("id", "image", "conversations")}
        assert {key: got[key] for key in extra} == extra
    # grain hands sources to worker processes by pickling them.
    assert pickle.loads(pickle.dumps(src))[3]["image_bytes"] == src[3]["image_bytes"]
    assert ("tensorflow" in sys.modules) == tf_loaded_before, "reading a build must not import TensorFlow"


def test_pipeline_batches_equal_the_json_source(built):
    """The trainer's data path (a stage's data config with tfds_name, `training.loop.data_iterator`)
    and the JSON source give the same batches: tokens, labels, positions and pixels, in the same
    seeded shuffle order, over more than one epoch."""
    from llava_jax.training import config_schema, loop

    stage = config_schema.stage_config(trainable="projector", lr=1e-3, batch_size=3, epochs=1, template="v1")
    stage.data.update(
        tfds_name="llava_json/llava_v1_5_mix665k",
        tfds_data_dir=str(built["data_dir"]),
        image_aspect_ratio="pad",
        max_length=160,
        on_bad_sample="raise",
    )
    model = types.SimpleNamespace(vision=types.SimpleNamespace(image_size=S), num_image_tokens=T)
    it, source = loop.data_iterator(types.SimpleNamespace(seed=5), stage, model)
    assert len(source) == 8
    got = [next(it) for _ in range(6)]  # 18 rows: every record twice and then some

    json_src = sources.LlavaJsonSource(built["manual"] / "llava_v1_5_mix665k.json")
    kept = [json_src[i] for i in range(len(json_src)) if json_src[i]["id"] not in built["bad_ids"]]
    want = pipeline.make_batches(
        kept,
        tokenizer=load_tokenizer(),
        template="v1",
        image_size=S,
        image_aspect_ratio="pad",
        num_image_tokens=T,
        max_length=160,
        global_batch_size=3,
        seed=5,
        num_epochs=None,
        packing=False,
        worker_count=0,
        on_bad_sample="raise",
        shard_index=0,
        shard_count=1,
    )
    for g in got:
        w = next(want)
        assert g.keys() == w.keys()
        for key in w:
            np.testing.assert_array_equal(g[key], w[key], err_msg=key)
    assert all((b["segment_ids"] > 0).any(axis=1).all() for b in got)
    assert sum(int((b["input_ids"] == IMAGE_TOKEN_ID).sum()) for b in got) > 0 and any(b["images"].any() for b in got)


def test_raise_policy_splits_and_imports(tmp_path, repo_root):
    """`tfds build llava_json --imports ...` with a JSON config: two splits from absolute paths; with
    on_bad_record="raise" a bad record stops the build naming the record and its file."""
    records, _ = _records_and_images(tmp_path / "data")
    good = [r for r in records if r.get("id") not in ("missing", "empty", "corrupt", "badturn")]
    (tmp_path / "train.json").write_text(json.dumps(good[:5]))
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in good[5:]))
    (tmp_path / "bad.json").write_text(json.dumps(records))
    config = {
        "name": "mine",
        "splits": {"train": str(tmp_path / "train.json"), "validation": str(tmp_path / "val.jsonl")},
        "image_folder": str(tmp_path / "data"),
        "verify": "decode",
        "on_bad_record": "raise",
    }
    common = ["llava_json", "--imports", "llava_jax.data.tfds_builders.llava_json", "--data_dir", tmp_path / "out"]
    _build(repo_root, *common, "--config", json.dumps(config))
    assert len(sources.TfdsSource("llava_json/mine", "train", data_dir=str(tmp_path / "out"))) == 5
    val = sources.TfdsSource("llava_json/mine", "validation", data_dir=str(tmp_path / "out"))
    assert [val[i]["id"] for i in range(len(val))] == [r.get("id", k) for k, r in enumerate(good[5:])]

    config.update(name="strict", splits={"train": str(tmp_path / "bad.json")})
    res = _build(repo_root, *common, "--config", json.dumps(config), check=False)
    assert res.returncode != 0
    assert "bad sample 'missing'" in res.stderr and "none.jpg" in res.stderr and "on_bad_record" in res.stderr


def test_remote_data_dir_that_cannot_be_read_names_the_fix(monkeypatch):
    """tfds.data_source finds a build's metadata in a bucket but array_record opens files locally:
    the source fails at construction with the fix, not in a data worker."""
    import tensorflow_datasets as tfds

    class Unreadable:
        def __len__(self):
            return 3

        def __getitem__(self, i):
            raise RuntimeError(
                "open() failed: No such file or directory; opening gs://b/llava_json/x/1.0.0/f.array_record"
            )

    monkeypatch.setattr(tfds, "data_source", lambda *a, **k: Unreadable())
    with pytest.raises(OSError, match="gcsfuse.*copy the build to local disk"):
        sources.TfdsSource("llava_json/x", "train", data_dir="gs://b")
