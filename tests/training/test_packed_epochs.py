"""Packing in the loop: the step count of `epochs` passes is counted before the run and equals the
batches the pipeline gives for those passes; metrics report padding and real tokens per second."""

import json
import types

import numpy as np
import pytest

from llava_jax.data import pipeline, synthetic
from llava_jax.data.tokenizer import load_tokenizer
from llava_jax.models import get_preset
from llava_jax.training import loop
from llava_jax.training.config_schema import base_config


@pytest.fixture(scope="module")
def instruct(tmp_path_factory):
    root = tmp_path_factory.mktemp("packed")
    synthetic.generate(str(root), image_size=32, num_pretrain=0, num_instruct=30, num_eval=0, seed=1)
    return root / "instruct.json"


def test_stage2_packs_by_default():
    assert base_config().stage2.data.packing
    assert not base_config().stage1.data.packing


@pytest.mark.parametrize("epochs", [2])
def test_packed_steps_equal_the_pipeline_batches(instruct, epochs):
    config = base_config()
    stage = config.stage2
    stage.update(batch_size=2, epochs=epochs)
    stage.data.update(json_path=str(instruct), max_length=512, on_bad_sample="raise")
    cfg = get_preset("tiny")
    _, source = loop.data_iterator(config, stage, cfg)
    steps = loop.total_steps(config, stage, source, cfg)
    finite = pipeline.make_batches(
        source,
        tokenizer=load_tokenizer(),
        image_size=cfg.vision.image_size,
        num_image_tokens=cfg.num_image_tokens,
        global_batch_size=2,
        seed=config.seed,
        num_epochs=epochs,
        shard_index=0,
        shard_count=1,
        settings=pipeline.DataSettings.from_mapping(stage.data),
    )
    batches = list(finite)
    assert steps == len(batches)
    assert steps < len(json.loads(instruct.read_text())) * epochs / 2  # packing filled fewer rows
    assert sum(int(b["segment_ids"].max(axis=1).sum()) for b in batches) == 30 * epochs  # every sample


def test_padding_fraction_and_effective_tokens():
    setup = types.SimpleNamespace(
        spec=types.SimpleNamespace(cfg=get_preset("tiny")),
        mesh=types.SimpleNamespace(size=1),
        stage=types.SimpleNamespace(trainable="projector,llm"),
    )
    meter = loop.Throughput(setup)
    meter.restart(0)
    local = {"input_ids": np.zeros((4, 100), np.int32), "images": np.zeros((4, 1, 64, 64, 3), np.uint8)}
    out = meter.figures(2, tokens=300.0, local=local, skipped=0)
    assert out["padding_fraction"] == pytest.approx(0.25)
    assert out["effective_tokens_per_s"] == pytest.approx(out["tokens_per_s"] * 0.75)
