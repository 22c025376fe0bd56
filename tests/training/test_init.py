"""Initial weights of a stage: seeded random init, then config.init parts, then a stage-1 projector."""

import jax
import numpy as np
import torch
from safetensors.torch import save_file

from llava_jax.models import get_preset
from llava_jax.parallel.mesh import make_mesh
from llava_jax.training import loop
from llava_jax.training.config_schema import base_config
from llava_jax.training.state import ModelSpec, param_shardings
from llava_jax.training.trainable import trainable_mask


def _setup():
    config = base_config()
    config.frozen_dtype = "float32"
    spec = ModelSpec.create(get_preset("tiny"))
    mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])
    return config, spec, trainable_mask(spec.abstract, "projector,llm"), param_shardings(spec, mesh)


def test_original_mm_projector_file_starts_stage2(tmp_path):
    config, spec, mask, sh = _setup()
    g = torch.Generator().manual_seed(0)
    tensors = {  # the original's stage-1 output: model.mm_projector.{0,2}.{weight,bias}, torch layout
        "model.mm_projector.0.weight": torch.randn(128, 64, generator=g),
        "model.mm_projector.0.bias": torch.randn(128, generator=g),
        "model.mm_projector.2.weight": torch.randn(128, 128, generator=g),
        "model.mm_projector.2.bias": torch.randn(128, generator=g),
    }
    save_file(tensors, str(tmp_path / "mm_projector.safetensors"))
    params = loop.initial_params(config, spec, mask, sh, str(tmp_path))
    proj = params["multi_modal_projector"]
    np.testing.assert_array_equal(
        np.asarray(proj["linear_1"]["kernel"]), tensors["model.mm_projector.0.weight"].numpy().T
    )
    np.testing.assert_array_equal(np.asarray(proj["linear_2"]["bias"]), tensors["model.mm_projector.2.bias"].numpy())
    # everything else is the seeded init, identical to a run without a stage-1 projector
    base = loop.initial_params(config, spec, mask, sh, None)
    np.testing.assert_array_equal(
        np.asarray(params["language_model"]["norm"]["scale"]), np.asarray(base["language_model"]["norm"]["scale"])
    )
    assert not np.array_equal(
        np.asarray(base["multi_modal_projector"]["linear_1"]["kernel"]), np.asarray(proj["linear_1"]["kernel"])
    )


def _diff_against_defaults(d: dict, defaults: dict) -> dict:
    """transformers 4.x's `to_diff_dict` for a nested config: values differing from the class defaults."""
    return {k: v for k, v in d.items() if k == "model_type" or k not in defaults or defaults[k] != v}


def test_init_llava_reads_a_diff_style_llava_hf_directory(tmp_path):
    """A llava-hf directory of the `tiny` architecture whose config.json leaves defaults out (as the
    published llava-hf ones do: no hidden_act in vision_config) starts a run with its weights."""
    import json

    import transformers as tf

    config, spec, mask, sh = _setup()
    v, t = spec.cfg.vision, spec.cfg.llm
    torch.manual_seed(0)
    hf = tf.LlavaForConditionalGeneration(
        tf.LlavaConfig(
            vision_config=tf.CLIPVisionConfig(
                hidden_size=v.hidden_size,
                intermediate_size=v.intermediate_size,
                num_hidden_layers=v.num_layers,
                num_attention_heads=v.num_heads,
                image_size=v.image_size,
                patch_size=v.patch_size,
            ),
            text_config=tf.LlamaConfig(
                vocab_size=t.vocab_size,
                hidden_size=t.hidden_size,
                intermediate_size=t.intermediate_size,
                num_hidden_layers=t.num_layers,
                num_attention_heads=t.num_heads,
                num_key_value_heads=t.num_kv_heads,
                rms_norm_eps=t.rms_norm_eps,
                max_position_embeddings=t.max_position_embeddings,
            ),
            image_token_index=32000,
            pad_token_id=32001,
        )
    )
    hf.save_pretrained(tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    d["text_config"] = _diff_against_defaults(d["text_config"], tf.LlamaConfig().to_dict())
    d["vision_config"] = _diff_against_defaults(d["vision_config"], tf.CLIPVisionConfig().to_dict())
    assert "hidden_act" not in d["vision_config"] and "hidden_act" not in d["text_config"]
    (tmp_path / "config.json").write_text(json.dumps(d, indent=2))

    config.init.llava = str(tmp_path)
    params = loop.initial_params(config, spec, mask, sh, None)
    state = hf.state_dict()
    np.testing.assert_array_equal(
        np.asarray(params["language_model"]["embed_tokens"]["embedding"]),
        state["model.language_model.embed_tokens.weight"].numpy(),
    )
    np.testing.assert_array_equal(
        np.asarray(params["vision_tower"]["class_embedding"]),
        state["model.vision_tower.embeddings.class_embedding"].numpy(),
    )


def test_init_llava_of_another_architecture_names_the_fields(tmp_path, repo_root):
    """The published llava-1.5-7b-hf config.json against the `tiny` preset: refused before any weight
    is read, naming the differing fields and the preset that matches."""
    import shutil

    import pytest

    config, spec, mask, sh = _setup()
    shutil.copy(repo_root / "tests" / "fixtures" / "hf_configs" / "llava-1.5-7b-hf.json", tmp_path / "config.json")
    config.init.llava = str(tmp_path)
    with pytest.raises(ValueError, match=r"llm\.hidden_size: 128 != 4096.*config\.model='llava-v1\.5-7b'"):
        loop.initial_params(config, spec, mask, sh, None)
