"""LLaMA / Vicuna decoder (transformers `LlamaForCausalLM` semantics) with a KV-cache path.

tokens [B, T] (or embeddings [B, T, D]) + positions [B, T] + segment ids [B, T] (0 = padding,
1..k = packed samples) -> logits [B, T, V] float32. RMSNorm, RoPE in the Hugging Face half-split
("rotate_half") layout (plain, linear or dynamic-NTK scaled: `rope.py`), grouped-query attention,
SwiGLU MLP, tied or untied output embedding. The blocks are stacked and scanned; `cfg.remat` names
the rematerialisation policy.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name as _name

from llava_jax.models import attention
from llava_jax.models.config import LlamaConfig
from llava_jax.models.lora import BLOCK_LINEARS, AdaptedLinear, is_target
from llava_jax.models.norms import RMSNorm
from llava_jax.models.rope import apply_rope, inverse_frequencies, rotation
from llava_jax.models.stacking import scan, stacked
from llava_jax.parallel.rules import constrain

_ACT = ("batch", "length", "act_embed")


class KVCache(NamedTuple):
    """Preallocated keys/values of every layer.

    k, v: [L, B, K, S, H] (heads before slots, so a decode step reads each head's keys and values as
    one contiguous run, with no transposed copy of the cache), or tuples of L per-layer arrays
    [B, K, S, H] (`per_layer=True`: each layer's attention reads its own buffer in place, where a
    layer slice of the stack is a copy on some backends, e.g. XLA:CPU); segment_ids: [B, S] (0 =
    empty or padding slot); index: int32 scalar, the next slot to write (all rows advance together;
    rows of different prompt lengths are left-padded).
    """

    k: jax.Array
    v: jax.Array
    segment_ids: jax.Array
    index: jax.Array

    @classmethod
    def init(cls, cfg: LlamaConfig, batch: int, length: int, dtype=None, per_layer: bool = False) -> KVCache:
        dtype = dtype or cfg.dtype
        if per_layer:
            shape = (batch, cfg.num_kv_heads, length, cfg.head_dim)
            k = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
            v = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
        else:
            shape = (cfg.num_layers, batch, cfg.num_kv_heads, length, cfg.head_dim)
            k, v = jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)
        return cls(k, v, jnp.zeros((batch, length), jnp.int32), jnp.zeros((), jnp.int32))


def _dense(cfg: LlamaConfig, din: int, dout: int, axes: tuple[str, str], rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(
        din,
        dout,
        use_bias=False,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        rngs=rngs,
        kernel_init=nnx.initializers.normal(0.02),
        kernel_metadata={"axes": axes},
    )


def _attend_cache(q, k, v, mask):
    """Attention over a cache slice in the cache's own layout: q [B, T, N, H], k/v [B, K, S, H], mask
    [B, T, S] -> [B, T, N, H]. The same float32 softmax as `attention.attend`'s xla path."""
    b, t, n, h = q.shape
    kvh = k.shape[1]
    q = q.reshape(b, t, kvh, n // kvh, h)
    scores = jnp.einsum("btkgh,bksh->bkgts", q, k, preferred_element_type=jnp.float32) * h**-0.5
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bksh->btkgh", probs, v).reshape(b, t, n, h)


def _block_dense(cfg: LlamaConfig, name: str, din: int, dout: int, axes: tuple[str, str], rngs: nnx.Rngs):
    """A block linear: `nnx.Linear`, or `AdaptedLinear` with a LoRA adapter (when `name` matches
    cfg.lora_targets) and/or an int8 / NF4 kernel (cfg.quantized_base)."""
    rank = cfg.lora_rank if cfg.lora_rank and is_target(name, cfg.lora_targets) else 0
    if not rank and cfg.quantized_base == "none":
        return _dense(cfg, din, dout, axes, rngs)
    return AdaptedLinear(
        din,
        dout,
        axes,
        rank=rank,
        alpha=cfg.lora_alpha,
        dropout=cfg.lora_dropout,
        quantized_base=cfg.quantized_base,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        rngs=rngs,
    )


def _apply(linear, x, key, index: int):
    """Call a block linear; an adapted one gets its own dropout key (fold_in of the block's key)."""
    if isinstance(linear, AdaptedLinear):
        return linear(x, None if key is None else jax.random.fold_in(key, index))
    return linear(x)


class LlamaBlock(nnx.Module):
    """x + attn(rmsnorm(x)); x + mlp(rmsnorm(x)). [B, T, D] -> [B, T, D]."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
        self.cfg = cfg
        self.input_layernorm = RMSNorm(d, eps=cfg.rms_norm_eps, param_dtype=cfg.param_dtype)
        self.q_proj = _block_dense(cfg, "q_proj", d, cfg.num_heads * hd, ("embed", "heads"), rngs)
        self.k_proj = _block_dense(cfg, "k_proj", d, cfg.num_kv_heads * hd, ("embed", "kv_heads"), rngs)
        self.v_proj = _block_dense(cfg, "v_proj", d, cfg.num_kv_heads * hd, ("embed", "kv_heads"), rngs)
        self.o_proj = _block_dense(cfg, "o_proj", cfg.num_heads * hd, d, ("heads", "embed"), rngs)
        self.post_attention_layernorm = RMSNorm(d, eps=cfg.rms_norm_eps, param_dtype=cfg.param_dtype)
        self.gate_proj = _block_dense(cfg, "gate_proj", d, f, ("embed", "mlp"), rngs)
        self.up_proj = _block_dense(cfg, "up_proj", d, f, ("embed", "mlp"), rngs)
        self.down_proj = _block_dense(cfg, "down_proj", f, d, ("mlp", "embed"), rngs)

    def __call__(self, x, rope, mask, cache=None, dropout_key=None):
        """x [B, T, D]; rope: (cos, sin) of the positions, each [B, T, H/2]; mask: None, segment ids
        (`attention.Segments`) or a [B, T, S] bool array (see `attention.attend`).

        cache: None, or (k, v, layer, index): the stacked caches of all layers [L, B, K, S, H], this
        block's layer and the first slot to write, or (layer=None) this block's own caches
        [B, K, S, H]. The new keys/values are written in place (only T slots change) and attention
        reads this layer's slice with the dense `mask`; with a `Segments` mask the cache is empty
        (index 0) and attention runs among the T new tokens only (`attention.attend`: no reads of
        empty slots, and the fused kernels where they apply). dropout_key: this block's key for the
        LoRA dropout (None: no dropout). Returns (x, (k, v) or None)."""
        cfg = self.cfg
        b, t, _ = x.shape
        idx = {n: i for i, n in enumerate(BLOCK_LINEARS)}

        def lin(name, h):
            return _apply(getattr(self, name), h, dropout_key, idx[name])

        h = self.input_layernorm(x)
        q = lin("q_proj", h).reshape(b, t, cfg.num_heads, cfg.head_dim)
        k = lin("k_proj", h).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        v = lin("v_proj", h).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        q = _name(apply_rope(q, *rope), "query_proj")
        k = _name(apply_rope(k, *rope), "key_proj")
        v = _name(v, "value_proj")
        kv = None
        if cache is None:
            a = attention.attend(q, k, v, mask, implementation=cfg.attention, causal=True)
        else:
            ks, vs, layer, index = cache
            k_new, v_new = k, v
            if layer is None:
                ks = jax.lax.dynamic_update_slice(ks, k.swapaxes(1, 2).astype(ks.dtype), (0, 0, index, 0))
                vs = jax.lax.dynamic_update_slice(vs, v.swapaxes(1, 2).astype(vs.dtype), (0, 0, index, 0))
                k, v = ks, vs
            else:
                start = (layer, 0, 0, index, 0)
                ks = jax.lax.dynamic_update_slice(ks, k.swapaxes(1, 2).astype(ks.dtype)[None], start)
                vs = jax.lax.dynamic_update_slice(vs, v.swapaxes(1, 2).astype(vs.dtype)[None], start)
                k = jax.lax.dynamic_index_in_dim(ks, layer, 0, keepdims=False)
                v = jax.lax.dynamic_index_in_dim(vs, layer, 0, keepdims=False)
            if isinstance(mask, attention.Segments):  # an empty cache: the T new tokens attend among themselves
                a = attention.attend(q, k_new, v_new, mask, implementation=cfg.attention, causal=True)
            else:  # fused kernels take no cache offsets: plain attention over this layer's cache slice
                a = _attend_cache(q, k.astype(q.dtype), v.astype(q.dtype), mask)
            kv = (ks, vs)
        x = x + _name(lin("o_proj", a.reshape(b, t, -1)), "out_proj")
        h = self.post_attention_layernorm(x)
        m = _name(jax.nn.silu(lin("gate_proj", h)) * lin("up_proj", h), "mlp_hidden")
        return x + lin("down_proj", m), kv


class Llama(nnx.Module):
    """Decoder-only LM. Parameter names follow transformers' `model.*` / `lm_head` keys."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed_tokens = nnx.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            rngs=rngs,
            embedding_init=nnx.initializers.normal(0.02),
            embedding_metadata={"axes": ("vocab", "embed")},
        )
        self.layers = stacked(lambda r: LlamaBlock(cfg, rngs=r), cfg.num_layers, rngs)
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=cfg.param_dtype)
        self.lm_head = (
            None if cfg.tie_word_embeddings else _dense(cfg, cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), rngs)
        )

    def inverse_frequencies(self, positions: jax.Array) -> jax.Array:
        """RoPE inverse frequencies [head_dim // 2] for a call at `positions` [B, T] (see `rope`)."""
        cfg = self.cfg
        return inverse_frequencies(
            cfg.head_dim,
            cfg.rope_theta,
            positions,
            rope_type=cfg.rope_type,
            factor=cfg.rope_factor,
            max_position_embeddings=cfg.max_position_embeddings,
        )

    def embed(self, tokens: jax.Array) -> jax.Array:
        """[B, T] int -> [B, T, D] in the compute dtype."""
        return self.embed_tokens(tokens).astype(self.cfg.dtype)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Final-normed hidden [B, T, D] -> logits [B, T, V] float32."""
        out = self.embed_tokens.attend(hidden) if self.lm_head is None else self.lm_head(hidden)
        return constrain(out.astype(jnp.float32), ("batch", "length", "act_vocab"))

    def layer_states(self) -> list[nnx.State]:
        """The state of each of the L stacked blocks, sliced out of the stacks (a copy)."""
        state = nnx.state(self.layers)
        return [jax.tree.map(lambda a, i=i: a[i], state) for i in range(self.cfg.num_layers)]

    def layer_list(self, states: list[nnx.State] | None = None) -> list[LlamaBlock]:
        """The L stacked blocks as separate modules, with the given `layer_states()` (default: sliced
        here). A decode loop takes them once, before the loop (or once per call, as program inputs),
        so that each step reads every weight where it lies instead of slicing it out of the stack
        again (see `hidden`'s `layers`)."""
        graphdef = nnx.graphdef(self.layers)
        return [nnx.merge(graphdef, s) for s in (self.layer_states() if states is None else states)]

    def hidden(
        self,
        embeddings,
        *,
        positions=None,
        segment_ids=None,
        cache: KVCache | None = None,
        dropout_key=None,
        layers: list[LlamaBlock] | None = None,
        prefill: bool = False,
    ):
        """Decoder stack + final norm. embeddings [B, T, D] -> ([B, T, D], cache).

        dropout_key: a PRNG key for the LoRA dropout in training (split per layer); None: none.
        With a per-layer `cache` (`KVCache.init(..., per_layer=True)`) the layers run one after the
        other, unrolled (each reads and writes its own cache buffer in place), taken from `layers`
        (`layer_list()`, e.g. made once before a decode loop) or else sliced from the stacks here.
        prefill=True promises an empty `cache` (index 0, as `KVCache.init` makes it): the T tokens
        then attend among themselves (causal, `segment_ids`) instead of over all S cache slots, which
        is the same result at a fraction of the cost when S > T."""
        cfg = self.cfg
        b, t, _ = embeddings.shape
        if segment_ids is None and cache is not None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        x = constrain(embeddings.astype(cfg.dtype), _ACT)
        rope = rotation(positions, self.inverse_frequencies(positions))
        if cache is None:
            # No segment ids: one sequence per row, every token real, so causality is the whole mask
            # (fused kernels build it themselves). With segment ids: packing and padding, as ids (the
            # fused kernels take them; the others build the [B, T, T] mask).
            mask = None if segment_ids is None else attention.Segments(segment_ids)

            def body(blk, c, key):
                return constrain(blk(c, rope, mask, dropout_key=key)[0], _ACT), None

            keys = None
            if dropout_key is not None and cfg.lora_rank and cfg.lora_dropout > 0:
                keys = jax.random.split(dropout_key, cfg.num_layers)
            x, _ = scan(self.layers, body, x, keys, policy=cfg.remat)
        else:
            kv_seg = jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids.astype(jnp.int32), (0, cache.index))
            if prefill:
                mask = attention.Segments(segment_ids.astype(jnp.int32))
            else:
                mask = attention.make_mask(segment_ids, kv_seg, causal=True, q_offset=cache.index)
            if isinstance(cache.k, (tuple, list)):
                ks, vs = list(cache.k), list(cache.v)
                for i, blk in enumerate(self.layer_list() if layers is None else layers):
                    x, (ks[i], vs[i]) = blk(x, rope, mask, (ks[i], vs[i], None, cache.index))
                    x = constrain(x, _ACT)
                return self.norm(x), KVCache(tuple(ks), tuple(vs), kv_seg, cache.index + t)

            # The caches ride in the scan carry, so each layer's write is an in-place update of T slots
            # (as scan outputs they would be rebuilt, a full cache copy per step).
            def body(blk, carry, _):
                c, ks, vs, layer = carry
                y, (ks, vs) = blk(c, rope, mask, (ks, vs, layer, cache.index))
                return (constrain(y, _ACT), ks, vs, layer + 1), None

            (x, ks, vs, _), _ = scan(
                self.layers, body, (x, cache.k, cache.v, jnp.zeros((), jnp.int32)), policy=cfg.remat
            )
            cache = KVCache(ks, vs, kv_seg, cache.index + t)
        return self.norm(x), cache

    def __call__(self, tokens=None, *, embeddings=None, positions=None, segment_ids=None, cache=None, dropout_key=None):
        """tokens [B, T] or embeddings [B, T, D] -> (logits [B, T, V] float32, cache or None)."""
        if (tokens is None) == (embeddings is None):
            raise ValueError("pass exactly one of tokens or embeddings")
        x = self.embed(tokens) if embeddings is None else embeddings
        h, cache = self.hidden(x, positions=positions, segment_ids=segment_ids, cache=cache, dropout_key=dropout_key)
        return self.logits(h), cache
