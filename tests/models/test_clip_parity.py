"""CLIP vision tower vs transformers CLIPVisionModel on the same random weights (fp32)."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hf_reference import clip_vision, np_

from llava_jax.checkpoint import DictSource, load_weights
from llava_jax.checkpoint.hf_config import vision_config_from_hf
from llava_jax.models import ClipVisionTower


@pytest.mark.parametrize("image_size,positions", [(224, 257), (336, 577)])
def test_every_hidden_state_matches(image_size, positions):
    ref = clip_vision(image_size)
    assert ref.state_dict()["embeddings.position_embedding.weight"].shape[0] == positions
    cfg = vision_config_from_hf(ref.config.to_dict())
    ours = load_weights(ClipVisionTower(cfg, rngs=nnx.Rngs(1)), DictSource(ref.state_dict()))

    pixels = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(pixel_values=pixels, output_hidden_states=True).hidden_states
    got = ours.hidden_states(jnp.asarray(pixels.permute(0, 2, 3, 1).numpy()))
    assert len(got) == len(want) == cfg.num_layers + 1
    diffs = [float(np.abs(np.asarray(g) - np_(w)).max()) for g, w in zip(got, want, strict=True)]
    print(f"CLIP {image_size}px hidden states max-abs diff per layer: {[f'{d:.1e}' for d in diffs]}")
    for i, diff in enumerate(diffs):
        assert diff < 1e-4, f"hidden_states[{i}] max-abs diff {diff}"


@pytest.mark.parametrize("select_layer,feature", [(-2, "patch"), (-1, "patch"), (-2, "cls_patch"), (1, "patch")])
def test_selected_features(select_layer, feature):
    ref = clip_vision(224, seed=3)
    cfg = dataclasses.replace(
        vision_config_from_hf(ref.config.to_dict()), select_layer=select_layer, select_feature=feature
    )
    ours = load_weights(ClipVisionTower(cfg, rngs=nnx.Rngs(1)), DictSource(ref.state_dict()))
    pixels = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hs = ref(pixel_values=pixels, output_hidden_states=True).hidden_states[select_layer]
    want = np_(hs[:, 1:] if feature == "patch" else hs)
    got = np.asarray(ours(jnp.asarray(pixels.permute(0, 2, 3, 1).numpy())))
    assert got.shape == want.shape == (1, 256 + (feature == "cls_patch"), 64)
    assert np.abs(got - want).max() < 1e-4


def test_wrong_image_size_is_a_clear_error():
    ref = clip_vision(224)
    ours = ClipVisionTower(vision_config_from_hf(ref.config.to_dict()), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"\[B, 224, 224, 3\]"):
        ours(jnp.zeros((1, 336, 336, 3)))
