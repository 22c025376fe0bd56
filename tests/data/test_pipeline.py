"""The grain pipeline: batch format, shuffling, sharding, checkpoint state, packing, bad samples."""

import json
import shutil
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from llava_jax.data import pack, pipeline, sources, synthetic
from llava_jax.data.conversation_tokens import tokenize_record
from llava_jax.data.errors import BadSample
from llava_jax.data.image import load_image
from llava_jax.data.tokenizer import IGNORE_INDEX, IMAGE_TOKEN_ID, PAD_TOKEN_ID, load_tokenizer

S = 32  # image size
T = 4  # image tokens per image


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def _unique(records):
    """Makes every record's text unique so a token sequence identifies its record."""
    for i, r in enumerate(records):
        r["conversations"][0]["value"] += f" (sample {i})"
    return records


@pytest.fixture(scope="module")
def data(tmp_path_factory, tokenizer):
    """40 synthetic image records + 8 text-only ones; the expected tokens and pixels of each."""
    root = tmp_path_factory.mktemp("pipe")
    synthetic.generate(str(root), image_size=48, num_pretrain=0, num_instruct=40, num_eval=0, seed=3)
    records = json.loads((root / "instruct.json").read_text())
    for i in range(8):
        records.append(
            {
                "id": f"text-{i}",
                "conversations": [
                    {"from": "human", "value": "Count to " + " ".join(str(k) for k in range(i + 2)) + "."},
                    {"from": "gpt", "value": "Done" + "!" * i},
                ],
            }
        )
    records = _unique(records)
    path = root / "mixed.json"
    path.write_text(json.dumps(records))
    src = sources.LlavaJsonSource(path)
    by_ids, pixels = {}, {}
    for i in range(len(src)):
        tok = tokenize_record(src[i], "v1", tokenizer, T, 320)
        by_ids[tuple(tok["input_ids"].tolist())] = i
        if src[i]["image"]:
            pixels[i] = load_image(src[i]["image_path"], S, "square")
    return {"root": root, "path": path, "src": src, "records": records, "by_ids": by_ids, "pixels": pixels}


def _make(src, tokenizer, **kw):
    args = dict(
        tokenizer=tokenizer,
        template="v1",
        image_size=S,
        image_aspect_ratio="square",
        num_image_tokens=T,
        max_length=320,
        global_batch_size=4,
        seed=0,
        num_epochs=1,
        packing=False,
        worker_count=0,
        on_bad_sample="raise",
        shard_index=0,
        shard_count=1,
    )
    args.update(kw)
    return pipeline.make_batches(src, **args)


def _segments(batch):
    """Yields (row, segment number, slice) for every sample in a batch."""
    seg = batch["segment_ids"]
    for b in range(seg.shape[0]):
        for k in range(1, seg[b].max() + 1):
            idx = np.flatnonzero(seg[b] == k)
            assert len(idx) and (np.diff(idx) == 1).all(), "a segment must be contiguous"
            yield b, k, slice(idx[0], idx[-1] + 1)


