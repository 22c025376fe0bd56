"""Published Hugging Face config.json files, verbatim (tests/fixtures/hf_configs, sources in its
README), read through llava_jax and built at full size with `nnx.eval_shape` (nothing allocated):
the architecture is the published one and the parameter count equals transformers' own model built
from the same file on the meta device."""

import json
import pathlib

import jax
import numpy as np
import pytest
import torch
import transformers as tf
from flax import nnx

from llava_jax.convert import hf_config
from llava_jax.convert.load import config_from_hf
from llava_jax.models import Llava
from llava_jax.models.presets import VOCAB

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "hf_configs"


def _published(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def _count_ours(build) -> int:
    model = nnx.eval_shape(build)
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    return int(sum(np.prod(x.shape) for x in leaves))


def _count_hf(build) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in build().parameters())


def test_llava_15_7b_hf():
    """A diff against transformers' defaults: text_config names no width, depth or heads."""
    d = _published("llava-1.5-7b-hf")
    assert "num_attention_heads" not in d["text_config"] and "hidden_act" not in d["vision_config"]
    cls, cfg = config_from_hf(d)
    assert cls is Llava
    v, t = cfg.vision, cfg.llm
    assert (v.image_size, v.patch_size, v.hidden_size, v.intermediate_size, v.num_layers, v.num_heads) == (
        336, 14, 1024, 4096, 24, 16)
    assert (v.select_layer, v.select_feature, cfg.num_image_tokens) == (-2, "patch", 576)
    assert (t.vocab_size, t.hidden_size, t.intermediate_size, t.num_layers, t.num_heads, t.num_kv_heads) == (
        32064, 4096, 11008, 32, 32, 32)
    assert (t.rms_norm_eps, t.max_position_embeddings, t.rope_theta, t.rope_type) == (1e-5, 4096, 10000.0, "default")
    assert (cfg.projector, cfg.image_token_id, cfg.pad_token_id, t.tie_word_embeddings) == (
        "mlp2x_gelu", 32000, 32001, False)
    ours = _count_ours(lambda: Llava(cfg, rngs=nnx.Rngs(0)))
    hf = _count_hf(lambda: tf.LlavaForConditionalGeneration(tf.LlavaConfig.from_dict(d)))
    print(f"llava-1.5-7b-hf: {ours:,} parameters (transformers {hf:,})")
    assert ours == hf


def test_original_llava_v15_7b():
    """liuhaotian/llava-v1.5-7b: a LLaMA config with `mm_*` fields, 32000 vocabulary rows (fitted into
    llava-hf's 32064), the tower named by mm_vision_tower. It is the model llava-1.5-7b-hf republished,
    so the two must have the same parameters."""
    d = _published("llava-v1.5-7b")
    assert hf_config.is_original_llava(d)
    vision = hf_config.original_vision_config(d, None)
    cfg, aspect = hf_config.original_llava_config(d, vision, vocab_size=VOCAB)
    t = cfg.llm
    assert aspect == "pad" and cfg.projector == "mlp2x_gelu"
    assert (cfg.vision.image_size, cfg.vision.select_layer, cfg.vision.select_feature) == (336, -2, "patch")
    assert (t.hidden_size, t.intermediate_size, t.num_layers, t.num_heads, t.rms_norm_eps) == (
        4096, 11008, 32, 32, 1e-5)
    ours = _count_ours(lambda: Llava(cfg, rngs=nnx.Rngs(0)))
    hf_llava = _count_hf(lambda: tf.LlavaForConditionalGeneration(tf.LlavaConfig.from_dict(
        _published("llava-1.5-7b-hf"))))
    assert ours == hf_llava
    # The language model alone: transformers' LLaMA from this very file, plus the 64 added rows of
    # the input and output embeddings.
    lm = _count_ours(lambda: Llava(cfg, rngs=nnx.Rngs(0)).language_model)
    hf_lm = _count_hf(lambda: tf.LlamaForCausalLM(tf.LlamaConfig.from_dict(d)))
    assert lm == hf_lm + 2 * (VOCAB - 32000) * t.hidden_size
