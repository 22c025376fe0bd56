"""Every attention kernel honours causal + segment (packing) + padding masks.

No GPU here, so the cuDNN path is checked by what it hands to `jax.nn.dot_product_attention`: the
exact call `attend` makes with implementation='cudnn' is rerouted to jax's own XLA implementation of
that function (an implementation independent of ours), which applies every argument the same way
cuDNN documents (is_causal, boolean mask). Outputs must equal our plain XLA path at every real token.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llava_jax.models import Llama, attention
from llava_jax.models.config import LlamaConfig

T = 16
LAYOUTS = {
    # [B, T] segment ids: 0 = padding, 1..k = the k samples of a row.
    "packed": [[1] * 5 + [2] * 7 + [3] * 2 + [0] * 2, [1] * 9 + [2] * 7],
    "left_padded": [[0] * 6 + [1] * 10, [0] * 1 + [1] * 15],
    "right_padded": [[1] * 10 + [0] * 6, [1] * 3 + [0] * 13],
}
# One batch with a row of each kind, for the (slower) whole-model checks.
MIXED = [LAYOUTS["packed"][0], LAYOUTS["left_padded"][0], LAYOUTS["right_padded"][1], LAYOUTS["packed"][1]]


def _positions(seg: np.ndarray) -> np.ndarray:
    """Positions restarting at 0 at every segment, 0 at padding (as the data pipeline makes them)."""
    pos = np.zeros_like(seg)
    for b in range(seg.shape[0]):
        for t in range(1, seg.shape[1]):
            pos[b, t] = pos[b, t - 1] + 1 if seg[b, t] == seg[b, t - 1] and seg[b, t] else 0
    return pos


@pytest.fixture
def cudnn_via_xla(monkeypatch):
    """Route jax.nn.dot_product_attention(implementation='cudnn') to jax's XLA implementation of the
    same call; record the keyword arguments of every rerouted call."""
    real = jax.nn.dot_product_attention
    calls = []

    def fake(*args, implementation=None, **kwargs):
        if implementation == "cudnn":
            calls.append(kwargs)
            implementation = "xla"
        return real(*args, implementation=implementation, **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", fake)
    return calls


def _qkv(b, t, n, kvh, h, dtype=jnp.float32, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(ks[0], (b, t, n, h), dtype)
    k = jax.random.normal(ks[1], (b, t, kvh, h), dtype)
    v = jax.random.normal(ks[2], (b, t, kvh, h), dtype)
    return q, k, v


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_cudnn_arguments_mean_the_same_mask(layout):
    """The arguments built for cuDNN, run through jax's XLA implementation == our XLA path."""
    seg = jnp.asarray(LAYOUTS[layout], jnp.int32)
    q, k, v = _qkv(2, T, 4, 2, 16)
    mask = attention.make_mask(seg, seg, causal=True)
    want = attention.attend(q, k, v, mask, implementation="xla", causal=True)
    args = attention.cudnn_arguments(q, k, v, mask, causal=True, scale=16**-0.5)
    got = jax.nn.dot_product_attention(**args, implementation="xla")
    real = np.asarray(seg) != 0
    assert np.isfinite(np.asarray(got)).all()
    assert np.abs(np.asarray(got) - np.asarray(want))[real].max() < 1e-5


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_unmasked_call_through_cudnn_arguments(causal, cudnn_via_xla):
    """No mask (LLM without segment ids, CLIP): cuDNN gets causality alone, and that is the whole mask."""
    q, k, v = _qkv(2, T, 4, 4, 16, seed=1)
    got = attention.attend(q, k, v, None, implementation="cudnn", causal=causal)
    assert len(cudnn_via_xla) == 1 and cudnn_via_xla[0]["is_causal"] is causal
    assert "mask" not in cudnn_via_xla[0]
    full = attention.make_mask(jnp.ones((2, T), jnp.int32), jnp.ones((2, T), jnp.int32), causal=causal)
    want = attention.attend(q, k, v, full, implementation="xla", causal=causal)
    assert np.abs(np.asarray(got) - np.asarray(want)).max() < 1e-5


