"""The set-up of one training stage, written once: the loop, the AOT memory report and the train-step
benchmark all start from `build_stage()`.

    setup = build_stage(config.stage2, spec, mesh, total_steps=1000, frozen_dtype=jnp.bfloat16)
    setup.mask              which parameters train (trainable.py)
    setup.tx, setup.lr      clip + AdamW on the trainable leaves, set_to_zero on the frozen ones; its schedule
    setup.abstract          the train state as ShapeDtypeStructs (no weights allocated)
    setup.state_shardings   where each leaf of that state lives on the mesh
    setup.batch_sharding    rows split by the `batch` rule of parallel/rules.py
    setup.jitted_steps()    {"capped" | "full": jitted step}: with targets_per_row, the capped step and the
                            full-logits step that a batch with a longer row falls back to

Nothing here touches data or weights: the abstract state and the shardings are everything an AOT
compilation needs, and the loop adds initial weights (or a checkpoint) and batches.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from llava_jax.models import LlavaConfig, get_preset
from llava_jax.models.config import DTYPES
from llava_jax.models.platform import cpu_compiler_options
from llava_jax.parallel import rules
from llava_jax.training import optimizer, trainable
from llava_jax.training.loss import REDUCTIONS
from llava_jax.training.state import ModelSpec, TrainState, abstract_state, param_shardings, state_shardings
from llava_jax.training.step import make_train_step


def dtype_of(name: str, key: str):
    """A dtype named in the config (`config.<key>`), from the model's dtype table."""
    if name not in DTYPES:
        raise ValueError(f"config.{key}={name!r}: use one of {sorted(DTYPES)}")
    return DTYPES[name]


def model_config(config) -> LlavaConfig:
    """The model of a run config: preset, compute dtype, attention kernel, remat policy and the LLM's
    LoRA adapters / base storage (`config.lora`)."""
    cfg = get_preset(
        config.model, dtype=dtype_of(config.dtype, "dtype"), attention=config.attention, remat=config.remat
    )
    lora = config.get("lora")
    if lora is None or (not lora.rank and lora.quantized_base == "none"):
        return cfg
    try:
        return cfg.with_lora(
            lora_rank=lora.rank,
            lora_alpha=float(lora.alpha),
            lora_dropout=float(lora.dropout),
            lora_targets=lora.targets,
            quantized_base=lora.quantized_base,
        )
    except ValueError as e:
        raise ValueError(f"config.lora: {e}") from None


def loss_groups(stage, mesh: Mesh) -> int:
    """Device groups per micro-batch for `loss_reduction='original'` (1 for the global mean)."""
    if stage.loss_reduction not in REDUCTIONS:
        raise ValueError(f"loss_reduction={stage.loss_reduction!r}: use one of {REDUCTIONS}")
    if stage.loss_reduction != "original":
        return 1
    if stage.loss_devices < 0:
        raise ValueError(f"loss_devices={stage.loss_devices}: use 0 (this mesh's data*fsdp) or the device count")
    groups = stage.loss_devices or rules.batch_shards(mesh)
    if stage.batch_size % (groups * stage.micro_batches):
        raise ValueError(
            f"loss_reduction='original': batch_size={stage.batch_size} must be divisible by "
            f"micro_batches={stage.micro_batches} times {groups} devices (loss_devices)"
        )
    return groups


def check_batch_divides(stage, mesh: Mesh) -> None:
    """The global batch splits evenly into micro-batches, batch shards and processes."""
    shards = rules.batch_shards(mesh)
    if stage.batch_size % (shards * stage.micro_batches):
        raise ValueError(
            f"batch_size={stage.batch_size} must be divisible by data*fsdp={shards} times "
            f"micro_batches={stage.micro_batches}"
        )
    if stage.batch_size % jax.process_count():
        raise ValueError(f"batch_size={stage.batch_size} must be divisible by the {jax.process_count()} processes")
    loss_groups(stage, mesh)


def step_compiler_options(mesh: Mesh) -> dict[str, str] | None:
    """XLA options for compiling the train step on `mesh`'s platform (models/platform.py; None: the
    defaults)."""
    return cpu_compiler_options(mesh.devices.flat[0].platform)


@dataclasses.dataclass(frozen=True)
class StageSetup:
    """Everything static about one stage on one mesh (see the module docstring)."""

    stage: Any  # the stage's config dict (config_schema.stage_config)
    spec: ModelSpec
    mesh: Mesh
    mask: Any  # pytree of bools like the params: True = trains in this stage
    tx: optax.GradientTransformation
    lr: optax.Schedule
    abstract: TrainState
    param_shardings: Any
    state_shardings: TrainState
    batch_sharding: NamedSharding
    loss_groups: int

    @property
    def step_variants(self) -> dict[str, int]:
        """Step name -> targets_per_row: the capped step and its full-logits fall-back, or one full step."""
        cap = self.stage.targets_per_row
        return {"capped": cap, "full": 0} if cap else {"full": 0}

    def jitted_step(self, targets_per_row: int, donate: bool = True):
        """(state, batch) -> (state, metrics), jitted with this stage's shardings."""
        step = make_train_step(
            self.spec.graphdef,
            self.tx,
            self.mask,
            self.lr,
            self.stage.micro_batches,
            targets_per_row,
            self.stage.loss_reduction,
            self.loss_groups,
            self.stage.get("objective", "lm"),
            float(self.stage.get("caption_prefix", 0.0)),
        )
        return jax.jit(
            step,
            in_shardings=(self.state_shardings, self.batch_sharding),
            out_shardings=(self.state_shardings, None),
            donate_argnums=0 if donate else (),
            compiler_options=step_compiler_options(self.mesh),
        )

    def jitted_steps(self, donate: bool = True) -> dict:
        return {v: self.jitted_step(cap, donate) for v, cap in self.step_variants.items()}

    def abstract_batch(self, length: int, images_per_row: int = 1) -> dict[str, jax.ShapeDtypeStruct]:
        """A global batch as ShapeDtypeStructs (for AOT compilation): B = batch_size rows of `length`."""
        b, s = self.stage.batch_size, self.spec.cfg.vision.image_size
        shapes = dict(input_ids=(b, length), labels=(b, length), positions=(b, length), segment_ids=(b, length))
        batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=self.batch_sharding) for k, shape in shapes.items()}
        batch["images"] = jax.ShapeDtypeStruct((b, images_per_row, s, s, 3), jnp.uint8, sharding=self.batch_sharding)
        return batch


def build_stage(stage, spec: ModelSpec, mesh: Mesh, *, total_steps: int, frozen_dtype) -> StageSetup:
    """The set-up of `stage` (a stage config dict) for `spec` on `mesh`, with a learning-rate schedule
    over `total_steps`; frozen weights are stored in `frozen_dtype`, trainable ones in float32."""
    check_batch_divides(stage, mesh)
    mask = trainable.trainable_mask(spec.abstract, stage.trainable)
    trainable.check_trainable_dtypes(spec.abstract, mask)
    tx, lr = optimizer.make(stage.optim, spec.abstract, mask, total_steps)
    abstract = abstract_state(spec, mask, tx, frozen_dtype)
    psh = param_shardings(spec, mesh)
    return StageSetup(
        stage,
        spec,
        mesh,
        mask,
        tx,
        lr,
        abstract,
        psh,
        state_shardings(abstract, psh, mesh),
        rules.batch_sharding(mesh),
        loss_groups(stage, mesh),
    )
