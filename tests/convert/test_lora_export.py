"""LoRA exports: `--merge-lora` (adapters folded into a llava-hf directory) and `--lora-format peft`
(base llava-hf directory + PEFT adapter), checked against the UNMERGED llava_jax model in fp32 with
transformers, and with `peft` loading the adapter onto the transformers model."""

import copy
import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers as tf
from flax import nnx
from safetensors import safe_open
from test_export import EOS, IMAGE, N_IMG, _config, _hf_greedy

from llava_jax.checkpoint import save_stage
from llava_jax.checkpoint.hf_load import materialize
from llava_jax.convert import export_llava_hf
from llava_jax.convert.__main__ import main
from llava_jax.inference import generate
from llava_jax.models import Llava
from llava_jax.models.lora import nf4_quantize, quantize_kernel
from llava_jax.parallel.tree_paths import path_str

RANK, ALPHA = 4, 8.0


def _lora_model(quantized_base: str, seed: int) -> Llava:
    """A tiny Llava with adapters on every block linear and random weights everywhere (lora_b too, so the
    adapters change the output); an int8 or NF4 base is quantized from random float kernels (NF4: with an
    MLP width of 128, a multiple of its block of 64). Built from numpy arrays on the abstract model: eager
    random init compiles hundreds of small programs."""
    cfg = _config("mlp2x_gelu")
    if quantized_base == "nf4":
        cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, intermediate_size=128))
    cfg = cfg.with_lora(lora_rank=RANK, lora_alpha=ALPHA, lora_dropout=0.1, quantized_base=quantized_base)
    abstract = nnx.eval_shape(lambda: Llava(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(seed)
    arrays = {}
    for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        key, shape = path_str(path), tuple(var.value.shape)
        if path[-1] in ("kernel_scale", "kernel_absmax"):
            continue
        noise = 0.05 * rng.standard_normal(shape).astype(np.float32)
        if path[-1] == "scale":  # norm weights around 1
            noise += 1.0
        if var.value.dtype == jnp.int8:
            arrays[key], arrays[key + "_scale"] = quantize_kernel(noise)
        elif var.value.dtype == jnp.uint8:  # NF4: the stored kernel is [.., in / 2, out]
            arrays[key], arrays[key + "_absmax"] = nf4_quantize(
                0.05 * rng.standard_normal((*shape[:-2], 2 * shape[-2], shape[-1])).astype(np.float32)
            )
        else:
            arrays[key] = noise
    model = materialize(abstract, arrays)
    delta = arrays["language_model/layers/down_proj/lora_a"] @ arrays["language_model/layers/down_proj/lora_b"]
    assert float(np.abs(delta).max()) * ALPHA / RANK > 1e-2  # the adapter is not a no-op
    return model


_forward = nnx.jit(lambda m, ids, images: m(ids, images)[0])  # one compile per model structure


def _inputs():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 32000, (2, 30), generator=g)
    ids[0, 3 : 3 + N_IMG] = IMAGE
    pixels = torch.randn(1, 3, 56, 56, generator=g)
    images = np.zeros((2, 1, 56, 56, 3), np.float32)
    images[0, 0] = pixels[0].permute(1, 2, 0).numpy()
    return ids, pixels, images


def _logits_diff(model, ref) -> float:
    ids, pixels, images = _inputs()
    with torch.no_grad():
        want = ref(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids)).logits.numpy()
    got = _forward(model, jnp.asarray(ids.numpy()), jnp.asarray(images))
    return float(np.abs(np.asarray(got) - want).max())


def _hf(path) -> tf.LlavaForConditionalGeneration:
    return tf.LlavaForConditionalGeneration.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    ).eval()


@pytest.mark.slow  # a stage round trip and generation on both sides: ~1 min
def test_merged_export_cli_matches_unmerged_model(tmp_path):
    """stage dir with adapters -> `export --merge-lora` -> transformers: logits within 1e-5 of the
    unmerged llava_jax model, and the same greedy tokens."""
    model = _lora_model("none", seed=1)
    save_stage(model, tmp_path / "stage", template="v1", image_aspect_ratio="pad")
    plain = ["export", "--checkpoint", str(tmp_path / "stage"), "--out", str(tmp_path / "x"), "--dtype", "float32"]
    with pytest.raises(ValueError, match="--merge-lora"):  # adapters are never dropped silently
        main(plain)
    out = tmp_path / "hf"
    argv = ["export", "--checkpoint", str(tmp_path / "stage"), "--out", str(out), "--dtype", "float32", "--merge-lora"]
    assert main(argv) == 0
    assert not any("lora" in k for k in json.loads((out / "model.safetensors.index.json").read_text())["weight_map"])
    ref = _hf(out)
    diff = _logits_diff(model, ref)
    print(f"merged LoRA export: max |logits diff| vs unmerged = {diff:.2e}")
    assert diff < 1e-5

    rng = np.random.default_rng(5)
    text = [rng.integers(3, 32000, n).tolist() for n in (5, 4, 9)]
    prompts = [[1] + text[0] + [IMAGE] * N_IMG + text[1], [1] + text[2]]
    pixels = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    want, margin = _hf_greedy(ref, prompts, 8, pixels)
    assert margin > 1e-3, f"near-tie in the reference logits ({margin}); pick another seed"
    images = np.zeros((2, 1, 56, 56, 3), np.float32)
    images[0, 0] = pixels[0].permute(1, 2, 0).numpy()
    got = generate(model, prompts, images, max_new_tokens=8, eos_ids=(EOS,))
    assert got == want and all(got)