def _order(batches, data):
    """Record indices in the order the batches hold them."""
    return [data["by_ids"][tuple(b["input_ids"][r, sl].tolist())] for b in batches for r, _, sl in _segments(b)]


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_batch_format(data, tokenizer):
    batches = list(_make(data["src"], tokenizer, global_batch_size=5))
    n = len(data["src"])
    assert len(batches) == -(-n // 5)
    for batch in batches:
        assert set(batch) == set(pipeline.BATCH_KEYS)
        for key in ("input_ids", "labels", "positions", "segment_ids"):
            assert batch[key].shape == (5, 320) and batch[key].dtype == np.int32, key
        assert batch["images"].shape == (5, 1, S, S, 3) and batch["images"].dtype == np.uint8
        assert batch["meta_skipped"].shape == (5,) and batch["meta_skipped"].dtype == np.int32
        assert not batch["meta_skipped"].any()
        pad = batch["segment_ids"] == 0
        assert (batch["input_ids"][pad] == PAD_TOKEN_ID).all() and (batch["labels"][pad] == IGNORE_INDEX).all()
        assert (batch["positions"][pad] == 0).all()
        for b, k, sl in _segments(batch):
            assert k == 1
            i = data["by_ids"][tuple(batch["input_ids"][b, sl].tolist())]
            want = tokenize_record(data["src"][i], "v1", tokenizer, T, 320)
            np.testing.assert_array_equal(batch["labels"][b, sl], want["labels"])
            np.testing.assert_array_equal(batch["positions"][b, sl], np.arange(sl.stop - sl.start))
            if i in data["pixels"]:
                np.testing.assert_array_equal(batch["images"][b, 0], data["pixels"][i])
            else:
                assert not batch["images"][b].any()  # text-only row: zero image slot
    # Every record exactly once; the last batch is completed with empty rows.
    assert sorted(_order(batches, data)) == list(range(n))
    assert (batches[-1]["segment_ids"][n % 5 :] == 0).all()


def test_seeded_shuffle_and_epoch_reshuffle(data, tokenizer):
    n = len(data["src"])
    a = _order(list(_make(data["src"], tokenizer, seed=7)), data)
    assert a == _order(list(_make(data["src"], tokenizer, seed=7)), data)
    assert a != _order(list(_make(data["src"], tokenizer, seed=8)), data)
    assert _order(list(_make(data["src"], tokenizer, shuffle=False)), data) == list(range(n))
    two = _order(list(_make(data["src"], tokenizer, seed=7, num_epochs=2)), data)
    assert two[:n] == a and sorted(two[n:]) == list(range(n)) and two[n:] != two[:n]


def test_process_shards_are_disjoint_and_complete(data, tokenizer):
    seen = []
    for index in range(2):
        batches = list(_make(data["src"], tokenizer, global_batch_size=4, shard_index=index, shard_count=2))
        assert all(b["input_ids"].shape[0] == 2 for b in batches)  # per-process batch = global // 2
        seen.append(set(_order(batches, data)))
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(len(data["src"])))
    with pytest.raises(ValueError, match="divisible"):
        _make(data["src"], tokenizer, global_batch_size=5, shard_index=0, shard_count=2)


@pytest.mark.parametrize("packing", [False, True])
def test_iterator_state_round_trip(data, tokenizer, packing):
    kw = dict(packing=packing, num_epochs=None, max_images_per_row=2)
    it = _make(data["src"], tokenizer, **kw)
    _take(it, 5)
    state = it.get_state()
    json.dumps(state)  # plain data, storable in a checkpoint
    after = _take(it, 12)  # crosses the epoch boundary
    fresh = _make(data["src"], tokenizer, **kw)
    fresh.set_state(state)
    _assert_same(after, _take(fresh, 12))


