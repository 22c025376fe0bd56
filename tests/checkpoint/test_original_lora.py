"""Original LLaVA LoRA checkpoints (`llava-v1.5-*-lora`: adapter_config.json, adapter_model.bin,
non_lora_trainables.bin) imported onto their base, merged or kept as adapters, against PEFT's own
merge (`merge_and_unload`) of the same adapter in transformers."""

import copy
import json

import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from flax import nnx
from hf_reference import clip_vision, llama
from test_original_import import N_IMG, _original_config, _projector, _reference

from llava_jax.checkpoint import CheckpointMismatch
from llava_jax.checkpoint.original import load_original_lora
from llava_jax.convert.__main__ import main
from llava_jax.inference import load_model

RANK, ALPHA = 8, 16
IMAGE = 32000


_forward = nnx.jit(lambda m, ids, images: m(ids, images)[0])  # one compile per model structure


def _logits_check(model, ref) -> float:
    """Max |logits difference| on an image row and a text row (our forward jitted: one compile)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 32000, (2, 26), generator=g)
    ids[0, 2 : 2 + N_IMG] = IMAGE
    pixels = torch.randn(1, 3, 56, 56, generator=g)
    with torch.no_grad():
        want = ref(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids)).logits.numpy()
    images = np.zeros((2, 1, 56, 56, 3), np.float32)
    images[0, 0] = pixels[0].permute(1, 2, 0).numpy()
    got = _forward(model, jnp.asarray(ids.numpy()), jnp.asarray(images))
    return float(np.abs(np.asarray(got) - want).max())


LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def lora_checkpoint(tmp_path_factory):
    """(LoRA dir, base dir, CLIP dir, transformers reference with the adapter merged by PEFT).

    The adapter is made by PEFT on a LlamaForCausalLM, whose module paths (`model.layers.N...`) are the
    original LlavaLlamaForCausalLM's, and saved as a .bin the way the original's training script does."""
    root = tmp_path_factory.mktemp("orig_lora")
    lm = llama(vocab=32000, layers=2, seed=1)
    clip = clip_vision(56, seed=2)
    lm.save_pretrained(root / "vicuna")
    clip.save_pretrained(root / "clip")
    torch.manual_seed(3)
    config = peft.LoraConfig(
        r=RANK,
        lora_alpha=ALPHA,
        lora_dropout=0.05,
        target_modules=LINEARS,
        task_type="CAUSAL_LM",
        init_lora_weights=False,  # random lora_B, so the adapter changes the model
    )
    wrapped = peft.get_peft_model(copy.deepcopy(lm), config)
    wrapped.save_pretrained(root / "lora", safe_serialization=False)  # adapter_config.json + adapter_model.bin
    projector = _projector("mlp2x_gelu", seed=7)
    torch.save({f"base_model.model.{k}": v for k, v in projector.items()}, root / "lora" / "non_lora_trainables.bin")
    (root / "lora" / "config.json").write_text(json.dumps(_original_config(lm, "mlp2x_gelu")))
    merged = wrapped.merge_and_unload().state_dict()
    delta = (
        merged["model.layers.1.mlp.down_proj.weight"] - lm.state_dict()["model.layers.1.mlp.down_proj.weight"]
    ).abs()
    assert float(delta.max()) > 1e-2  # the adapter is not a no-op
    ref = _reference({**merged, **projector}, clip, "mlp2x_gelu", 32000)
    return root / "lora", root / "vicuna", root / "clip", ref


def test_adapter_file_layout(lora_checkpoint):
    """The fixture's files have the original's key layout (what `load_original_lora` must read)."""
    lora, *_ = lora_checkpoint
    keys = torch.load(lora / "adapter_model.bin", weights_only=True)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert keys["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"].shape == (64, RANK)
    trainables = torch.load(lora / "non_lora_trainables.bin", weights_only=True)
    assert sorted(trainables)[0] == "base_model.model.model.mm_projector.0.bias"


def test_merged_import_matches_peft_merge(lora_checkpoint, tmp_path):
    """CLI import with --lora merge (the default) -> a plain stage whose logits are PEFT's merged model's."""
    lora, base, clip, ref = lora_checkpoint
    argv = ["import", "--from", str(lora), "--base", str(base), "--vision", str(clip), "--out", str(tmp_path / "s")]
    assert main(argv) == 0
    loaded = load_model(tmp_path / "s")
    assert loaded.model.cfg.llm.lora_rank == 0 and loaded.image_aspect_ratio == "pad"
    info = json.loads((tmp_path / "s" / "model.json").read_text())["source"]
    assert info["format"] == "llava_original_lora" and info["lora"] == {"r": RANK, "alpha": ALPHA, "merged": True}
    diff = _logits_check(loaded.model, ref)
    print(f"original LoRA, merged: max |logits diff| = {diff:.2e}")
    assert diff < 1e-4


@pytest.mark.slow  # a second import and forward compile; the merged path above is the fast check
def test_kept_adapters_match_peft_merge(lora_checkpoint, tmp_path):
    """--lora keep: the adapters become lora_a / lora_b parameters (transposed PEFT tensors) of a stage
    that loads back with its LoRA config, and the unmerged model computes what PEFT's merged one does."""
    lora, base, clip, ref = lora_checkpoint
    argv = ["import", "--from", str(lora), "--base", str(base), "--vision", str(clip), "--out", str(tmp_path / "s")]
    assert main([*argv, "--lora", "keep"]) == 0
    model = load_model(tmp_path / "s").model
    llm = model.cfg.llm
    assert (llm.lora_rank, llm.lora_alpha, llm.lora_dropout) == (RANK, ALPHA, 0.05)
    a = np.asarray(model.language_model.layers.v_proj.lora_a[...])
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"
    want = torch.load(lora / "adapter_model.bin", weights_only=True)[key]
    assert a.shape == (2, 64, RANK) and np.array_equal(a[1], want.numpy().T)
    diff = _logits_check(model, ref)
    print(f"original LoRA, kept as adapters: max |logits diff| = {diff:.2e}")
    assert diff < 1e-4


def test_lora_import_errors_name_the_fix(lora_checkpoint, tmp_path):
    lora, base, clip, _ = lora_checkpoint
    with pytest.raises(ValueError, match="--base"):
        main(["import", "--from", str(lora), "--vision", str(clip), "--out", str(tmp_path / "x")])
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in lora.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(ValueError, match="use_dora"):
        load_original_lora(bad, base=base, vision=clip)
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "r": 4}))
    with pytest.raises(CheckpointMismatch, match="rank 8 but adapter_config.json says r=4"):
        load_original_lora(bad, base=base, vision=clip)
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    (bad / "non_lora_trainables.bin").unlink()
    with pytest.raises(FileNotFoundError, match="non_lora_trainables.bin"):
        load_original_lora(bad, base=base, vision=clip)
