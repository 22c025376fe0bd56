"""Export to Hugging Face directories: transformers loads them and computes the same thing, and
import reads them back bit for bit."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tf
from flax import nnx
from PIL import Image

from llava_jax.checkpoint import from_pretrained, save_stage
from llava_jax.checkpoint.shards import parse_size
from llava_jax.convert import export_llama_hf, export_llava_hf
from llava_jax.convert.__main__ import main
from llava_jax.convert.hf_processor import write_processor, write_tokenizer
from llava_jax.data.image import normalize, preprocess
from llava_jax.data.templates import get_template
from llava_jax.inference import generate, load_model
from llava_jax.models import Llama, LlamaConfig, Llava, LlavaConfig, VisionConfig
from llava_jax.parallel.tree_paths import path_str

IMAGE, EOS, PAD = 32000, 2, 32001
N_IMG = 16  # (56 / 14)^2


def _config(projector: str) -> LlavaConfig:
    return LlavaConfig(
        VisionConfig(image_size=56, patch_size=14, hidden_size=48, intermediate_size=96, num_layers=3, num_heads=4),
        LlamaConfig(
            vocab_size=32064,
            hidden_size=64,
            intermediate_size=160,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            rms_norm_eps=1e-5,
            rope_theta=20000.0,
            max_position_embeddings=256,
        ),
        projector,
    )


def _perturb(module, seed: int, scale: float = 0.05):
    """Noise on every parameter, so norms and biases are not at their trivial init values."""
    rng = np.random.default_rng(seed)
    state = nnx.state(module, nnx.Param)
    for _, var in nnx.to_flat_state(state):
        var.value = var.value + jnp.asarray(scale * rng.standard_normal(var.value.shape), var.value.dtype)
    nnx.update(module, state)
    return module


def _params(module) -> dict:
    return {path_str(p): np.asarray(v.value) for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def _assert_same_params(a, b):
    pa, pb = _params(a), _params(b)
    assert sorted(pa) == sorted(pb)
    for k in pa:
        assert pa[k].dtype == pb[k].dtype and np.array_equal(pa[k], pb[k]), k


@pytest.fixture(scope="module", params=["mlp2x_gelu", "linear"])
def exported(request, tmp_path_factory):
    """(our model, fp32 llava-hf directory, transformers model loaded from it)."""
    model = _perturb(Llava(_config(request.param), rngs=nnx.Rngs(0)), seed=1)
    out = tmp_path_factory.mktemp(f"hf_{request.param}")
    export_llava_hf(model, out, dtype="float32", max_shard_size="400KB", template="v1", image_aspect_ratio="pad")
    ref = tf.LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    return model, out, ref


def test_files_config_and_shards(exported):
    model, out, ref = exported
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["image_token_index"] == IMAGE and cfg["pad_token_id"] == PAD
    assert cfg["projector_hidden_act"] == ("gelu" if model.cfg.projector == "mlp2x_gelu" else "linear")
    assert cfg["vision_feature_layer"] == -2 and cfg["vision_feature_select_strategy"] == "default"
    assert cfg["image_seq_length"] == N_IMG and cfg["image_aspect_ratio"] == "pad"
    assert ref.config.text_config.rope_parameters["rope_theta"] == 20000.0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((out / s).exists() for s in shards)
    assert "language_model.model.layers.1.mlp.down_proj.weight" in index["weight_map"]
    assert "vision_tower.vision_model.encoder.layers.2.self_attn.q_proj.weight" in index["weight_map"]
    assert "multi_modal_projector.linear_2.weight" in index["weight_map"]  # identity for `linear`


def test_logits_match_transformers(exported):
    """A batch with an image row and a text-only row, fp32."""
    model, _, ref = exported
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 32000, (2, 30), generator=g)
    ids[0, 3 : 3 + N_IMG] = IMAGE
    pixels = torch.randn(1, 3, 56, 56, generator=g)
    with torch.no_grad():
        want = ref(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids)).logits.numpy()
    images = np.zeros((2, 1, 56, 56, 3), np.float32)
    images[0, 0] = pixels[0].permute(1, 2, 0).numpy()
    got, _ = model(jnp.asarray(ids.numpy()), jnp.asarray(images))
    diff = float(np.abs(np.asarray(got) - want).max())
    print(f"{model.cfg.projector}: max |logits diff| = {diff:.2e}")
    assert diff < 1e-4


def _hf_greedy(ref, prompts, max_new_tokens, pixel_values):
    t = max(map(len, prompts))
    ids = torch.full((len(prompts), t), PAD)
    mask = torch.zeros((len(prompts), t), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, t - len(p) :] = torch.tensor(p)
        mask[b, t - len(p) :] = 1
    with torch.no_grad():
        out = ref.generate(
            input_ids=ids,
            attention_mask=mask,
            pixel_values=pixel_values,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=EOS,
            pad_token_id=PAD,
            output_scores=True,
            return_dict_in_generate=True,
        )
    scores = torch.stack(out.scores, 1)
    top2 = torch.topk(scores, 2, dim=-1).values
    margin = float((top2[..., 0] - top2[..., 1]).min())
    rows = []
    for b in range(len(prompts)):
        new = out.sequences[b, t:].tolist()
        rows.append(new[: new.index(EOS)] if EOS in new else new)
    return rows, margin


def test_greedy_tokens_match_transformers(exported):
    model, _, ref = exported
    rng = np.random.default_rng(5)
    text = [rng.integers(3, 32000, n).tolist() for n in (5, 4, 9)]
    prompts = [[1] + text[0] + [IMAGE] * N_IMG + text[1], [1] + text[2]]
    pixels = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    want, margin = _hf_greedy(ref, prompts, 8, pixels)
    print(f"{model.cfg.projector}: greedy margin {margin:.2e}, tokens {want}")
    assert margin > 1e-3, f"near-tie in the reference logits ({margin}); pick another seed"
    images = np.zeros((2, 1, 56, 56, 3), np.float32)
    images[0, 0] = pixels[0].permute(1, 2, 0).numpy()
    got = generate(model, prompts, images, max_new_tokens=8, eos_ids=(EOS,))
    assert got == want and all(got)


def test_import_back_is_bit_exact(exported):
    model, out, _ = exported
    _assert_same_params(model, from_pretrained(out))


def test_cli_stage_to_hf_and_back(tmp_path):
    """stage dir -> `export` CLI (fp32) -> llava-hf dir -> `import` CLI -> stage dir: same arrays,
    template and aspect ratio."""
    model = _perturb(Llava(_config("linear"), rngs=nnx.Rngs(2)), seed=2)
    save_stage(model, tmp_path / "stage", template="llava_v1", image_aspect_ratio="square")
    assert (
        main(["export", "--checkpoint", str(tmp_path / "stage"), "--out", str(tmp_path / "hf"), "--dtype", "float32"])
        == 0
    )
    assert (
        main(["import", "--from", str(tmp_path / "hf"), "--out", str(tmp_path / "back"), "--template", "llava_v1"]) == 0
    )
    loaded = load_model(tmp_path / "back")
    _assert_same_params(model, loaded.model)
    assert loaded.image_aspect_ratio == "square" and loaded.template == "llava_v1"
    proc = tf.AutoProcessor.from_pretrained(tmp_path / "hf")
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    assert proc.apply_chat_template(chat, add_generation_prompt=True) == get_template("llava_v1").prompt(
        ["<image>\nWhat is it?"]
    )


def test_bfloat16_export_rounds_once(tmp_path):
    model = _perturb(Llava(_config("mlp2x_gelu"), rngs=nnx.Rngs(4)), seed=4)
    export_llava_hf(model, tmp_path, dtype="bfloat16")
    back = from_pretrained(tmp_path)
    for key, a in _params(model).items():
        assert np.array_equal(np.asarray(jnp.asarray(a, jnp.bfloat16), np.float32), _params(back)[key]), key


@pytest.mark.parametrize("aspect", ["square", "pad"])
def test_processor_matches_our_preprocessing(tmp_path, aspect):
    cfg = _config("mlp2x_gelu")
    write_tokenizer(tmp_path, template="v1", max_length=256)
    write_processor(tmp_path, cfg, image_aspect_ratio=aspect, template="v1")
    proc = tf.AutoProcessor.from_pretrained(tmp_path)
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:70, 0:110]
    pixels = np.stack([x * 2, y * 3, (x + y)], -1) % 256 + rng.integers(0, 30, (70, 110, 3))
    image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    out = proc(images=image, text="<image>\nWhat is shown?", return_tensors="np")
    want = normalize(preprocess(image, 56, aspect)).transpose(2, 0, 1)
    np.testing.assert_allclose(out["pixel_values"][0], want, atol=1e-5, rtol=0)
    ids = out["input_ids"][0].tolist()
    assert ids.count(IMAGE) == N_IMG and ids[0] == 1
    assert proc.tokenizer.convert_tokens_to_ids(["<image>", "<pad>"]) == [IMAGE, PAD]


@pytest.mark.parametrize("tied", [False, True])
def test_llm_only_export_loads_in_llama(tmp_path, tied):
    cfg = LlamaConfig(
        vocab_size=32064,
        hidden_size=64,
        intermediate_size=160,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        rms_norm_eps=1e-6,
        max_position_embeddings=128,
        tie_word_embeddings=tied,
    )
    model = _perturb(Llama(cfg, rngs=nnx.Rngs(5)), seed=5)
    export_llama_hf(model, tmp_path, dtype="float32")
    ref = tf.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager").eval()
    ids = torch.randint(3, 32000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(input_ids=ids).logits.numpy()
    got, _ = model(jnp.asarray(ids.numpy()))
    assert np.abs(np.asarray(got) - want).max() < 1e-4
    assert tf.AutoTokenizer.from_pretrained(tmp_path).convert_tokens_to_ids("<pad>") == PAD


def test_export_errors(tmp_path):
    model = Llava(_config("linear"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="int8"):
        export_llava_hf(model, tmp_path / "a", dtype="int8")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x").write_text("")
    with pytest.raises(FileExistsError, match="overwrite"):
        export_llava_hf(model, tmp_path / "b")
    with pytest.raises(ValueError, match="unit"):
        parse_size("5 parsecs")
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30
    with pytest.raises(TypeError, match="Llama"):
        export_llava_hf(model.language_model, tmp_path / "c")
    with pytest.raises(FileNotFoundError, match="model.json"):
        main(["export", "--checkpoint", str(tmp_path / "b"), "--out", str(tmp_path / "d")])
