"""Shared pieces for training tests: a small LLaVA config, random batches, state + step builders."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np

from llava_jax.models import LlamaConfig, LlavaConfig, VisionConfig
from llava_jax.parallel.mesh import make_mesh
from llava_jax.parallel.rules import batch_sharding
from llava_jax.training import optimizer
from llava_jax.training.config_schema import optim_config
from llava_jax.training.state import ModelSpec, abstract_state, init_params, new_state, param_shardings, state_shardings
from llava_jax.training.step import make_train_step
from llava_jax.training.trainable import trainable_mask

IMAGE_TOKEN = 500
SMALL = LlavaConfig(
    VisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4),
    LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        rms_norm_eps=1e-5,
        max_position_embeddings=128,
    ),
    "mlp2x_gelu",
    image_token_id=IMAGE_TOKEN,
    pad_token_id=501,
)
P = SMALL.num_image_tokens  # 16
L = 40


def random_batch(rows: int, seed: int) -> dict[str, np.ndarray]:
    """Rows alternate image+text / text-only; targets on the last 12 tokens; some right padding."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 499, (rows, L)).astype(np.int32)
    seg = np.ones((rows, L), np.int32)
    labels = np.full((rows, L), -100, np.int32)
    for r in range(rows):
        n = L - (r % 3) * 4  # row length
        if r % 2 == 0:
            ids[r, 1 : 1 + P] = IMAGE_TOKEN
        seg[r, n:] = 0
        ids[r, n:] = 501
        labels[r, n - 12 : n] = ids[r, n - 12 : n]
    return dict(
        input_ids=ids,
        labels=labels,
        segment_ids=seg,
        positions=np.tile(np.arange(L, dtype=np.int32), (rows, 1)),
        images=rng.integers(0, 256, (rows, 1, 32, 32, 3), dtype=np.uint8),
    )


def optim(lr=1e-2, **kw) -> mlc.ConfigDict:
    o = optim_config(lr)
    o.update(warmup_ratio=0.0, **kw)
    return o


@dataclasses.dataclass
class Setup:
    spec: ModelSpec
    mesh: object
    mask: object
    tx: object
    shardings: object
    step: object
    state: object
    batch_sharding: object

    def put(self, batch: dict) -> dict:
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, v) for k, v in batch.items()}


def build(
    mesh_shape=(1, 1, 1),
    devices=None,
    *,
    trainable="projector,llm",
    micro_batches=1,
    frozen_dtype=jnp.float32,
    cfg: LlavaConfig = SMALL,
    total_steps=10,
    seed=0,
    targets_per_row=0,
    loss_reduction="global_token_mean",
    loss_groups=1,
    objective="lm",
    **optim_kw,
) -> Setup:
    devices = devices if devices is not None else jax.devices()[: int(np.prod([max(s, 1) for s in mesh_shape]))]
    mesh = make_mesh(mesh_shape, devices=devices)
    spec = ModelSpec.create(cfg)
    mask = trainable_mask(spec.abstract, trainable)
    tx, lr = optimizer.make(optim(**optim_kw), spec.abstract, mask, total_steps)
    abstract = abstract_state(spec, mask, tx, frozen_dtype)
    psh = param_shardings(spec, mesh)
    ssh = state_shardings(abstract, psh, mesh)
    state = new_state(init_params(spec, seed, mask, frozen_dtype, psh), tx, ssh, seed)
    batch_sh = batch_sharding(mesh)
    step = jax.jit(
        make_train_step(
            spec.graphdef, tx, mask, lr, micro_batches, targets_per_row, loss_reduction, loss_groups, objective
        ),
        in_shardings=(ssh, batch_sh),
        out_shardings=(ssh, None),
    )
    return Setup(spec, mesh, mask, tx, ssh, step, state, batch_sh)


def run_steps(setup: Setup, batches) -> tuple[list[float], object]:
    losses = []
    state = setup.state
    with jax.set_mesh(setup.mesh):
        for b in batches:
            state, m = setup.step(state, setup.put(b))
            losses.append(float(m["loss"]))
    return losses, state
