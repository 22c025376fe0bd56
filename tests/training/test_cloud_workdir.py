"""gs:// workdirs stay in the bucket: checkpoints (orbax + tensorstore), metrics, model.json, the demo's
data and exports are written to a GCS emulator on 127.0.0.1, and no local `gs:` folder appears.

The emulator is read back with plain HTTP (`gcs_emulator.GcsEmulator.names` / `.read`), not through
the clients under test.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gcs_emulator import GcsEmulator, emulator_env

from llava_jax import paths

pytest.importorskip("gcsfs")
pytest.importorskip("gcp_storage_emulator")

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def gcs():
    emulator = GcsEmulator()
    try:
        with emulator_env(emulator):
            yield emulator
    finally:
        emulator.close()


def _local_url_folders(root: pathlib.Path) -> list[str]:
    """Anything under `root` named like a URL scheme turned into a folder (`gs:`, `s3:`, ...)."""
    return [str(p) for p in root.rglob("*") if ":" in p.name]


def test_absolute_keeps_urls_and_anchors_local_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert str(paths.absolute("gs://bucket/run") / "stage1") == "gs://bucket/run/stage1"
    assert str(paths.absolute("runs/demo")) == str(tmp_path / "runs" / "demo")
    assert paths.is_url("s3://b/x") and not paths.is_url("/data/x") and not paths.is_url("runs/x")
    with pytest.raises(ValueError, match="memory:// scheme is not supported"):
        paths.as_path("memory://bucket/run")


def test_checkpoint_metrics_and_model_json_go_to_the_bucket(gcs, tmp_path, monkeypatch):
    from llava_jax.checkpoint.params import restore_params, save_params
    from llava_jax.training.metrics import MetricWriter
    from llava_jax.training.train_checkpoint import Checkpointer

    monkeypatch.chdir(tmp_path)
    stage = "gs://bucket/unit/stage1"
    tree = {"w": jnp.arange(12.0).reshape(3, 4), "b": jnp.ones(5, jnp.int32)}
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree)

    save_params(stage + "/final_params", tree)
    back = restore_params(stage + "/final_params", abstract)
    np.testing.assert_array_equal(back["w"], np.arange(12.0).reshape(3, 4))
    np.testing.assert_array_equal(back["b"], np.ones(5, np.int32))

    ckpt = Checkpointer(stage + "/checkpoints", every=1, keep=2)
    ckpt.save(1, tree, None, final=True)
    ckpt.close()
    assert Checkpointer(stage + "/checkpoints", every=1, keep=2).latest_step() == 1

    writer = MetricWriter(stage, total_steps=2, desc="unit")
    writer.write(1, {"loss": 2.5})
    assert [json.loads(x)["loss"] for x in gcs.read("unit/stage1/metrics.jsonl").decode().splitlines()] == [2.5]
    writer.write(2, {"loss": 1.5})  # appends: the object keeps both rows
    writer.close()
    rows = [json.loads(x) for x in gcs.read("unit/stage1/metrics.jsonl").decode().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 2.5), (2, 1.5)]

    names = gcs.names("unit/")
    assert any(n.startswith("unit/stage1/final_params/") for n in names), names
    assert any(n.startswith("unit/stage1/checkpoints/1/") for n in names), names
    assert _local_url_folders(tmp_path) == []


@pytest.mark.slow
def test_train_with_gs_workdir_writes_the_run_to_the_bucket(gcs, tmp_path):
    """`python -m llava_jax.train --workdir gs://bucket/run` (the TPU-pod command) from an empty folder:
    data, both stages, eval and summary in the bucket; chat/export load it back from there."""
    env = {**os.environ, **gcs.env, "XLA_FLAGS": "", "PYTHONPATH": str(REPO)}
    args = [
        "--workdir=gs://bucket/run",
        "--config.synthetic.num_pretrain=16",
        "--config.synthetic.num_instruct=16",
        "--config.synthetic.num_eval=4",
        "--config.log_every=1",
        "--config.eval.max_examples=4",
        "--config.eval.batch_size=4",
        "--config.eval.max_new_tokens=2",
    ]
    for stage in ("stage1", "stage2"):
        args += [
            f"--config.{stage}.batch_size=8",
            f"--config.{stage}.num_steps=2",
            f"--config.{stage}.checkpoint_every=1",
            f"--config.{stage}.keep_checkpoints=1",
        ]
    r = subprocess.run(
        [sys.executable, "-m", "llava_jax.train", *args],
        check=False,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert r.returncode == 0, r.stderr[-3000:]

    assert _local_url_folders(tmp_path) == [] and not any(tmp_path.iterdir()), sorted(map(str, tmp_path.rglob("*")))
    names = set(gcs.names("run/"))
    for expected in (
        "run/config.json",
        "run/summary.json",
        "run/data/meta.json",
        "run/data/pretrain.json",
        "run/stage1/model.json",
        "run/stage1/DONE",
        "run/stage2/model.json",
        "run/stage2/DONE",
    ):
        assert expected in names, sorted(names)
    for stage in ("stage1", "stage2"):
        assert any(n.startswith(f"run/{stage}/final_params/") for n in names)
        assert any(n.startswith(f"run/{stage}/checkpoints/2/") for n in names)
        rows = [json.loads(x) for x in gcs.read(f"run/{stage}/metrics.jsonl").decode().splitlines()]
        assert [row["step"] for row in rows] == [1, 2] and all(np.isfinite(row["loss"]) for row in rows)
    summary = json.loads(gcs.read("run/summary.json"))
    assert summary["stage2"]["steps"] == 2 and summary["eval"]["n"] == 4

    # Restorable from the bucket: the final parameters equal the last checkpoint's.
    from flax import nnx

    from llava_jax.checkpoint.stage_dir import load_model
    from llava_jax.training.train_checkpoint import Checkpointer

    loaded = load_model("gs://bucket/run")
    assert str(loaded.path) == "gs://bucket/run/stage2"
    final = nnx.state(loaded.model).to_pure_dict()
    ckpt = Checkpointer("gs://bucket/run/stage2/checkpoints", every=1, keep=1)
    assert ckpt.latest_step() == 2
    import orbax.checkpoint as ocp

    saved = ckpt.manager.restore(2, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    ckpt.close()
    proj = saved["params"]["multi_modal_projector"]
    np.testing.assert_array_equal(
        np.asarray(final["multi_modal_projector"]["linear_1"]["kernel"]), np.asarray(proj["linear_1"]["kernel"])
    )

    # Export to the bucket, then read the llava-hf directory back from there.
    from llava_jax.convert.export import export_checkpoint

    export_checkpoint("gs://bucket/run", "gs://bucket/hf", dtype="float32")
    hf = set(gcs.names("hf/"))
    for expected in (
        "hf/config.json",
        "hf/model.safetensors.index.json",
        "hf/tokenizer_config.json",
        "hf/preprocessor_config.json",
    ):
        assert expected in hf, sorted(hf)
    again = nnx.state(load_model("gs://bucket/hf").model).to_pure_dict()
    np.testing.assert_array_equal(
        np.asarray(again["multi_modal_projector"]["linear_1"]["kernel"]),
        np.asarray(final["multi_modal_projector"]["linear_1"]["kernel"]),
    )
    assert _local_url_folders(tmp_path) == []


def test_data_written_read_and_packed_in_the_bucket(gcs, tmp_path, monkeypatch):
    """Synthetic data written to the bucket, read back as a LLaVA JSON source (images through the URL),
    packed into ArrayRecord shards uploaded to the bucket, and read back from there."""
    from llava_jax.data.image import open_image
    from llava_jax.data.pack import pack
    from llava_jax.data.sources import ArrayRecordSource, LlavaJsonSource
    from llava_jax.data.synthetic import generate

    monkeypatch.chdir(tmp_path)
    generate("gs://bucket/data", image_size=32, num_pretrain=3, num_instruct=2, num_eval=1, seed=0)
    source = LlavaJsonSource("gs://bucket/data/pretrain.json")
    assert len(source) == 3 and source.image_folder == "gs://bucket/data"
    record = source[1]
    assert record["image_path"] == "gs://bucket/data/" + record["image"]
    assert open_image(record["image_path"]).size == (32, 32)

    summary = pack("gs://bucket/data/pretrain.json", None, "gs://bucket/packed", 2, progress=False)
    assert summary["records_written"] == 3
    names = gcs.names("packed/")
    assert names == sorted(
        ["packed/bad_records.jsonl", "packed/pack_summary.json"]
        + [f"packed/pretrain-0000{k}-of-00002.array_record" for k in range(2)]
    ), names
    packed = ArrayRecordSource("gs://bucket/packed")  # ArrayRecord's own GCS client, at the emulator
    assert packed.paths == [f"gs://bucket/packed/pretrain-0000{k}-of-00002.array_record" for k in range(2)]
    assert [packed[i]["conversations"] for i in range(3)] == [source[i]["conversations"] for i in range(3)]
    assert packed[1]["image_bytes"] == gcs.read("data/" + record["image"])
    assert _local_url_folders(tmp_path) == [] and not any(tmp_path.iterdir())
