"""Original LLaVA (LlavaLlamaForCausalLM) checkpoints, stage-1 projectors, and LLaMA + CLIP + projector
imports, checked against transformers' LlavaForConditionalGeneration on the same weights."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tf
from hf_reference import clip_vision, llama, np_
from safetensors.torch import save_file

from llava_jax.checkpoint import CheckpointMismatch, from_pretrained, load_original, load_pair, load_projector
from llava_jax.convert.__main__ import main
from llava_jax.inference import load_model

IMAGE = 32000
N_IMG = 16  # (56 / 14)^2
D = 64  # LLM and CLIP width of the hf_reference models


def _projector(kind: str, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if kind == "linear":  # the paper's single layer, v0-era key names
        return {
            "model.mm_projector.weight": torch.randn(D, D, generator=g) * 0.1,
            "model.mm_projector.bias": torch.randn(D, generator=g) * 0.1,
        }
    return {
        f"model.mm_projector.{i}.{w}": torch.randn(*((D, D) if w == "weight" else (D,)), generator=g) * 0.1
        for i in (0, 2)
        for w in ("weight", "bias")
    }


def _original_config(lm, kind, **mm) -> dict:
    c = lm.config
    return {
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava",
        "hidden_act": "silu",
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_attention_heads": c.num_attention_heads,
        "num_hidden_layers": c.num_hidden_layers,
        "num_key_value_heads": c.num_key_value_heads,
        "rms_norm_eps": c.rms_norm_eps,
        "max_position_embeddings": c.max_position_embeddings,
        "vocab_size": c.vocab_size,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "torch_dtype": "float16",
        "use_cache": True,
        "mm_vision_tower": "openai/clip-vit-large-patch14-336",
        "mm_hidden_size": D,
        "mm_projector_type": kind,
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "image_aspect_ratio": "pad",
        "tune_mm_mlp_adapter": False,
        "use_mm_proj": True,
        **mm,
    }


def _write_original(path, lm, clip, kind, *, tower_in_shards: bool, **mm) -> dict:
    """An original-style directory: LLaMA keys + model.mm_projector.* (+ the tower when asked) in two
    PyTorch .bin shards with an index, and the LlavaLlamaForCausalLM config. Returns the tensors."""
    path.mkdir()
    sd = {k: v.clone() for k, v in lm.state_dict().items()}
    sd.update(_projector(kind, seed=7))
    if tower_in_shards:
        tower = "model.vision_tower.vision_tower.vision_model."
        sd.update({tower + k: v.clone() for k, v in clip.state_dict().items()})
    keys = sorted(sd)
    halves = {"pytorch_model-00001-of-00002.bin": keys[::2], "pytorch_model-00002-of-00002.bin": keys[1::2]}
    for name, ks in halves.items():
        torch.save({k: sd[k] for k in ks}, path / name)
    (path / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {k: n for n, ks in halves.items() for k in ks}})
    )
    (path / "config.json").write_text(json.dumps(_original_config(lm, kind, **mm)))
    return sd


def _reference(sd: dict, clip, kind: str, rows: int) -> tf.LlavaForConditionalGeneration:
    """transformers LlavaForConditionalGeneration holding the original tensors, renamed the way the
    llava-hf converter does (ordered substring renames), vocabulary grown to 32064 rows: LLaMA rows
    kept, rows the checkpoint added after 32000 moved to 32002+, every other row the mean row."""
    renames = [
        ("model.mm_projector.0", "multi_modal_projector.linear_1"),
        ("model.mm_projector.2", "multi_modal_projector.linear_2"),
        ("model.mm_projector.", "multi_modal_projector.linear_1."),
        ("model.vision_tower.vision_tower.", "vision_tower."),
        ("model.", "language_model.model."),
        ("lm_head", "language_model.lm_head"),
    ]
    hf = {}
    for k, v in sd.items():
        for old, new in renames:
            if k.startswith(old):
                k = new + k[len(old) :]
                break
        hf[k] = v
    if not any(k.startswith("vision_tower.") for k in hf):  # the tower from the CLIP directory
        hf.update({f"vision_tower.vision_model.{k}": v for k, v in clip.state_dict().items()})
    if kind == "linear":  # llava-hf's two-layer form of a single linear layer
        hf["multi_modal_projector.linear_2.weight"] = torch.eye(D)
        hf["multi_modal_projector.linear_2.bias"] = torch.zeros(D)
    for key in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
        old = hf[key].double()
        new = old[:32000].mean(0).repeat(32064, 1)
        new[:32000] = old[:32000]
        new[32002 : 32002 + rows - 32000] = old[32000:]
        hf[key] = new.float()
    text = tf.LlamaConfig(**{**llama_kwargs(), "vocab_size": 32064})
    cfg = tf.LlavaConfig(
        vision_config=clip.config,
        text_config=text,
        image_token_index=IMAGE,
        projector_hidden_act="gelu" if kind == "mlp2x_gelu" else "linear",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=N_IMG,
    )
    cfg._attn_implementation = "eager"
    ref = tf.LlavaForConditionalGeneration(cfg).eval()
    v5 = {}
    for k, v in hf.items():  # llava-hf files layout -> transformers 5 module layout
        for old, new in [
            ("language_model.model.", "model.language_model."),
            ("language_model.lm_head", "lm_head"),
            ("vision_tower.vision_model.", "model.vision_tower."),
            ("multi_modal_projector.", "model.multi_modal_projector."),
        ]:
            if k.startswith(old):
                k = new + k[len(old) :]
                break
        v5[k] = v
    missing, unexpected = ref.load_state_dict(v5, strict=False)
    assert not unexpected and all("position_ids" in m for m in missing), (missing, unexpected)
    return ref


def llama_kwargs() -> dict:
    return dict(
        hidden_size=D,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        rms_norm_eps=1e-6,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )


def _logits_check(model, ref):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 32000, (2, 26), generator=g)
    ids[0, 2 : 2 + N_IMG] = IMAGE
    pixels = torch.randn(1, 3, 56, 56, generator=g)
    with torch.no_grad():
        want = np_(ref(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids)).logits)
    images = np.zeros((2, 1, 56, 56, 3), np.float32)
    images[0, 0] = pixels[0].permute(1, 2, 0).numpy()
    got, _ = model(jnp.asarray(ids.numpy()), jnp.asarray(images))
    return float(np.abs(np.asarray(got) - want).max())


@pytest.mark.parametrize("kind,rows,tower_in_shards", [("mlp2x_gelu", 32000, False), ("linear", 32003, True)])
def test_original_checkpoint_matches_transformers(tmp_path, kind, rows, tower_in_shards):
    """v1.5-style (MLP, 32000 rows, tower from --vision) and v0-style (linear, 32003 rows, tower in the
    shards) checkpoints, imported with the CLI into a stage directory."""
    lm = llama(vocab=rows, layers=2, seed=1)
    clip = clip_vision(56, seed=2)
    sd = _write_original(tmp_path / "orig", lm, clip, kind, tower_in_shards=tower_in_shards)
    (tmp_path / "clip").mkdir()
    if tower_in_shards:  # --vision gives the tower's config only; its weights come from the shards
        (tmp_path / "clip" / "config.json").write_text(clip.config.to_json_string())
    else:
        clip.save_pretrained(tmp_path / "clip")
    assert (
        main(
            [
                "import",
                "--from",
                str(tmp_path / "orig"),
                "--vision",
                str(tmp_path / "clip"),
                "--out",
                str(tmp_path / "stage"),
            ]
        )
        == 0
    )
    loaded = load_model(tmp_path / "stage")
    info = json.loads((tmp_path / "stage" / "model.json").read_text())
    assert loaded.image_aspect_ratio == "pad" and info["source"]["vocab"]["checkpoint_rows"] == rows
    cfg = loaded.model.cfg
    assert cfg.projector == kind and cfg.vision.select_layer == -2 and cfg.llm.vocab_size == 32064
    embed = np.asarray(loaded.model.language_model.embed_tokens.embedding[...])
    want = lm.state_dict()["model.embed_tokens.weight"].numpy()
    assert np.array_equal(embed[:32000], want[:32000])
    assert np.array_equal(embed[32002 : rows + 2], want[32000:])  # v0's added rows, moved after <image>, <pad>
    diff = _logits_check(loaded.model, _reference(sd, clip, kind, rows))
    print(f"original {kind} ({rows} rows): max |logits diff| = {diff:.2e}")
    assert diff < 1e-4


def test_stage1_projector_file(tmp_path):
    mlp = {k: v.to(torch.bfloat16) for k, v in _projector("mlp2x_gelu", seed=3).items()}
    torch.save(mlp, tmp_path / "mm_projector.bin")
    arrays = load_projector(tmp_path)  # the folder holding it
    assert sorted(arrays) == [
        "multi_modal_projector/linear_1/bias",
        "multi_modal_projector/linear_1/kernel",
        "multi_modal_projector/linear_2/bias",
        "multi_modal_projector/linear_2/kernel",
    ]
    assert np.array_equal(
        arrays["multi_modal_projector/linear_2/kernel"], mlp["model.mm_projector.2.weight"].float().numpy().T
    )
    assert all(a.dtype == np.float32 for a in arrays.values())
    # safetensors, linear, with a LoRA-style prefix
    linear = {f"base_model.model.{k}": v for k, v in _projector("linear", seed=4).items()}
    save_file(linear, tmp_path / "lin.safetensors")
    arrays = load_projector(tmp_path / "lin.safetensors", projector="linear")
    assert np.array_equal(
        arrays["multi_modal_projector/linear_1/kernel"], linear["base_model.model.model.mm_projector.weight"].numpy().T
    )
    with pytest.raises(CheckpointMismatch, match=r"holds a linear projector.*mlp2x_gelu"):
        load_projector(tmp_path / "lin.safetensors", projector="mlp2x_gelu")
    save_file(
        {**_projector("linear", seed=4), "model.embed_tokens.weight": torch.zeros(2, 2)}, tmp_path / "x.safetensors"
    )
    with pytest.raises(CheckpointMismatch, match=r"model\.embed_tokens\.weight"):
        load_projector(tmp_path / "x.safetensors")


def test_llama_clip_and_projector_pair(tmp_path):
    """The original's stage-2 starting point: Vicuna (32000 rows) + CLIP + a stage-1 projector folder
    with its config.json."""
    lm, clip = llama(vocab=32000, layers=2, seed=5), clip_vision(56, seed=6)
    lm.save_pretrained(tmp_path / "llm")
    clip.save_pretrained(tmp_path / "clip")
    (tmp_path / "stage1").mkdir()
    proj = _projector("mlp2x_gelu", seed=8)
    torch.save(proj, tmp_path / "stage1" / "mm_projector.bin")
    (tmp_path / "stage1" / "config.json").write_text(
        json.dumps({"mm_vision_select_layer": -1, "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": D})
    )
    model, info = load_pair(tmp_path / "llm", vision=tmp_path / "clip", projector=tmp_path / "stage1")
    assert model.cfg.vision.select_layer == -1 and model.cfg.projector == "mlp2x_gelu"
    assert np.array_equal(
        np.asarray(model.multi_modal_projector.linear_1.kernel[...]), proj["model.mm_projector.0.weight"].numpy().T
    )
    head = np.asarray(model.language_model.lm_head.kernel[...])
    want = lm.state_dict()["lm_head.weight"].numpy()
    assert np.array_equal(head[:, :32000], want.T)
    np.testing.assert_allclose(head[:, 32000:], np.repeat(want.astype(np.float64).mean(0)[:, None], 64, 1), atol=1e-6)
    assert (
        main(
            [
                "import",
                "--from",
                str(tmp_path / "llm"),
                "--vision",
                str(tmp_path / "clip"),
                "--projector",
                str(tmp_path / "stage1"),
                "--out",
                str(tmp_path / "stage"),
                "--dtype",
                "bfloat16",
            ]
        )
        == 0
    )
    assert load_model(tmp_path / "stage").model.cfg.vision.select_layer == -1


def test_original_config_errors_name_the_field(tmp_path):
    lm, clip = llama(vocab=32000, layers=2, seed=1), clip_vision(56, seed=2)
    clip.save_pretrained(tmp_path / "clip")
    _write_original(tmp_path / "orig", lm, clip, "mlp2x_gelu", tower_in_shards=False)
    with pytest.raises(FileNotFoundError, match="mm_vision_tower"):
        load_original(tmp_path / "orig")  # no tower in the shards, none given
    with pytest.raises(ValueError, match="original LLaVA"):
        from_pretrained(tmp_path / "orig")
    cfg_file = tmp_path / "orig" / "config.json"
    base = json.loads(cfg_file.read_text())
    for field, value in [
        ("mm_projector_type", "mlp3x_gelu"),
        ("image_aspect_ratio", "anyres"),
        ("mm_hidden_size", 1024),
        ("mm_vision_select_feature", "cls"),
    ]:
        cfg_file.write_text(json.dumps({**base, field: value}))
        with pytest.raises(ValueError, match=field):
            load_original(tmp_path / "orig", vision=tmp_path / "clip")
    lm.save_pretrained(tmp_path / "llm")
    with pytest.raises(ValueError, match="--vision CLIP_DIR and --projector"):
        main(["import", "--from", str(tmp_path / "llm"), "--out", str(tmp_path / "x")])


def test_vocabulary_too_large_is_refused(tmp_path):
    lm, clip = llama(vocab=32100, layers=2, seed=1), clip_vision(56, seed=2)
    clip.save_pretrained(tmp_path / "clip")
    _write_original(tmp_path / "orig", lm, clip, "linear", tower_in_shards=False)
    with pytest.raises(CheckpointMismatch, match=r"model\.embed_tokens\.weight.*100 rows"):
        load_original(tmp_path / "orig", vision=tmp_path / "clip")
