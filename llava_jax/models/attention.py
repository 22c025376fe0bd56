"""Attention through one entry point with an `implementation` switch.

Call sites pass the mask as `Segments` (segment ids of a self-attention call: packing and padding),
as a boolean [B, T, S] array built by `make_mask` (e.g. against a KV cache), or None when nothing
beyond causality is masked, and call `attend`; the kernel is chosen by name:

- `xla`: explicit einsum + float32 softmax; runs everywhere (CPU tests, GPU, TPU). Holds the
  [B, N, T, S] float32 scores.
- `splash` (TPU): Pallas splash attention with segment ids, per device under `shard_map`
  (`splash.py`); never holds the scores. Takes self-attention with T a multiple of 128.
- `flash_gpu` (NVIDIA GPU): the Pallas (Triton) flash-attention kernel with segment ids, per device
  under `shard_map` (`flash_gpu.py`); never holds the scores. Takes self-attention with T a
  multiple of 128 and head dim <= 256.
  A fused kernel named for a call it cannot take (CLIP's 577 tokens, a KV-cache step with its dense
  mask) leaves that call to `xla`.
- `cudnn`: `jax.nn.dot_product_attention(implementation='cudnn')` (NVIDIA GPUs, bf16/fp16). With no
  mask, the fused kernel's own causal mask is the whole mask; with a mask, the mask is passed too, and
  jax hands it to cuDNN as an additive bias (jax 0.10 and 0.11), so packed samples and padding stay
  apart. See `cudnn_arguments`.
- `auto`, by platform (`platform.py`: the mesh's devices, so an AOT compile for TPU from a CPU host
  counts as TPU): TPU -> `splash` when it takes the call; GPU (bf16/fp16) -> `cudnn` for unmasked
  calls it takes natively (head dim a multiple of 8 up to 128), else `flash_gpu` when it takes the
  call (packed/padded batches: cuDNN's bias route costs a [B, T, S] bias per layer and has gradient
  bugs in jax's wrapper, jax#30593); everything else, and every dense-array mask (KV cache), `xla`.
  The table in README.md says the same.

Shapes: q [B, T, N, H]; k, v [B, S, K, H] with N % K == 0 (grouped-query attention); output
[B, T, N, H] in q.dtype. On CPU the Pallas kernels run in interpret mode (slow; for tests).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from llava_jax.models.platform import platform
from llava_jax.parallel import rules

IMPLEMENTATIONS = ("xla", "cudnn", "splash", "flash_gpu", "auto")
FUSED = ("splash", "flash_gpu")  # the kernels that take segment ids and run per device
_HALF_DTYPES = (jnp.bfloat16, jnp.float16)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Segments:
    """The mask of a self-attention call as segment ids [B, T] int: 0 = padding, 1..k = the k samples
    packed into a row. The fused kernels take these; the others build the dense mask (`dense`)."""

    ids: jax.Array

    def dense(self, causal: bool) -> jax.Array:
        """[B, T, T] bool, as `make_mask(ids, ids, causal=causal)`."""
        return make_mask(self.ids, self.ids, causal=causal)


def make_mask(
    q_segment_ids: jax.Array,
    kv_segment_ids: jax.Array,
    *,
    causal: bool,
    q_offset: jax.Array | int = 0,
) -> jax.Array:
    """[B, T] x [B, S] segment ids -> [B, T, S] bool.

    Query t may see key s when both belong to the same non-zero segment and, if causal, the key's slot
    s is not after the query's slot `q_offset + t` (slots index the key/value buffer, e.g. a KV cache).
    Segment 0 marks padding; a padding query sees nothing (its output is finite and unused).
    """
    same = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]) & (kv_segment_ids[:, None, :] != 0)
    if not causal:
        return same
    t = q_segment_ids.shape[1]
    s = kv_segment_ids.shape[1]
    q_slot = q_offset + jnp.arange(t)[:, None]
    kv_slot = jnp.arange(s)[None, :]
    return same & (kv_slot <= q_slot)[None]


def _fused_module(name: str):
    # Imported on first use: the Pallas kernel modules are only needed on accelerators and in tests.
    if name == "splash":
        from llava_jax.models import splash

        return splash
    from llava_jax.models import flash_gpu

    return flash_gpu


def choose(
    implementation: str,
    q: jax.Array,
    k: jax.Array,
    *,
    masked: bool,
    backend: str | None = None,
    dense_mask: bool = False,
) -> str:
    """The kernel `attend` runs: `implementation` itself, or for `auto` a decision from static facts
    only (platform, dtype, shapes, whether a mask beyond causality is given and whether it is a dense
    array rather than segment ids)."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r}; choose one of {IMPLEMENTATIONS}")
    if implementation in FUSED:
        # A call the kernel cannot take (CLIP's 577 tokens, a KV-cache step) runs the XLA path.
        return implementation if not dense_mask and _fused_module(implementation).supports(q.shape, k.shape) else "xla"
    if implementation != "auto":
        return implementation
    backend = platform() if backend is None else backend
    if dense_mask:
        return "xla"
    if backend == "tpu":
        return "splash" if _fused_module("splash").supports(q.shape, k.shape) else "xla"
    if backend != "gpu" or q.dtype not in _HALF_DTYPES:
        return "xla"
    head_dim = q.shape[-1]
    cudnn_native = q.shape[1] == k.shape[1] and head_dim % 8 == 0 and head_dim <= 128
    if cudnn_native and not masked:
        return "cudnn"
    return "flash_gpu" if _fused_module("flash_gpu").supports(q.shape, k.shape) else "xla"


