"""Real presets: parameter counts against transformers on the meta device; abstract creation; bf16."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tf
from flax import nnx

from llava_jax.models import PRESETS, Llava, get_preset


def _ours_count(cfg) -> int:
    model = nnx.eval_shape(lambda: Llava(cfg, rngs=nnx.Rngs(0)))
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def _hf_vision(v):
    return tf.CLIPVisionConfig(
        hidden_size=v.hidden_size,
        intermediate_size=v.intermediate_size,
        num_hidden_layers=v.num_layers,
        num_attention_heads=v.num_heads,
        image_size=v.image_size,
        patch_size=v.patch_size,
        hidden_act="quick_gelu",
    )


def _hf_text(t):
    return tf.LlamaConfig(
        vocab_size=t.vocab_size,
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_layers,
        num_attention_heads=t.num_heads,
        num_key_value_heads=t.num_kv_heads,
        tie_word_embeddings=t.tie_word_embeddings,
    )


def _numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", [n for n in PRESETS])
def test_parameter_count_equals_transformers(name):
    cfg = PRESETS[name]
    with torch.device("meta"):
        if cfg.projector == "mlp2x_gelu":  # llava-hf's own architecture
            hf = _numel(
                tf.LlavaForConditionalGeneration(
                    tf.LlavaConfig(
                        vision_config=_hf_vision(cfg.vision), text_config=_hf_text(cfg.llm), projector_hidden_act="gelu"
                    )
                )
            )
        else:  # the paper's single linear layer: CLIP tower + nn.Linear + LLaMA
            hf = (
                _numel(tf.CLIPVisionModel(_hf_vision(cfg.vision)))
                + _numel(torch.nn.Linear(cfg.vision.hidden_size, cfg.llm.hidden_size))
                + _numel(tf.LlamaForCausalLM(_hf_text(cfg.llm)))
            )
    assert _ours_count(cfg) == hf


def test_real_presets_have_the_papers_shapes():
    assert get_preset("vicuna-7b").num_image_tokens == 256
    assert get_preset("llava-v1.5-13b").num_image_tokens == 576
    assert get_preset("llava-v1.5-7b").vision.num_positions == 577
    assert get_preset("vicuna-13b").llm.hidden_size == 5120


@pytest.mark.parametrize("name", ["vicuna-13b", "llava-v1.5-7b"])
def test_abstract_creation_allocates_nothing(name):
    model = nnx.eval_shape(lambda: Llava(get_preset(name), rngs=nnx.Rngs(0)))
    leaves = jax.tree.leaves(nnx.state(model))
    assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)


def test_bf16_forward_close_to_fp32():
    cfg = get_preset("tiny")
    m32 = Llava(cfg, rngs=nnx.Rngs(0))
    m16 = Llava(cfg.with_runtime(dtype=jnp.bfloat16), rngs=nnx.Rngs(0))  # same seed, same weights
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 32000, (2, 96))
    ids[0, 4 : 4 + cfg.num_image_tokens] = cfg.image_token_id
    images = rng.integers(0, 256, (2, 1, 64, 64, 3), dtype=np.uint8)
    a, _ = m32(jnp.asarray(ids), jnp.asarray(images))
    b, _ = m16(jnp.asarray(ids), jnp.asarray(images))
    assert b.dtype == jnp.float32 and np.isfinite(np.asarray(b)).all()
    err = np.abs(np.asarray(a) - np.asarray(b)).max()
    scale = np.abs(np.asarray(a)).max()
    assert err < 0.03 * scale, (err, scale)
    # the top token agrees almost everywhere
    agree = (np.asarray(a).argmax(-1) == np.asarray(b).argmax(-1)).mean()
    assert agree > 0.9
