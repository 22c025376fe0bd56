"""LLaVA composite vs transformers LlavaForConditionalGeneration on the same random weights (fp32)."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hf_reference import LLAVA_IMAGE_TOKEN, llava, np_, to_v4_keys

from llava_jax.checkpoint import DictSource, from_pretrained, load_weights
from llava_jax.checkpoint.hf_config import llava_config_from_hf
from llava_jax.models import Llava

P = 16  # (56 / 14)^2 image tokens


def _batch(seed=0):
    """Row 0: two images; row 1: text only; row 2: one image. Returns ids, HF pixels, our images."""
    g = torch.Generator().manual_seed(seed)
    length = 48
    ids = torch.randint(1, 400, (3, length), generator=g)
    ids[0, 2 : 2 + P] = LLAVA_IMAGE_TOKEN
    ids[0, 25 : 25 + P] = LLAVA_IMAGE_TOKEN
    ids[2, 5 : 5 + P] = LLAVA_IMAGE_TOKEN
    pix = torch.randn(3, 3, 56, 56, generator=g)  # images a, b (row 0) and c (row 2), normalised
    ours = np.zeros((3, 2, 56, 56, 3), np.float32)
    nhwc = pix.permute(0, 2, 3, 1).numpy()
    ours[0, 0], ours[0, 1], ours[2, 0] = nhwc[0], nhwc[1], nhwc[2]
    return ids, pix, jnp.asarray(ours)


@pytest.mark.parametrize("act,projector", [("gelu", "mlp2x_gelu"), ("linear", "linear")])
@pytest.mark.parametrize("layer", [-2, -1])
@pytest.mark.parametrize("layout", ["v5_state_dict", "v4_keys"])
def test_logits_match(act, projector, layer, layout):
    ref = llava(projector_act=act, feature_layer=layer)
    cfg = llava_config_from_hf(ref.config.to_dict())
    assert cfg.projector == projector and cfg.vision.select_layer == layer
    sd = ref.state_dict() if layout == "v5_state_dict" else to_v4_keys(ref.state_dict())
    ours = load_weights(Llava(cfg, rngs=nnx.Rngs(0)), DictSource(sd))
    ids, pix, images = _batch()
    with torch.no_grad():
        want = np_(ref(input_ids=ids, pixel_values=pix, attention_mask=torch.ones_like(ids)).logits)
    got, _ = ours(jnp.asarray(ids.numpy()), images)
    diff = np.abs(np.asarray(got) - want).max()
    print(f"LLaVA {projector} layer={layer} {layout}: logits max-abs diff {diff:.1e}")
    assert diff < 1e-4, diff


def test_text_only_batch_needs_no_images():
    ref = llava()
    ours = load_weights(
        Llava(llava_config_from_hf(ref.config.to_dict()), rngs=nnx.Rngs(0)), DictSource(ref.state_dict())
    )
    ids = torch.randint(1, 400, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = np_(ref(input_ids=ids).logits)
    got, _ = ours(jnp.asarray(ids.numpy()))
    assert np.abs(np.asarray(got) - want).max() < 1e-4


def test_from_pretrained_directory(tmp_path):
    """save_pretrained -> config.json + safetensors -> llava_jax, no random init involved."""
    ref = llava(seed=2)
    ref.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path)
    ids, pix, images = _batch(seed=1)
    with torch.no_grad():
        want = np_(ref(input_ids=ids, pixel_values=pix).logits)
    got, _ = ours(jnp.asarray(ids.numpy()), images)
    assert np.abs(np.asarray(got) - want).max() < 1e-4


def test_uint8_images_are_normalised_like_clip():
    ref = llava(seed=1)
    ours = load_weights(
        Llava(llava_config_from_hf(ref.config.to_dict()), rngs=nnx.Rngs(0)), DictSource(ref.state_dict())
    )
    raw = np.random.default_rng(0).integers(0, 256, (1, 1, 56, 56, 3), dtype=np.uint8)
    mean = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
    std = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
    normalised = (raw.astype(np.float32) / 255.0 - mean) / std
    ids = np.full((1, 20), 7)
    ids[0, 2 : 2 + P] = LLAVA_IMAGE_TOKEN
    a, _ = ours(jnp.asarray(ids), jnp.asarray(raw))
    b, _ = ours(jnp.asarray(ids), jnp.asarray(normalised))
    assert np.abs(np.asarray(a) - np.asarray(b)).max() < 1e-5
