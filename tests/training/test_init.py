"""Initial weights of a stage: seeded random init, then config.init parts, then a stage-1 projector."""

import jax
import numpy as np
import torch
from safetensors.torch import save_file

from llava_jax.models import get_preset
from llava_jax.parallel.mesh import make_mesh
from llava_jax.training import loop, partition
from llava_jax.training.defaults import base_config
from llava_jax.training.state import ModelSpec, param_shardings


def _setup():
    config = base_config()
    config.frozen_dtype = "float32"
    spec = ModelSpec.create(get_preset("tiny"))
    mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])
    return config, spec, partition.trainable_mask(spec.abstract, "projector,llm"), param_shardings(spec, mesh)


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
    np.testing.assert_array_equal(np.asarray(proj["linear_1"]["kernel"]), tensors["model.mm_projector.0.weight"].numpy().T)
    np.testing.assert_array_equal(np.asarray(proj["linear_2"]["bias"]), tensors["model.mm_projector.2.bias"].numpy())
    # everything else is the seeded init, identical to a run without a stage-1 projector
    base = loop.initial_params(config, spec, mask, sh, None)
    np.testing.assert_array_equal(np.asarray(params["language_model"]["norm"]["scale"]),
                                  np.asarray(base["language_model"]["norm"]["scale"]))
    assert not np.array_equal(np.asarray(base["multi_modal_projector"]["linear_1"]["kernel"]),
                              np.asarray(proj["linear_1"]["kernel"]))
