"""The 4-bit NF4 base vs independent references: the published NF4 table and bitsandbytes' quantisation
algorithm re-written here in plain numpy (bit for bit), and transformers' LlamaForCausalLM on the
dequantised weights (fp32)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tf
from flax import nnx

from llava_jax.checkpoint import DictSource, load_weights
from llava_jax.checkpoint.hf_config import llama_config_from_hf
from llava_jax.models import Llama, LlamaConfig
from llava_jax.models.lora import BLOCK_LINEARS, NF4_CODE, NF4_MIDPOINTS, nf4_dequantize, nf4_quantize

# QLoRA (arXiv:2305.14314) appendix E / bitsandbytes `dDequantizeNF4` (csrc/kernels.cu): code -> value.
PUBLISHED_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]  # fmt: skip


def _bnb_quantize_nf4(x: np.float32) -> int:
    """bitsandbytes' `dQuantizeNF4` decision tree (csrc/kernels.cu), its float constants as published."""
    f = np.float32
    if x > f(0.03979014977812767):
        if x > f(0.3893125355243683):
            if x > f(0.6427869200706482):
                return 0b1111 if x > f(0.8614784181118011) else 0b1110
            return 0b1101 if x > f(0.5016634166240692) else 0b1100
        if x > f(0.2035212516784668):
            return 0b1011 if x > f(0.2920137718319893) else 0b1010
        return 0b1001 if x > f(0.1202552504837513) else 0b1000
    if x > f(-0.33967943489551544):
        if x > f(-0.13791173323988914):
            return 0b0111 if x > f(-0.045525018125772476) else 0b0110
        return 0b0101 if x > f(-0.23460740596055984) else 0b0100
    if x > f(-0.6106329262256622):
        return 0b0011 if x > f(-0.4599952697753906) else 0b0010
    return 0b0001 if x > f(-0.8480964004993439) else 0b0000


def _reference(w_torch_layout: np.ndarray):
    """bitsandbytes' `quantize_4bit(quant_type="nf4", blocksize=64)` on a float32 weight [out, in]:
    flatten row-major, blocks of 64, absmax per block, x * (1 / absmax) through the tree, two codes per
    byte (the first in the high nibble); dequantised = value[code] * absmax. Returns (bytes [out*in/2],
    absmax [out*in/64], dequantised [out, in])."""
    flat = w_torch_layout.astype(np.float32).reshape(-1, 64)
    absmax = np.abs(flat).max(axis=1)
    codes = np.zeros(flat.shape, np.uint8)
    values = np.zeros(flat.shape, np.float32)
    table = np.array(PUBLISHED_NF4, np.float32)
    for b in range(flat.shape[0]):
        inv = np.float32(1.0) / absmax[b] if absmax[b] > 0 else np.float32(0.0)  # all-zero block: code of 0.0
        for j in range(64):
            codes[b, j] = _bnb_quantize_nf4(np.float32(flat[b, j] * inv))
            values[b, j] = table[codes[b, j]] * absmax[b]
    pairs = codes.reshape(-1, 2)
    packed = ((pairs[:, 0] << 4) | pairs[:, 1]).astype(np.uint8)
    return packed, absmax, values.reshape(w_torch_layout.shape)


def _test_weight(rng, din=128, dout=24) -> np.ndarray:
    """A float32 kernel [in, out]: normal weights, plus a column that hits every threshold exactly and
    one float32 step either side of it (its block's absmax is exactly 1, so x = w), a column of one
    all-zero and one all-negative block."""
    w = (0.02 * rng.standard_normal((din, dout))).astype(np.float32)
    col = np.zeros(64, np.float32)
    mids = np.array(NF4_MIDPOINTS, np.float32)
    edge = np.concatenate([mids, np.nextafter(mids, 2), np.nextafter(mids, -2), [1.0, -1.0, 0.5]]).astype(np.float32)
    col[: len(edge)] = edge
    w[:64, 0] = col
    w[:64, 1] = 0.0
    w[64:, 1] = -np.abs(w[64:, 1]) - 1e-3
    return w


def test_table_and_thresholds_are_the_published_ones():
    assert NF4_CODE.dtype == np.float32
    np.testing.assert_array_equal(NF4_CODE, np.array(PUBLISHED_NF4, np.float32))
    # bitsandbytes' tree thresholds, in ascending order
    bnb = [-0.8480964004993439, -0.6106329262256622, -0.4599952697753906, -0.33967943489551544,
           -0.23460740596055984, -0.13791173323988914, -0.045525018125772476, 0.03979014977812767,
           0.1202552504837513, 0.2035212516784668, 0.2920137718319893, 0.3893125355243683,
           0.5016634166240692, 0.6427869200706482, 0.8614784181118011]  # fmt: skip
    np.testing.assert_array_equal(NF4_MIDPOINTS, np.array(bnb, np.float32))