def test_merged_export_of_int8_base(tmp_path):
    """An int8 base is dequantized (kernel * kernel_scale) before the adapter is added."""
    model = _lora_model("int8", seed=2)
    assert model.language_model.layers.q_proj.kernel[...].dtype == jnp.int8
    export_llava_hf(model, tmp_path, dtype="float32", merge_lora=True)
    diff = _logits_diff(model, _hf(tmp_path))
    print(f"merged LoRA export, int8 base: max |logits diff| vs unmerged = {diff:.2e}")
    assert diff < 1e-5


def test_merged_export_of_nf4_base(tmp_path):
    """An NF4 base goes through a stage checkpoint (packed bytes and absmax) and `export --merge-lora`:
    dequantized (NF4 value * block absmax) before the adapter is added."""
    model = _lora_model("nf4", seed=3)
    assert model.language_model.layers.q_proj.kernel[...].dtype == jnp.uint8
    save_stage(model, tmp_path / "stage", template="v1", image_aspect_ratio="pad")
    out = tmp_path / "hf"
    argv = ["export", "--checkpoint", str(tmp_path / "stage"), "--out", str(out), "--dtype", "float32", "--merge-lora"]
    assert main(argv) == 0
    ref = _hf(out)
    assert ref.config.text_config.intermediate_size == 128
    diff = _logits_diff(model, ref)
    print(f"merged LoRA export, nf4 base: max |logits diff| vs unmerged = {diff:.2e}")
    assert diff < 1e-5


def test_peft_export_loads_with_peft(tmp_path):
    """`--lora-format peft`: base llava-hf dir + `adapter/`; the adapter's keys are those PEFT itself
    gives the transformers model, and PeftModel.from_pretrained reproduces the unmerged model's logits."""
    model = _lora_model("none", seed=3)
    export_llava_hf(model, tmp_path, dtype="float32", lora_format="peft")
    adapter = tmp_path / "adapter"
    base = _hf(tmp_path)
    assert _logits_diff(model, base) > 1e-3  # the base alone is a different model

    config = peft.LoraConfig.from_pretrained(adapter)
    assert (config.r, config.lora_alpha, config.lora_dropout) == (RANK, ALPHA, 0.1)
    fresh = peft.get_peft_model(copy.deepcopy(base), config)
    want_keys = {k.replace(".default", "") for k in fresh.state_dict() if ".lora_" in k}
    with safe_open(adapter / "adapter_model.safetensors", "np") as f:
        got_keys = set(f.keys())
        a = f.get_tensor("base_model.model.model.language_model.layers.1.mlp.gate_proj.lora_A.weight")
    assert got_keys == want_keys and len(got_keys) == 2 * 7 * 2  # 7 linears x 2 layers, A and B
    assert np.array_equal(a, np.asarray(model.language_model.layers.gate_proj.lora_a[...])[1].T)

    loaded = peft.PeftModel.from_pretrained(base, adapter).eval()
    diff = _logits_diff(model, loaded)
    print(f"PEFT LoRA export: max |logits diff| vs unmerged = {diff:.2e}")
    assert diff < 1e-5


@pytest.mark.slow  # the LLM-only variant of the PEFT export above
def test_llm_only_peft_export(tmp_path):
    """`--llm-only --lora-format peft`: a LlamaForCausalLM directory + adapter with `model.layers.N` keys."""
    model = _lora_model("none", seed=4).language_model
    from llava_jax.convert import export_llama_hf

    export_llama_hf(model, tmp_path, dtype="float32", lora_format="peft")
    base = tf.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager").eval()
    loaded = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with safe_open(tmp_path / "adapter" / "adapter_model.safetensors", "np") as f:
        assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in f.keys()  # noqa: SIM118
    ids, _, _ = _inputs()
    with torch.no_grad():
        want = loaded(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.numpy()
    got = np.asarray(model(jnp.asarray(ids.numpy()))[0])
    diff = float(np.abs(got - want).max())
    print(f"PEFT LoRA export (LLM only): max |logits diff| vs unmerged = {diff:.2e}")
    assert diff < 1e-5


def test_lora_export_options_are_checked(tmp_path):
    plain = nnx.eval_shape(lambda: Llava(_config("linear"), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="no LoRA adapters"):
        export_llava_hf(plain, tmp_path / "a", merge_lora=True)
    with pytest.raises(ValueError, match="choose one"):
        export_llava_hf(plain, tmp_path / "b", merge_lora=True, lora_format="peft")
    with pytest.raises(ValueError, match="only adapter format is 'peft'"):
        export_llava_hf(plain, tmp_path / "c", lora_format="lora")