def cudnn_arguments(q, k, v, mask, *, causal: bool, scale: float) -> dict[str, Any]:
    """Keyword arguments for `jax.nn.dot_product_attention` that describe the whole mask: causality as
    `is_causal` (the kernel skips the blocks above the diagonal) and, when given, the segment/padding
    mask as a [B, 1, T, S] boolean `mask` (broadcast over heads)."""
    args = {"query": q, "key": k, "value": v, "scale": scale, "is_causal": causal}
    if mask is not None:
        args["mask"] = mask[:, None]
    return args


def _xla(q, k, v, mask, scale, causal):
    b, t, n, h = q.shape
    s, kvh = k.shape[1], k.shape[2]
    if mask is None and causal:
        mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, s), bool)), (b, t, s))
    q = q.reshape(b, t, kvh, n // kvh, h)
    scores = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v)
    return out.reshape(b, t, n, h)


def _fused(name: str, q, k, v, ids, scale: float, causal: bool):
    """Run fused kernel `name` on each device's rows: under a mesh, `shard_map` with rows split by the
    `batch` rule and heads over `tensor` when both head counts divide it (a Pallas call is opaque to
    XLA's partitioner, which would otherwise gather its operands)."""
    module = _fused_module(name)

    def run(q, k, v, ids):
        return module.local(q, k, v, ids, scale=scale, causal=causal, interpret=platform() == "cpu")

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return run(q, k, v, ids)
    batch = rules.spec(("batch",), (q.shape[0],), mesh)[0]
    ts = mesh.shape.get("tensor", 1)
    heads = "tensor" if ts > 1 and q.shape[2] % ts == 0 and k.shape[2] % ts == 0 else None
    x = PartitionSpec(batch, None, heads, None)
    if ids is None:
        return jax.shard_map(
            lambda q, k, v: run(q, k, v, None), mesh=mesh, in_specs=(x, x, x), out_specs=x, check_vma=False
        )(q, k, v)
    seg = PartitionSpec(batch, None)
    return jax.shard_map(run, mesh=mesh, in_specs=(x, x, x, seg), out_specs=x, check_vma=False)(q, k, v, ids)


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: Segments | jax.Array | None,
    *,
    implementation: str = "xla",
    scale: float | None = None,
    causal: bool = False,
) -> jax.Array:
    """Scaled dot-product attention.

    mask: None when nothing beyond `causal` is masked (one sequence per row, every token real);
    `Segments` for a self-attention call with packing/padding (causality from `causal`); or the full
    [B, T, S] bool mask (built by `make_mask`, causality included). Every kernel honours all of
    them; a fused kernel named for a call it cannot take (a dense mask, a length it does not tile)
    leaves that call to `xla`."""
    segments = isinstance(mask, Segments)
    dense = mask is not None and not segments
    implementation = choose(implementation, q, k, masked=mask is not None, dense_mask=dense)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if implementation in FUSED:
        return _fused(implementation, q, k, v, mask.ids if segments else None, scale, causal)
    if segments:
        mask = mask.dense(causal)
    if implementation == "cudnn":
        args = cudnn_arguments(q, k, v, mask, causal=causal, scale=scale)
        return jax.nn.dot_product_attention(**args, implementation="cudnn")
    return _xla(q, k, v, mask, scale, causal)
