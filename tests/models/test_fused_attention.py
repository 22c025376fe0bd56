"""The fused kernels (`splash` for TPU, `flash_gpu` for NVIDIA GPUs) equal the XLA path on packed,
left-padded and right-padded batches, forward and gradients, in Pallas interpret mode on CPU.

Outputs are compared at real tokens (padding outputs are unused: the XLA path lets a padding query see
nothing, the kernels let it see other padding). Gradients are those of a loss over real tokens only,
as in training, and are compared everywhere.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llava_jax.models import Llama, attention
from llava_jax.models.config import LlamaConfig
from llava_jax.parallel.mesh import make_mesh

T = 128  # the kernels' smallest tile


def _row(kind: str, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    if kind == "packed":  # three samples and a padded tail
        a, b = sorted(rng.choice(np.arange(8, T - 8), 2, replace=False))
        return [1] * a + [2] * (b - a) + [3] * (T - 5 - b) + [0] * 5
    n = int(rng.integers(T // 4, T - 4))
    return [0] * (T - n) + [1] * n if kind == "left_padded" else [1] * n + [0] * (T - n)


LAYOUTS = ["packed", "left_padded", "right_padded"]


def _case(layout: str, b=2, n=4, kvh=2, h=32, seed=0):
    """layout: one of LAYOUTS for every row, or 'mixed' (one row of each)."""
    rows = LAYOUTS[:b] if layout == "mixed" else [layout] * b
    seg = jnp.asarray([_row(kind, seed + i) for i, kind in enumerate(rows)], jnp.int32)
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (b, T, n, h))
    k = jax.random.normal(ks[1], (b, T, kvh, h))
    v = jax.random.normal(ks[2], (b, T, kvh, h))
    weight = jax.random.normal(ks[3], (b, T, n, h)) * (seg != 0)[:, :, None, None]
    return q, k, v, seg, weight


def _forward_and_grads(impl, q, k, v, seg, weight):
    def loss(q, k, v):
        out = attention.attend(q, k, v, attention.Segments(seg), implementation=impl, causal=True)
        return jnp.sum(out * weight), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return np.asarray(out), [np.asarray(g) for g in grads]


@pytest.mark.parametrize("kernel", attention.FUSED)
@pytest.mark.parametrize("layout", ["mixed", *(pytest.param(x, marks=pytest.mark.slow) for x in LAYOUTS)])
def test_fused_kernel_equals_xla(kernel, layout):
    """'mixed': a packed, a left-padded and a right-padded row in one batch (fast run); the others:
    every row of one kind."""
    q, k, v, seg, weight = _case(layout, b=3 if layout == "mixed" else 2)
    assert attention.choose(kernel, q, k, masked=True) == kernel
    want, want_grads = _forward_and_grads("xla", q, k, v, seg, weight)
    got, got_grads = _forward_and_grads(kernel, q, k, v, seg, weight)
    real = np.asarray(seg) != 0
    assert np.abs(got - want)[real].max() < 1e-4
    for name, g, w in zip("qkv", got_grads, want_grads, strict=True):
        assert np.isfinite(g).all()
        assert np.abs(g - w).max() < 1e-4 * max(1.0, np.abs(w).max()), name


@pytest.mark.slow
@pytest.mark.parametrize("kernel", attention.FUSED)
def test_fused_kernel_unmasked_bidirectional(kernel):
    """No segment ids and no causality (as in a vision tower at a tiled length)."""
    q, k, v, _, _ = _case("packed", seed=3)
    want = attention.attend(q, k, v, None, implementation="xla", causal=False)
    got = attention.attend(q, k, v, None, implementation=kernel, causal=False)
    assert np.abs(np.asarray(got) - np.asarray(want)).max() < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("kernel", attention.FUSED)
def test_fused_kernel_sharded(kernel):
    """Under a data x fsdp x tensor mesh of 8 CPU devices the kernel runs per device (shard_map: rows
    over data/fsdp, heads over tensor) and still equals the XLA path."""
    q, k, v, seg, weight = _case("packed", b=4, seed=5)
    mesh = make_mesh((1, 4, 2), devices=jax.devices()[:8])
    with jax.set_mesh(mesh):
        text = (
            jax.jit(
                lambda q, k, v: attention.attend(q, k, v, attention.Segments(seg), implementation=kernel, causal=True)
            )
            .lower(q, k, v)
            .as_text()
        )
        got, got_grads = _forward_and_grads(kernel, q, k, v, seg, weight)
    assert "shard_map" in text or "sdy.manual_computation" in text
    want, want_grads = _forward_and_grads("xla", q, k, v, seg, weight)
    real = np.asarray(seg) != 0
    assert np.abs(got - want)[real].max() < 1e-4
    for g, w in zip(got_grads, want_grads, strict=True):
        assert np.abs(g - w).max() < 1e-4 * max(1.0, np.abs(w).max())


@pytest.mark.parametrize(
    "implementation, shape, masked, dense, backend, want",
    [
        ("auto", (2, 256, 8, 128), True, False, "tpu", "splash"),
        ("auto", (2, 256, 8, 128), False, False, "tpu", "splash"),
        ("auto", (2, 577, 8, 64), False, False, "tpu", "xla"),  # CLIP-L/14 at 336 px: no tile divides it
        ("auto", (2, 256, 8, 128), True, True, "tpu", "xla"),  # dense mask (KV cache)
        ("auto", (2, 256, 8, 128), True, False, "gpu", "flash_gpu"),  # packing / padding
        ("auto", (2, 256, 8, 128), False, False, "gpu", "cudnn"),
        ("auto", (2, 200, 8, 128), True, False, "gpu", "xla"),
        ("auto", (2, 256, 8, 512), True, False, "gpu", "xla"),
        ("auto", (2, 256, 8, 128), True, False, "cpu", "xla"),
        ("splash", (2, 192, 8, 64), True, False, "cpu", "xla"),  # named, but the call is not tiled
        ("flash_gpu", (2, 256, 8, 64), True, True, "cpu", "xla"),
        ("splash", (2, 256, 8, 64), True, False, "cpu", "splash"),
    ],
)
def test_choice(implementation, shape, masked, dense, backend, want):
    q = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    k = jax.ShapeDtypeStruct(shape[:2] + (shape[2] // 2, shape[3]), jnp.bfloat16)
    got = attention.choose(implementation, q, k, masked=masked, dense_mask=dense, backend=backend)
    assert got == want


@pytest.mark.slow
@pytest.mark.parametrize("kernel", attention.FUSED)
def test_decoder_with_fused_kernel_equals_xla(kernel):
    """The whole decoder (attention=kernel) == attention='xla' on rows of every layout, logits and
    parameter gradients."""
    seg = np.asarray([_row(layout, 7 + i) for i, layout in enumerate(LAYOUTS)], np.int32)
    pos = np.zeros_like(seg)
    for b in range(seg.shape[0]):
        for t in range(1, T):
            pos[b, t] = pos[b, t - 1] + 1 if seg[b, t] == seg[b, t - 1] and seg[b, t] else 0
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, 128, seg.shape))
    real = jnp.asarray(seg != 0)

    def run(attn):
        cfg = LlamaConfig(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=128,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            attention=attn,
        )
        model = Llama(cfg, rngs=nnx.Rngs(3))

        def loss(model):
            logits, _ = model(tokens, positions=jnp.asarray(pos), segment_ids=jnp.asarray(seg))
            return jnp.sum(jnp.where(real[..., None], logits, 0.0) ** 2) / 1e3, logits

        (_, logits), grads = nnx.value_and_grad(loss, has_aux=True)(model)
        return np.asarray(logits), jax.tree.leaves(nnx.to_pure_dict(grads))

    want, want_grads = run("xla")
    got, got_grads = run(kernel)
    assert np.abs(got - want)[seg != 0].max() < 1e-4
    for g, w in zip(got_grads, want_grads, strict=True):
        assert np.abs(np.asarray(g) - np.asarray(w)).max() < 1e-4 * max(1.0, float(np.abs(np.asarray(w)).max()))