def _llama(attn: str, dtype=jnp.float32) -> Llama:
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        dtype=dtype,
        attention=attn,
    )
    return Llama(cfg, rngs=nnx.Rngs(3))


def _run(model, seg):
    seg = np.asarray(seg, np.int32)
    tokens = np.random.default_rng(0).integers(1, 128, seg.shape)
    logits, _ = model(jnp.asarray(tokens), positions=jnp.asarray(_positions(seg)), segment_ids=jnp.asarray(seg))
    return np.asarray(logits.astype(jnp.float32))


def test_forced_cudnn_model_equals_xla(cudnn_via_xla):
    """The decoder with attention='cudnn' (the call cuDNN would get, run by XLA) == attention='xla', on
    packed, left-padded and right-padded rows."""
    seg = MIXED
    want = _run(_llama("xla"), seg)
    got = _run(_llama("cudnn"), seg)
    real = np.asarray(seg) != 0
    diff = np.abs(got - want)[real].max()
    print(f"forced cudnn vs xla: logits max-abs diff {diff:.1e}")
    assert diff < 1e-4
    assert len(cudnn_via_xla) >= 1 and all("mask" in c and c["is_causal"] for c in cudnn_via_xla)


@pytest.mark.parametrize(
    "dtype, head_dim, t, s, masked, backend, want",
    [
        (jnp.bfloat16, 128, 8, 8, False, "gpu", "cudnn"),
        (jnp.float16, 64, 8, 8, False, "gpu", "cudnn"),
        (jnp.bfloat16, 128, 8, 8, True, "gpu", "xla"),  # segment ids given: packing or padding
        (jnp.float32, 128, 8, 8, False, "gpu", "xla"),
        (jnp.bfloat16, 256, 8, 8, False, "gpu", "xla"),
        (jnp.bfloat16, 60, 8, 8, False, "gpu", "xla"),
        (jnp.bfloat16, 128, 1, 8, False, "gpu", "xla"),
        (jnp.bfloat16, 128, 8, 8, False, "cpu", "xla"),
        (jnp.bfloat16, 128, 8, 8, False, "tpu", "xla"),
    ],
)
def test_auto_choice(dtype, head_dim, t, s, masked, backend, want):
    q = jax.ShapeDtypeStruct((2, t, 4, head_dim), dtype)
    k = jax.ShapeDtypeStruct((2, s, 4, head_dim), dtype)
    assert attention.choose("auto", q, k, masked=masked, backend=backend) == want
    assert attention.choose("cudnn", q, k, masked=masked, backend=backend) == "cudnn"


def test_unknown_implementation_named():
    q = jax.ShapeDtypeStruct((1, 4, 2, 8), jnp.float32)
    with pytest.raises(ValueError, match="'flash'.*xla"):
        attention.choose("flash", q, q, masked=False)


def test_auto_on_gpu_keeps_packed_samples_apart(cudnn_via_xla, monkeypatch):
    """The GPU default (bf16, attention='auto') on packed / padded rows == the XLA path."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    seg = MIXED
    want = _run(_llama("xla", jnp.bfloat16), seg)
    got = _run(_llama("auto", jnp.bfloat16), seg)
    real = np.asarray(seg) != 0
    assert np.abs(got - want)[real].max() < 1e-2
    assert not cudnn_via_xla
    # Without segment ids the default does take the fused kernel (no mask to honour but causality).
    q, k, v = _qkv(2, T, 4, 2, 16, dtype=jnp.bfloat16, seed=2)
    attention.attend(q, k, v, None, implementation="auto", causal=True)
    assert len(cudnn_via_xla) == 1 and "mask" not in cudnn_via_xla[0]
