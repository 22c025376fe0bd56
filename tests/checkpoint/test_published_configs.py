"""Published Hugging Face config.json files, verbatim (tests/fixtures/hf_configs, sources in its
README), read through llava_jax and built at full size with `nnx.eval_shape` (nothing allocated):
the architecture is the published one and the parameter count equals transformers' own model built
from the same file on the meta device."""

import dataclasses
import json
import pathlib

import jax
import numpy as np
import pytest
import torch
import transformers as tf
from flax import nnx

from llava_jax.checkpoint import hf_config
from llava_jax.checkpoint.hf_load import config_from_hf
from llava_jax.models import ClipVisionTower, Llama, Llava, get_preset
from llava_jax.models.config import architecture_differences
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
        336,
        14,
        1024,
        4096,
        24,
        16,
    )
    assert (v.select_layer, v.select_feature, cfg.num_image_tokens) == (-2, "patch", 576)
    assert (t.vocab_size, t.hidden_size, t.intermediate_size, t.num_layers, t.num_heads, t.num_kv_heads) == (
        32064,
        4096,
        11008,
        32,
        32,
        32,
    )
    assert (t.rms_norm_eps, t.max_position_embeddings, t.rope_theta, t.rope_type) == (1e-5, 4096, 10000.0, "default")
    assert (cfg.projector, cfg.image_token_id, cfg.pad_token_id, t.tie_word_embeddings) == (
        "mlp2x_gelu",
        32000,
        32001,
        False,
    )
    assert architecture_differences(get_preset("llava-v1.5-7b"), cfg) == []
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
        4096,
        11008,
        32,
        32,
        1e-5,
    )
    assert architecture_differences(get_preset("llava-v1.5-7b"), cfg) == []
    ours = _count_ours(lambda: Llava(cfg, rngs=nnx.Rngs(0)))
    hf_llava = _count_hf(
        lambda: tf.LlavaForConditionalGeneration(tf.LlavaConfig.from_dict(_published("llava-1.5-7b-hf")))
    )
    assert ours == hf_llava
    # The language model alone: transformers' LLaMA from this very file, plus the 64 added rows of
    # the input and output embeddings.
    lm = _count_ours(lambda: Llava(cfg, rngs=nnx.Rngs(0)).language_model)
    hf_lm = _count_hf(lambda: tf.LlamaForCausalLM(tf.LlamaConfig.from_dict(d)))
    assert lm == hf_lm + 2 * (VOCAB - 32000) * t.hidden_size


def _diff_against_defaults(d: dict, defaults: dict) -> dict:
    """What transformers 4.x wrote for a nested config (`to_diff_dict`): only the values that differ
    from the class defaults, plus model_type."""
    return {k: v for k, v in d.items() if k == "model_type" or k not in defaults or defaults[k] != v}


def test_diff_format_directory_loads_everywhere(tmp_path):
    """A small llava-hf directory whose config.json is written in the published style (sizes left to
    transformers' defaults: 32 attention heads, quick_gelu) goes through from_pretrained, `convert
    import` and load_model, and computes transformers' logits."""
    from hf_reference import np_, perturb_

    from llava_jax.checkpoint import from_pretrained
    from llava_jax.convert import import_checkpoint
    from llava_jax.inference import load_model

    torch.manual_seed(0)
    text = tf.LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
    )
    vision = tf.CLIPVisionConfig(
        hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, image_size=56, patch_size=14
    )
    cfg = tf.LlavaConfig(vision_config=vision, text_config=text, image_token_index=500, image_seq_length=16)
    cfg._attn_implementation = "eager"
    ref = perturb_(tf.LlavaForConditionalGeneration(cfg), 0)
    hf_dir = tmp_path / "hf"
    ref.save_pretrained(hf_dir)
    written = json.loads((hf_dir / "config.json").read_text())
    written["text_config"] = _diff_against_defaults(written["text_config"], tf.LlamaConfig().to_dict())
    written["vision_config"] = _diff_against_defaults(written["vision_config"], tf.CLIPVisionConfig().to_dict())
    assert not {"num_attention_heads", "num_key_value_heads", "hidden_act"} & set(written["text_config"])
    assert "hidden_act" not in written["vision_config"]
    (hf_dir / "config.json").write_text(json.dumps(written, indent=2))

    ids = torch.randint(0, 500, (1, 30), generator=torch.Generator().manual_seed(0))
    ids[0, 5:21] = 500
    pixels = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = np_(ref(input_ids=ids, pixel_values=pixels).logits)
    images = np.asarray(pixels.permute(0, 2, 3, 1).numpy())[:, None]

    model = from_pretrained(hf_dir)
    assert model.cfg.llm.num_heads == 32 and model.cfg.llm.head_dim == 2
    got, _ = model(np.asarray(ids.numpy()), images)
    diff = np.abs(np.asarray(got) - want).max()
    print(f"llava-hf directory with a diff-style config: logits max-abs diff {diff:.1e}")
    assert diff < 1e-4

    def params(m):
        return {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(m, nnx.Param))}

    expected = params(model)
    import_checkpoint(hf_dir, tmp_path / "stage")
    for loaded in (load_model(hf_dir).model, load_model(tmp_path / "stage").model):
        assert loaded.cfg.llm == model.cfg.llm and loaded.cfg.vision == model.cfg.vision
        got_params = params(loaded)
        assert got_params.keys() == expected.keys()
        assert all(np.array_equal(got_params[k], expected[k]) for k in expected)