def test_packing_invariants(data, tokenizer):
    batches = list(_make(data["src"], tokenizer, packing=True, max_images_per_row=2))
    unpacked = -(-len(data["src"]) // 4)
    assert len(batches) < unpacked  # packing actually packs
    order = []
    for batch in batches:
        assert batch["images"].shape == (4, 2, S, S, 3)
        ids, labels, seg, pos = batch["input_ids"], batch["labels"], batch["segment_ids"], batch["positions"]
        for b in range(ids.shape[0]):
            # Segments are 1..k in order, padding only at the end.
            used = seg[b][seg[b] > 0]
            assert (np.diff(used) >= 0).all() and (seg[b][len(used) :] == 0).all()
            # Labels never cross a segment: a target at t needs t-1 in the same segment.
            t = np.flatnonzero(labels[b] != IGNORE_INDEX)
            assert (t > 0).all() and (seg[b][t - 1] == seg[b][t]).all() and (seg[b][t] > 0).all()
            # Image-token runs, in order, match the image slots.
            is_img = ids[b] == IMAGE_TOKEN_ID
            starts = np.flatnonzero(is_img & ~np.concatenate([[False], is_img[:-1]]))
            assert len(starts) <= 2
            segs_with_image = []
            for _, _k, sl in (s for s in _segments({"segment_ids": seg[b : b + 1]})):
                assert pos[b, sl][0] == 0 and (np.diff(pos[b, sl]) == 1).all()  # positions restart
                i = data["by_ids"][tuple(ids[b, sl].tolist())]  # whole sample: never split
                order.append(i)
                if i in data["pixels"]:
                    segs_with_image.append(i)
            assert len(segs_with_image) == len(starts)
            for slot, i in enumerate(segs_with_image):
                np.testing.assert_array_equal(batch["images"][b, slot], data["pixels"][i])
            assert not batch["images"][b, len(segs_with_image) :].any()
    assert sorted(order) == list(range(len(data["src"])))


def test_length_buckets(data, tokenizer):
    batches = list(_make(data["src"], tokenizer, length_buckets=(64, 96, 128, 192), max_length=320))
    assert {b["input_ids"].shape[1] for b in batches} <= {64, 96, 128, 192, 320}
    for b in batches:
        longest = max(sl.stop for _, _, sl in _segments(b))
        length = b["input_ids"].shape[1]
        assert longest <= length and not any(longest <= x < length for x in (64, 96, 128, 192))
    assert sorted(_order(batches, data)) == list(range(len(data["src"])))


# Bad samples.


def _png_header_only(width, height) -> bytes:
    """A PNG header claiming width x height pixels, with no pixel data (a decompression-bomb stand-in)."""

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def _bad_dataset(root, data):
    """The good records plus one record per failure mode (and non-RGB images that must load)."""
    shutil.copytree(data["root"] / "images", root / "images", dirs_exist_ok=True)
    good = [dict(r) for r in data["records"][:10]]
    conv = good[0]["conversations"]
    img = root / "images"
    (img / "zero.png").write_bytes(b"")
    (img / "corrupt.png").write_bytes(b"garbage" * 30)
    full = (img / "instruct_000001.png").read_bytes()
    (img / "truncated.png").write_bytes(full[: len(full) // 2])
    (img / "bomb.png").write_bytes(_png_header_only(50_000, 50_000))
    rgb = Image.open(img / "instruct_000002.png")
    rgb.convert("L").save(img / "grey.png")
    rgb.convert("P").save(img / "palette.gif")
    rgb.convert("CMYK").save(img / "cmyk.jpg")
    q = lambda s: [{"from": "human", "value": "<image>\n" + s}, {"from": "gpt", "value": "ok"}]  # noqa: E731
    bad = [
        {"id": "missing", "image": "images/none.png", "conversations": conv},
        {"id": "zero", "image": "images/zero.png", "conversations": conv},
        {"id": "corrupt", "image": "images/corrupt.png", "conversations": conv},
        {"id": "truncated", "image": "images/truncated.png", "conversations": conv},
        {"id": "bomb", "image": "images/bomb.png", "conversations": conv},
        {"id": "noconv", "image": "images/instruct_000001.png"},
        {"id": "text-with-placeholder", "conversations": q("hi")},
        {
            "id": "image-without-placeholder",
            "image": "images/instruct_000001.png",
            "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "ok"}],
        },
    ]
    modes = [
        {"id": f"mode-{m}", "image": f"images/{f}", "conversations": q(f"mode {m}")}
        for m, f in (("L", "grey.png"), ("P", "palette.gif"), ("CMYK", "cmyk.jpg"))
    ]
    path = root / "bad.json"
    path.write_text(json.dumps(good + modes + bad))
    return path, len(good) + len(modes), bad


def test_bad_samples_raise_naming_record_and_file(tmp_path, data, tokenizer):
    path, n_ok, bad = _bad_dataset(tmp_path, data)
    src = sources.LlavaJsonSource(path)
    for k, record in enumerate(bad):
        single = [src[n_ok + k]]  # a source of just that record
        with pytest.raises(BadSample) as info:
            list(_make(single, tokenizer, shuffle=False))
        e = info.value
        assert e.record_id == record["id"], (record["id"], e)
        if record["id"] in ("missing", "zero", "corrupt", "truncated", "bomb"):
            assert e.path.endswith(record["image"]) and record["image"].split("/")[-1] in str(e)


def test_bad_samples_skip_is_counted(tmp_path, data, tokenizer):
    path, n_ok, bad = _bad_dataset(tmp_path, data)
    src = sources.LlavaJsonSource(path)
    batches = list(_make(src, tokenizer, on_bad_sample="skip", packing=True, max_images_per_row=2))
    assert sum(int(b["meta_skipped"].sum()) for b in batches) == len(bad)
    assert sum(int(b["segment_ids"].max(axis=1).sum()) for b in batches) == n_ok


def test_workers_skip_counts_and_state(tmp_path, data, tokenizer):
    """With worker processes: skip counts survive, and the state round trip is exact."""
    path, n_ok, bad = _bad_dataset(tmp_path, data)
    src = sources.LlavaJsonSource(path)
    kw = dict(on_bad_sample="skip", worker_count=2, global_batch_size=2)
    it = _make(src, tokenizer, **kw)
    try:
        head = _take(it, 2)
        state = it.get_state()
        rest = list(it)
    finally:
        it.close()
    batches = head + rest
    assert sum(int(b["meta_skipped"].sum()) for b in batches) == len(bad)
    assert sum(int(b["segment_ids"].max(axis=1).sum()) for b in batches) == n_ok
    fresh = _make(src, tokenizer, **kw)
    try:
        fresh.set_state(state)
        _assert_same(rest, list(fresh))
    finally:
        fresh.close()


def test_array_record_source_gives_the_same_batches(tmp_path, data, tokenizer):
    pack.pack(str(data["path"]), None, str(tmp_path / "packed"), 3, progress=False)
    packed = sources.ArrayRecordSource(tmp_path / "packed")
    _assert_same(list(_make(data["src"], tokenizer, seed=5)), list(_make(packed, tokenizer, seed=5)))


def test_from_config(data, tokenizer):
    import ml_collections

    cfg = ml_collections.ConfigDict(
        dict(
            json_path=str(data["path"]),
            template="v1",
            image_size=S,
            num_image_tokens=T,
            max_length=320,
            global_batch_size=4,
            seed=2,
            num_epochs=1,
            packing=True,
            max_images_per_row=2,
        )
    )
    got = list(pipeline.from_config(cfg, tokenizer=tokenizer, shard_index=0, shard_count=1))
    want = list(_make(data["src"], tokenizer, seed=2, packing=True, max_images_per_row=2))
    _assert_same(got, want)
    # Overrides win over the config (e.g. model-derived sizes).
    got = next(pipeline.from_config(cfg, tokenizer=tokenizer, shard_index=0, shard_count=1, image_size=16))
    assert got["images"].shape[2:] == (16, 16, 3)
    with pytest.raises(TypeError, match="unknown data fields"):
        pipeline.from_config(cfg, tokenizer=tokenizer, shard_index=0, shard_count=1, imagesize=16)
    with pytest.raises(ValueError, match="exactly one"):
        pipeline.source_from_config(ml_collections.ConfigDict({"global_batch_size": 4}))


def test_argument_errors(data, tokenizer):
    with pytest.raises(ValueError, match="on_bad_sample"):
        _make(data["src"], tokenizer, on_bad_sample="ignore")
    with pytest.raises(ValueError, match="image_aspect_ratio"):
        _make(data["src"], tokenizer, image_aspect_ratio="keep")
    with pytest.raises(ValueError, match="no records"):
        _make([], tokenizer)
    assert not pipeline.in_data_worker()


def test_decoded_array_source(tokenizer):
    """A TFDS-style source with decoded pixels (`image_array`) goes through the same preprocessing."""
    from llava_jax.data.image import preprocess

    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (20 + i, 40, 3), dtype=np.uint8) for i in range(3)]

    def record_fn(a, i):
        return {
            "id": i,
            "image_array": a,
            "conversations": [{"from": "human", "value": f"<image>\nPicture {i}?"}, {"from": "gpt", "value": "Noise."}],
        }

    src = sources.MappedSource(arrays, record_fn)
    batch = next(_make(src, tokenizer, shuffle=False, global_batch_size=3, image_aspect_ratio="pad"))
    for i, a in enumerate(arrays):
        np.testing.assert_array_equal(batch["images"][i, 0], preprocess(a, S, "pad"))
