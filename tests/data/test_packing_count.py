"""`count_batches`: the number of batches of a finite run, known before it starts (packing needs it
for the step count of its epochs), equal to what the pipeline then gives."""

import pytest
from test_pipeline import _make, data, tokenizer  # noqa: F401 (fixtures)

from llava_jax.data import pipeline
from llava_jax.data.settings import DataSettings


def _settings(**kw):
    base = dict(template="v1", image_aspect_ratio="square", max_length=320, on_bad_sample="raise")
    return DataSettings(**{**base, **kw})


@pytest.mark.parametrize(
    ("packing", "grouped", "epochs", "batch"),
    [(True, False, 1, 4), (True, False, 2, 2), (False, False, 1, 4), (True, True, 1, 4), (True, False, 0.5, 4)],
)
def test_count_equals_the_pipeline(data, tokenizer, packing, grouped, epochs, batch):  # noqa: F811
    src = data["src"]
    settings = _settings(packing=packing, group_by_modality_length=grouped)
    counted = pipeline.count_batches(
        src, tokenizer=tokenizer, num_image_tokens=4, global_batch_size=batch, seed=0, epochs=epochs, settings=settings
    )
    kw = dict(packing=packing, group_by_modality_length=grouped, global_batch_size=batch)
    if epochs == int(epochs):
        assert counted == len(list(_make(src, tokenizer, num_epochs=int(epochs), **kw)))
    else:  # half an epoch: the batches that hold the first half of the first epoch's records
        full = pipeline.count_batches(
            src, tokenizer=tokenizer, num_image_tokens=4, global_batch_size=batch, seed=0, epochs=1, settings=settings
        )
        assert full // 2 - 1 <= counted <= full // 2 + 1
    if packing:  # packing needs fewer rows than one sample per row
        rows = counted * batch
        assert rows < len(src) * epochs


def test_count_per_shard(data, tokenizer):  # noqa: F811
    src = data["src"]
    settings = _settings(packing=True)
    for shard in range(2):
        counted = pipeline.count_batches(
            src,
            tokenizer=tokenizer,
            num_image_tokens=4,
            global_batch_size=4,
            seed=1,
            epochs=1,
            settings=settings,
            shard_index=shard,
            shard_count=2,
        )
        it = _make(src, tokenizer, packing=True, seed=1, shard_index=shard, shard_count=2, global_batch_size=4)
        assert counted == len(list(it))
