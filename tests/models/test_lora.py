"""LoRA adapters and the int8 base vs independent references: PEFT on transformers' LlamaForCausalLM
(fp32) for the adapter maths, PyTorch arithmetic for the int8 per-channel base."""

import dataclasses
import math

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hf_reference import llama, np_

from llava_jax.checkpoint import DictSource, load_weights
from llava_jax.checkpoint.hf_config import llama_config_from_hf
from llava_jax.models import Llama
from llava_jax.models.lora import BLOCK_LINEARS

RANK, ALPHA = 4, 8.0


def _tokens(seed=0):
    return torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(seed))


def _ours(ref, **lora) -> Llama:
    cfg = dataclasses.replace(llama_config_from_hf(ref.config.to_dict()), **lora)
    return load_weights(Llama(cfg, rngs=nnx.Rngs(3)), DictSource(ref.state_dict()))


def test_adapters_match_peft():
    """Unmerged adapters on every block linear (random A and B) give PEFT's logits."""
    peft = pytest.importorskip("peft")
    base = llama(kv_heads=2)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    targets = list(BLOCK_LINEARS)
    ref = peft.get_peft_model(
        base, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=targets)
    ).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_B" in name:  # PEFT initialises B to zero: make the adapter do something
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    ours = Llama(
        dataclasses.replace(
            llama_config_from_hf(base.config.to_dict()), lora_rank=RANK, lora_alpha=ALPHA, lora_dropout=0.0
        ),
        rngs=nnx.Rngs(3),
    )
    load_weights(ours, DictSource(state))
    adapters = {k: v for k, v in ref.state_dict().items() if "lora_" in k}
    n = ours.cfg.num_layers
    for name in targets:
        linear = getattr(ours.layers, name)
        part = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
        a = [adapters[f"base_model.model.model.layers.{i}.{part}.{name}.lora_A.default.weight"] for i in range(n)]
        b = [adapters[f"base_model.model.model.layers.{i}.{part}.{name}.lora_B.default.weight"] for i in range(n)]
        linear.lora_a[...] = jnp.asarray(np.stack([np_(x).T for x in a]))  # [L, in, r]
        linear.lora_b[...] = jnp.asarray(np.stack([np_(x).T for x in b]))  # [L, r, out]
    tokens = _tokens()
    with torch.no_grad():
        want = np_(ref(input_ids=tokens).logits)
    got, _ = ours(jnp.asarray(tokens.numpy()))
    diff = np.abs(np.asarray(got) - want).max()
    print(f"LoRA r={RANK} alpha={ALPHA:g} vs PEFT: logits max-abs diff {diff:.1e}")
    assert diff < 1e-4
    # and the adapters matter: the same base weights without them are far off
    no_adapters = _ours(llama(kv_heads=2))
    far = np.abs(np.asarray(no_adapters(jnp.asarray(tokens.numpy()))[0]) - want).max()
    assert far > 100 * diff and far > 1e-2, far


def test_fresh_adapter_is_identity_and_initialised_like_peft():
    ref = llama(kv_heads=2)
    tokens = _tokens(2)
    ours = _ours(ref, lora_rank=8, lora_alpha=16.0)
    with torch.no_grad():
        want = np_(ref(input_ids=tokens).logits)
    tokens = jnp.asarray(tokens.numpy())
    assert np.abs(np.asarray(ours(tokens)[0]) - want).max() < 1e-4  # B = 0: the base model's output
    a = np.asarray(ours.layers.down_proj.lora_a[...])  # [L, in=160, r]
    assert not np.asarray(ours.layers.down_proj.lora_b[...]).any()
    # torch's kaiming_uniform_(a=sqrt(5)) on PEFT's [r, in] lora_A: the same bound, 1/sqrt(in)
    w = torch.empty(8, 160)
    torch.nn.init.kaiming_uniform_(w, a=math.sqrt(5))
    bound = float(w.abs().max())
    assert abs(a).max() <= 1 / math.sqrt(160) and abs(a).max() > 0.95 / math.sqrt(160)
    assert bound <= 1 / math.sqrt(160) and abs(abs(a).max() - bound) < 0.05 / math.sqrt(160)


def test_int8_base_is_per_channel_and_matches_torch_dequantised():
    """load_weights quantises the float checkpoint per output channel; the int8 model computes what
    the float model computes with the dequantised weights (dequantised here in PyTorch)."""
    ref = llama(kv_heads=2)
    ours = _ours(ref, quantized_base="int8")
    sd = ref.state_dict()
    for name in ("q_proj", "down_proj"):
        part = "self_attn" if name == "q_proj" else "mlp"
        linear = getattr(ours.layers, name)
        q, scale = np.asarray(linear.kernel[...]), np.asarray(linear.kernel_scale[...])
        assert q.dtype == np.int8 and scale.dtype == np.float32 and np.abs(q).max() == 127
        for i in range(ours.cfg.num_layers):
            w = sd[f"model.layers.{i}.{part}.{name}.weight"].numpy().T  # [in, out]
            np.testing.assert_allclose(scale[i], np.abs(w).max(axis=0) / 127, rtol=1e-6)
            assert np.all(np.abs(q[i] * scale[i] - w) <= scale[i] / 2 * (1 + 1e-5))
    deq = {}
    for i in range(ours.cfg.num_layers):
        for name in BLOCK_LINEARS:
            part = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            linear = getattr(ours.layers, name)
            q = torch.from_numpy(np.asarray(linear.kernel[...])[i].astype(np.float32))
            s = torch.from_numpy(np.asarray(linear.kernel_scale[...])[i])
            deq[f"model.layers.{i}.{part}.{name}.weight"] = (q * s).T.contiguous()
    ref_deq = llama(kv_heads=2)
    ref_deq.load_state_dict({**sd, **deq})
    tokens = _tokens(3)
    with torch.no_grad():
        want = np_(ref_deq(input_ids=tokens).logits)
        original = np_(ref(input_ids=tokens).logits)
    got = np.asarray(ours(jnp.asarray(tokens.numpy()))[0])
    diff = np.abs(got - want).max()
    print(
        f"int8 base vs torch-dequantised reference: {diff:.1e}; vs the float model: {np.abs(got - original).max():.1e}"
    )
    assert diff < 1e-4