@pytest.mark.parametrize("backend", ["numpy", "jax"])
def test_quantize_and_dequantize_match_bitsandbytes_bit_for_bit(backend):
    """Packed bytes, absmax and dequantised values equal the reference in bitsandbytes' own layout
    (weight [out, in] flattened): ours moved to [out, ...] and flattened. Stacked [L, in, out] too."""
    rng = np.random.default_rng(0)
    w = np.stack([_test_weight(rng), _test_weight(rng)])  # [2, 128, 24]
    if backend == "numpy":
        packed, absmax = nf4_quantize(w)
        deq = nf4_dequantize(packed, absmax, np.float32)
    else:
        packed, absmax = jax.jit(nf4_quantize)(jnp.asarray(w))
        deq = jax.jit(nf4_dequantize)(packed, absmax)
        packed, absmax, deq = np.asarray(packed), np.asarray(absmax), np.asarray(deq)
    assert packed.dtype == np.uint8 and packed.shape == (2, 64, 24)
    assert absmax.dtype == np.float32 and absmax.shape == (2, 2, 24)
    for layer in range(2):
        want_bytes, want_absmax, want_deq = _reference(w[layer].T)
        np.testing.assert_array_equal(packed[layer].T.reshape(-1), want_bytes)
        np.testing.assert_array_equal(absmax[layer].T.reshape(-1), want_absmax)
        assert deq[layer].T.tobytes() == want_deq.tobytes()
    # every weight went to its nearest table value (ties aside), and the extremes are exact
    x = w.reshape(2, 2, 64, 24) / absmax[:, :, None, :].clip(1e-30)
    err = np.abs((deq - w).reshape(2, 2, 64, 24)) / absmax[:, :, None, :].clip(1e-30)
    nearest = np.abs(x[..., None] - NF4_CODE).min(axis=-1)
    assert np.all(err <= nearest + 1e-6)
    assert deq[0, 45, 0] == 1.0 and deq[0, 46, 0] == -1.0 and np.all(deq[:, :64, 1] == 0)


@pytest.mark.slow  # two models built eagerly and compiled; the fast forward check is the nf4 merged export
def test_nf4_model_matches_transformers_on_dequantised_weights():
    """load_weights packs a float checkpoint to NF4 as the reference does; the NF4 model (kernels
    dequantised inside the jitted matmul) gives the logits of transformers with the reference-dequantised
    weights, and of the same llava_jax model holding those weights as plain float kernels."""
    torch.manual_seed(0)
    hf_cfg = tf.LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        max_position_embeddings=128,
        attn_implementation="eager",
    )
    ref = tf.LlamaForCausalLM(hf_cfg).eval()
    sd = ref.state_dict()
    cfg = llama_config_from_hf(hf_cfg.to_dict())
    ours = load_weights(Llama(dataclasses.replace(cfg, quantized_base="nf4"), rngs=nnx.Rngs(1)), DictSource(sd))
    deq = {}
    for name in BLOCK_LINEARS:
        part = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
        linear = getattr(ours.layers, name)
        assert linear.kernel[...].dtype == jnp.uint8 and linear.kernel_absmax[...].dtype == jnp.float32
        for i in range(cfg.num_layers):
            key = f"model.layers.{i}.{part}.{name}.weight"
            want_bytes, want_absmax, want_deq = _reference(sd[key].numpy())
            np.testing.assert_array_equal(np.asarray(linear.kernel[...])[i].T.reshape(-1), want_bytes)
            np.testing.assert_array_equal(np.asarray(linear.kernel_absmax[...])[i].T.reshape(-1), want_absmax)
            deq[key] = torch.from_numpy(want_deq)
    ref.load_state_dict({**sd, **deq})
    float_model = load_weights(Llama(cfg, rngs=nnx.Rngs(1)), DictSource({**sd, **deq}))
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(input_ids=tokens).logits.numpy()
    forward = nnx.jit(lambda m, ids: m(ids)[0])
    got = np.asarray(forward(ours, jnp.asarray(tokens.numpy())))
    plain = np.asarray(forward(float_model, jnp.asarray(tokens.numpy())))
    print(
        f"nf4 base vs transformers on dequantised weights: {np.abs(got - want).max():.1e}; "
        f"vs llava_jax float kernels: {np.abs(got - plain).max():.1e}"
    )
    assert np.abs(got - want).max() < 1e-4
    assert np.abs(got - plain).max() < 1e-5


def test_nf4_settings_are_checked():
    with pytest.raises(ValueError, match=r"quantized_base='nf3'.*'none', 'int8', 'nf4'"):
        LlamaConfig(quantized_base="nf3")
    with pytest.raises(ValueError, match="intermediate_size=160 is not a multiple of 64.*int8"):
        LlamaConfig(hidden_size=64, intermediate_size=160, num_heads=4, num_kv_heads=2, quantized_base="nf4")
