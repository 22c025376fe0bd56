"""Train state: parameters (pure dict), optimizer state, step, RNG; created already sharded.

Parameters are a nested dict of arrays keyed like the model (`language_model/layers/q_proj/kernel`),
merged back into the NNX module inside the jitted step (`nnx.merge(graphdef, params)`). Each leaf's
sharding comes from its logical axes (model metadata) through the rules table; optimizer moments
take the sharding of the parameter they belong to.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llava_jax.models import Llava, LlavaConfig
from llava_jax.parallel import rules
from llava_jax.parallel.tree_paths import path_str


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 []
    params: Any  # nested dict of arrays
    opt_state: Any
    rng: jax.Array  # uint32 [2] raw key data


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything static about the model: its graph, abstract params and their logical axes."""

    cfg: LlavaConfig
    graphdef: Any
    abstract: Any  # nested dict of ShapeDtypeStruct
    axes: Any  # nested dict of logical-axis tuples

    @classmethod
    def create(cls, cfg: LlavaConfig) -> ModelSpec:
        model = nnx.eval_shape(lambda: Llava(cfg, rngs=nnx.Rngs(0)))
        graphdef, state = nnx.split(model)
        axes: dict = {}
        for path, var in nnx.to_flat_state(state):
            node = axes
            for k in path[:-1]:
                node = node.setdefault(k, {})
            node[path[-1]] = var.get_metadata().get("axes")
        return cls(cfg, graphdef, state.to_pure_dict(), axes)

    def num_params(self, mask: Any = None) -> int:
        leaves = (
            jax.tree.leaves(self.abstract)
            if mask is None
            else [a for a, t in zip(jax.tree.leaves(self.abstract), jax.tree.leaves(mask), strict=True) if t]
        )
        # an NF4 kernel (uint8, models/lora.py) packs two weights per element
        return int(sum(np.prod(a.shape) * (2 if a.dtype == jnp.uint8 else 1) for a in leaves))


def cast(params: Any, mask: Any, frozen_dtype, trainable_dtype=jnp.float32) -> Any:
    """Trainable leaves keep float32 masters; frozen leaves may be stored narrower (e.g. bf16).
    A quantised base (`models/lora.py`) keeps its int8 / uint8 (NF4) kernels and float32 `kernel_scale` /
    `kernel_absmax`. Works on
    arrays and on ShapeDtypeStructs."""

    def one(path, t, p):
        if not jnp.issubdtype(p.dtype, jnp.floating) or path_str(path).endswith(("/kernel_scale", "/kernel_absmax")):
            dtype = p.dtype
        else:
            dtype = trainable_dtype if t else frozen_dtype
        if isinstance(p, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(p.shape, dtype, sharding=p.sharding)
        return p.astype(dtype)

    return jax.tree_util.tree_map_with_path(one, mask, params)


def param_shardings(spec: ModelSpec, mesh: Mesh) -> Any:
    return jax.tree.map(
        lambda a, ax: rules.named(ax, a.shape, mesh),
        spec.abstract,
        spec.axes,
        is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct),
    )


def opt_state_shardings(abstract_opt_state: Any, params_sh: Any, mesh: Mesh) -> Any:
    """A moment leaf whose path ends with a parameter's path (and has its shape) is sharded like
    that parameter; counters and the like are replicated."""
    by_path = {}
    for path, sh in jax.tree_util.tree_leaves_with_path(params_sh, is_leaf=lambda x: isinstance(x, NamedSharding)):
        by_path[path_str(path)] = sh
    replicated = NamedSharding(mesh, PartitionSpec())

    def pick(path, leaf):
        keys = [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]
        for i in range(len(keys)):
            sh = by_path.get("/".join(keys[i:]))
            if sh is not None and len(sh.spec) <= len(leaf.shape):
                return sh
        return replicated

    return jax.tree_util.tree_map_with_path(pick, abstract_opt_state)


def state_shardings(abstract_state: TrainState, params_sh: Any, mesh: Mesh) -> TrainState:
    replicated = NamedSharding(mesh, PartitionSpec())
    return TrainState(
        step=replicated,
        params=params_sh,
        opt_state=opt_state_shardings(abstract_state.opt_state, params_sh, mesh),
        rng=replicated,
    )


def init_params(spec: ModelSpec, seed: int, mask: Any, frozen_dtype, shardings: Any) -> Any:
    """Random init, computed directly into its shards (never materialised on one host)."""

    def init():
        params = nnx.state(Llava(spec.cfg, rngs=nnx.Rngs(seed))).to_pure_dict()
        return cast(params, mask, frozen_dtype)

    return jax.jit(init, out_shardings=shardings)()


def abstract_state(spec: ModelSpec, mask: Any, tx, frozen_dtype) -> TrainState:
    """The train state as ShapeDtypeStructs (for shardings, restore targets and AOT compilation)."""
    params = cast(spec.abstract, mask, frozen_dtype)
    return TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32),
        params=params,
        opt_state=jax.eval_shape(tx.init, params),
        rng=jax.ShapeDtypeStruct((2,), jnp.uint32),
    )


def new_state(params: Any, tx, shardings: TrainState, seed: int) -> TrainState:
    """Step 0: given (sharded) parameters, a fresh optimizer state laid out like them."""
    return TrainState(
        step=jax.device_put(jnp.zeros((), jnp.int32), shardings.step),
        params=params,
        opt_state=jax.jit(tx.init, out_shardings=shardings.opt_state)(params),
        rng=jax.device_put(jax.random.key_data(jax.random.key(seed)), shardings.rng),
    )
