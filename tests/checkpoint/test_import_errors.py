"""Checkpoint import refuses what does not fit, naming the key."""

import numpy as np
import pytest
import torch
from flax import nnx
from hf_reference import clip_vision, llama

from llava_jax.checkpoint import CheckpointMismatch, DictSource, detect_format, load_weights, open_checkpoint
from llava_jax.checkpoint.hf_config import llama_config_from_hf
from llava_jax.models import Llama, Llava, get_preset


def _setup():
    ref = llama(kv_heads=2)
    return ref, Llama(llama_config_from_hf(ref.config.to_dict()), rngs=nnx.Rngs(0))


def test_missing_key_is_named():
    ref, ours = _setup()
    sd = dict(ref.state_dict())
    del sd["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(CheckpointMismatch, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_weights(ours, DictSource(sd))


def test_unknown_key_is_named():
    ref, ours = _setup()
    sd = dict(ref.state_dict())
    sd["model.layers.3.mlp.up_proj.weight"] = sd["model.layers.0.mlp.up_proj.weight"]  # a 4th layer
    with pytest.raises(CheckpointMismatch, match=r"model\.layers\.3\.mlp\.up_proj\.weight"):
        load_weights(ours, DictSource(sd))


def test_shape_mismatch_is_named():
    ref, ours = _setup()
    sd = dict(ref.state_dict())
    sd["model.norm.weight"] = torch.ones(65)
    with pytest.raises(CheckpointMismatch, match=r"model\.norm\.weight.*\(65,\)"):
        load_weights(ours, DictSource(sd))


def test_separate_head_into_tied_model_is_refused():
    ref = llama(tied=False)
    cfg = llama_config_from_hf({**ref.config.to_dict(), "tie_word_embeddings": True})
    with pytest.raises(CheckpointMismatch, match="tie_word_embeddings"):
        load_weights(Llama(cfg, rngs=nnx.Rngs(0)), DictSource(ref.state_dict()))


def test_failed_load_leaves_model_untouched():
    ref, ours = _setup()
    before = np.asarray(ours.norm.scale[...]).copy()
    sd = dict(ref.state_dict())
    del sd["lm_head.weight"]
    with pytest.raises(CheckpointMismatch):
        load_weights(ours, DictSource(sd))
    assert np.array_equal(before, np.asarray(ours.norm.scale[...]))


def test_parts_load_into_a_llava_model(tmp_path):
    """The paper's starting point: a CLIP directory and a LLaMA directory into one LLaVA model."""
    clip, lm = clip_vision(224), llama(vocab=32064, layers=2)
    clip.save_pretrained(tmp_path / "clip")
    lm.save_pretrained(tmp_path / "llm")
    import dataclasses

    from llava_jax.checkpoint.hf_config import vision_config_from_hf

    cfg = dataclasses.replace(
        get_preset("tiny"),
        vision=vision_config_from_hf(clip.config.to_dict()),
        llm=llama_config_from_hf(lm.config.to_dict()),
    )
    model = Llava(cfg, rngs=nnx.Rngs(0))
    load_weights(model, tmp_path / "clip")
    load_weights(model, tmp_path / "llm")
    want = clip.state_dict()["encoder.layers.1.mlp.fc1.weight"].numpy().T
    assert np.array_equal(np.asarray(model.vision_tower.layers.fc1.kernel[...][1]), want)
    want = lm.state_dict()["model.layers.1.self_attn.k_proj.weight"].numpy().T
    assert np.array_equal(np.asarray(model.language_model.layers.k_proj.kernel[...][1]), want)


def test_sharded_safetensors_directory(tmp_path):
    ref, ours = _setup()
    ref.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    src = open_checkpoint(tmp_path)
    assert detect_format(src.keys()) == "hf_llama"
    load_weights(ours, src)
    assert np.array_equal(
        np.asarray(ours.embed_tokens.embedding[...]), ref.state_dict()["model.embed_tokens.weight"].numpy()
    )


def test_torch_bin_is_read_weights_only(tmp_path):
    ref, ours = _setup()
    torch.save(ref.state_dict(), tmp_path / "pytorch_model.bin")
    load_weights(ours, tmp_path)
    assert np.array_equal(np.asarray(ours.lm_head.kernel[...]), ref.state_dict()["lm_head.weight"].numpy().T)


def test_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    torch.save({"x": Evil()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        open_checkpoint(tmp_path)


def test_unknown_format_keys():
    with pytest.raises(ValueError, match="cannot tell the checkpoint format"):
        detect_format(["foo.bar", "baz"])