def test_llava_15_13b_hf():
    """llava-hf/llava-1.5-13b-hf at an early commit: `LlavaForCausalLM`, the vocabulary padded to 32128
    rows, no `hidden_act` anywhere. Everything but the vocabulary is the 13B preset."""
    d = _published("llava-1.5-13b-hf")
    cls, cfg = config_from_hf(d)
    assert cls is Llava
    t = cfg.llm
    assert (t.vocab_size, t.hidden_size, t.intermediate_size, t.num_layers, t.num_heads, t.num_kv_heads) == (
        32128,
        5120,
        13824,
        40,
        40,
        40,
    )
    assert (cfg.vision.image_size, cfg.vision.num_layers, cfg.vision.select_layer, cfg.num_image_tokens) == (
        336,
        24,
        -2,
        576,
    )
    assert (cfg.projector, cfg.image_token_id, cfg.pad_token_id) == ("mlp2x_gelu", 32000, 32001)
    diffs = architecture_differences(get_preset("llava-v1.5-13b"), cfg)
    assert len(diffs) == 1 and "vocab_size" in diffs[0], diffs
    ours = _count_ours(lambda: Llava(cfg, rngs=nnx.Rngs(0)))
    hf = _count_hf(lambda: tf.LlavaForConditionalGeneration(tf.LlavaConfig.from_dict(d)))
    print(f"llava-1.5-13b-hf: {ours:,} parameters (transformers {hf:,})")
    assert ours == hf


@pytest.mark.parametrize(
    "name,width,mlp,layers,preset",
    [("vicuna-7b-v1.5", 4096, 11008, 32, "llava-v1.5-7b"), ("vicuna-13b-v1.5", 5120, 13824, 40, "llava-v1.5-13b")],
)
def test_vicuna_v15(name, width, mlp, layers, preset):
    """lmsys Vicuna v1.5: the LLM LLaVA-1.5 starts from, with LLaMA-2's 4096 positions and 1e-5 eps."""
    d = _published(name)
    t = hf_config.llama_config_from_hf(d)
    assert (t.vocab_size, t.hidden_size, t.intermediate_size, t.num_layers, t.num_heads, t.num_kv_heads) == (
        32000,
        width,
        mlp,
        layers,
        layers,
        layers,
    )
    assert (t.rms_norm_eps, t.max_position_embeddings, t.rope_type, t.tie_word_embeddings) == (
        1e-5,
        4096,
        "default",
        False,
    )
    assert dataclasses.replace(t, vocab_size=VOCAB) == get_preset(preset).llm
    ours = _count_ours(lambda: Llama(t, rngs=nnx.Rngs(0)))
    hf = _count_hf(lambda: tf.LlamaForCausalLM(tf.LlamaConfig.from_dict(d)))
    print(f"{name}: {ours:,} parameters (transformers {hf:,})")
    assert ours == hf


@pytest.mark.parametrize("name,image_size", [("clip-vit-large-patch14-336", 336), ("clip-vit-large-patch14", 224)])
def test_clip_vit_large(name, image_size):
    """A full CLIPConfig (text and vision parts) in the diff format: hidden_act, layer_norm_eps and (224 px)
    image_size come from transformers' defaults; only the vision tower is read."""
    d = _published(name)
    assert d["model_type"] == "clip" and "text_config" in d and "hidden_act" not in d["vision_config"]
    v = hf_config.vision_config_from_hf(d)
    assert (v.image_size, v.patch_size, v.hidden_size, v.intermediate_size, v.num_layers, v.num_heads) == (
        image_size,
        14,
        1024,
        4096,
        24,
        16,
    )
    assert v.layer_norm_eps == 1e-5 and v.num_patches == (image_size // 14) ** 2
    preset = get_preset("llava-v1.5-7b" if image_size == 336 else "vicuna-7b").vision
    assert dataclasses.replace(v, select_layer=preset.select_layer, select_feature=preset.select_feature) == preset
    ours = _count_ours(lambda: ClipVisionTower(v, rngs=nnx.Rngs(0)))
    hf = _count_hf(lambda: tf.CLIPVisionModel(tf.CLIPConfig.from_dict(d).vision_config))
    print(f"{name} vision tower: {ours:,} parameters (transformers {hf:,})")
    assert ours == hf
