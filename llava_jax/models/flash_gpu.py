"""GPU fused attention with segment ids: the Pallas (Triton) flash-attention kernel of
jax.experimental.pallas.ops.gpu.attention, forward and backward.

The kernel walks [block_q, block_k] tiles of one (row, head) with an online softmax and never holds
a [T, S] score matrix. Packing and padding come in as segment ids [B, T]: a query sees a key only
when their ids are equal, and-ed with the causal mask. Padding (id 0) therefore sees other padding;
its outputs are unused and real tokens never see it, so real outputs and every gradient equal the
XLA path's. The kernel is multi-head only: grouped-query keys/values are repeated to the query heads
(a [b, T, N, H] copy, small next to the scores it replaces). `attention.attend` runs it per device
(`shard_map`); on CPU it runs in Pallas interpret mode (tests).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.gpu import attention as pallas_attention

BLOCK = 128  # the kernel's default forward tile; its backward tiles are 32
MAX_HEAD_DIM = 256


def supports(q_shape, k_shape) -> bool:
    """Self-attention (q [B, T, N, H], k [B, S, K, H]) with T a multiple of the tile and H <= 256."""
    return (
        q_shape[1] == k_shape[1]
        and q_shape[1] % BLOCK == 0
        and q_shape[3] <= MAX_HEAD_DIM
        and q_shape[2] % k_shape[2] == 0
    )


def local(q, k, v, segment_ids, *, scale: float, causal: bool, interpret: bool) -> jax.Array:
    """One device's rows: q [b, T, N, H]; k, v [b, T, K, H]; segment_ids [b, T] int (0 = padding) or
    None -> [b, T, N, H]."""
    groups = q.shape[2] // k.shape[2]
    if groups > 1:
        k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    ids = None if segment_ids is None else segment_ids.astype(jnp.int32)
    out = pallas_attention.mha(q, k, v, ids, sm_scale=float(scale), causal=causal, interpret=interpret)
    return out.astype(q.dtype)
