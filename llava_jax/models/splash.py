"""TPU fused attention: Pallas splash attention (jax.experimental.pallas.ops.tpu.splash_attention)
with segment ids.

The kernel works on one example at a time, q [N, T, H], k/v [K, T, H] (grouped-query attention
natively: N % K == 0), and never holds a [T, S] score matrix: it walks [block, block] tiles with an
online softmax and skips the tiles above the diagonal. Packing and padding come in as segment ids: a
query sees a key only when their ids are equal, and-ed with the causal mask. Padding (id 0)
therefore sees other padding; its outputs are unused (no loss at padding) and real tokens never see
it, so real outputs and every gradient equal the XLA path's, which masks padding out entirely.
`attention.attend` runs it per device (`shard_map`); on CPU it runs in Pallas interpret mode (tests).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as sa

BLOCKS = (512, 256, 128)  # tile sizes tried, largest first; the kernel's lane width is 128


def block_size(length: int) -> int | None:
    """The largest tile in BLOCKS that divides `length`, or None (then the kernel cannot run)."""
    return next((b for b in BLOCKS if length % b == 0), None)


def supports(q_shape, k_shape) -> bool:
    """Self-attention (q [B, T, N, H], k [B, S, K, H]) with T a multiple of a tile, N % K == 0."""
    return q_shape[1] == k_shape[1] and block_size(q_shape[1]) is not None and q_shape[2] % k_shape[2] == 0


def _kernel(heads: int, length: int, causal: bool, interpret: bool):
    b = block_size(length)
    sizes = sa.BlockSizes(
        block_q=b,
        block_kv=b,
        block_kv_compute=b,
        block_q_dkv=b,
        block_kv_dkv=b,
        block_kv_dkv_compute=b,
        block_q_dq=b,
        block_kv_dq=b,
    )
    one = sa.CausalMask((length, length)) if causal else sa.FullMask((length, length))
    mask = sa.MultiHeadMask([one] * heads)
    return sa.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def local(q, k, v, segment_ids, *, scale: float, causal: bool, interpret: bool) -> jax.Array:
    """One device's rows: q [b, T, N, H]; k, v [b, T, K, H]; segment_ids [b, T] int (0 = padding) or
    None (every token real) -> [b, T, N, H]."""
    # Built in the trace that uses it: its block tables become constants of that trace (the mask
    # processing itself is cached by the kernel's library).
    kernel = _kernel(q.shape[2], q.shape[1], causal, interpret)
    # The kernel takes heads first and applies no scale.
    qh = (q * jnp.asarray(scale, q.dtype)).transpose(0, 2, 1, 3)
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    if segment_ids is None:
        out = jax.vmap(kernel)(qh, kh, vh)
    else:
        ids = segment_ids.astype(jnp.int32)
        out = jax.vmap(lambda a, b, c, s: kernel(a, b, c, sa.SegmentIds(q=s, kv=s)))(qh, kh, vh, ids)
    return out.transpose(0, 2, 1, 3).astype(q.dtype)
