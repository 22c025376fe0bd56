"""The training loop: run the configured stages in order, each resumable.

    for each stage (stage1: projector; stage2: projector + LLM):
        mask      = which parameters train                      (trainable.py)
        tx        = clip + AdamW on trainable, set_to_zero else  (optimizer.py)
        state     = latest checkpoint, or initial weights        (checkpoint.py / init below)
        loop:       global batch -> jitted step -> metrics, checkpoints
        final     = final_params/ for the next stage, chat and export
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llava_jax.models import Llava, LlavaConfig, get_preset
from llava_jax.parallel.tree_paths import path_str
from llava_jax.paths import Path, PathLike, absolute, as_path
from llava_jax.parallel.mesh import describe, make_mesh
from llava_jax.training import optimizer, trainable
from llava_jax.training.loss import REDUCTIONS, max_targets_per_row
from llava_jax.training.checkpoint import Checkpointer, abstract_with_shardings, restore_params, save_params
from llava_jax.training.metrics import MetricWriter, peak_flops, step_flops
from llava_jax.training.state import (ModelSpec, abstract_state, init_params, new_state, param_shardings,
                                      state_shardings)
from llava_jax.training.step import MODEL_KEYS, make_train_step

log = logging.getLogger("llava_jax.train")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class NonFiniteLoss(RuntimeError):
    pass


# Preemption drill for resume tests: SIGKILL this process right after the checkpoint of this step.
_KILL_AFTER_STEP = int(os.environ.get("LLAVA_JAX_KILL_AFTER_STEP", "0"))


# ----------------------------------------------------------------------------- set-up


def _dtype(name: str, key: str):
    if name not in DTYPES:
        raise ValueError(f"config.{key}={name!r}: use one of {sorted(DTYPES)}")
    return DTYPES[name]


def model_config(config) -> LlavaConfig:
    return get_preset(config.model, dtype=_dtype(config.dtype, "dtype"), attention=config.attention,
                      remat=config.remat)


def data_iterator(config, stage, cfg: LlavaConfig):
    """This process's batches for a stage (repeating forever; the loop stops by step count)."""
    from llava_jax.data import pipeline

    d = stage.data
    source = pipeline.source_from_config({k: v for k, v in d.items() if v != ""})
    overrides = dict(image_size=cfg.vision.image_size, num_image_tokens=cfg.num_image_tokens,
                     global_batch_size=stage.batch_size, seed=config.seed, num_epochs=None)
    if d.max_images_per_row:
        overrides["max_images_per_row"] = d.max_images_per_row
    fields = {k: v for k, v in d.items() if k not in ("max_images_per_row",) and v != ""}
    it = pipeline.from_config(fields, source=source, **overrides)
    return it, len(source)


def total_steps(stage, num_records: int) -> int:
    if stage.num_steps > 0:
        return int(stage.num_steps)
    if stage.data.packing:
        raise ValueError("with data.packing the number of rows per epoch is not known in advance: set num_steps")
    return max(1, math.ceil(num_records * stage.epochs / stage.batch_size))


def check_batch_divides(stage, mesh: Mesh) -> None:
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if stage.batch_size % (shards * stage.micro_batches):
        raise ValueError(
            f"batch_size={stage.batch_size} must be divisible by data*fsdp={shards} times "
            f"micro_batches={stage.micro_batches}"
        )
    if stage.batch_size % jax.process_count():
        raise ValueError(f"batch_size={stage.batch_size} must be divisible by the {jax.process_count()} processes")
    loss_groups(stage, mesh)


def loss_groups(stage, mesh: Mesh) -> int:
    """Device groups per micro-batch for `loss_reduction='original'` (1 for the global mean)."""
    if stage.loss_reduction not in REDUCTIONS:
        raise ValueError(f"loss_reduction={stage.loss_reduction!r}: use one of {REDUCTIONS}")
    if stage.loss_reduction != "original":
        return 1
    if stage.loss_devices < 0:
        raise ValueError(f"loss_devices={stage.loss_devices}: use 0 (this mesh's data*fsdp) or the device count")
    groups = stage.loss_devices or mesh.shape["data"] * mesh.shape["fsdp"]
    if stage.batch_size % (groups * stage.micro_batches):
        raise ValueError(f"loss_reduction='original': batch_size={stage.batch_size} must be divisible by "
                         f"micro_batches={stage.micro_batches} times {groups} devices (loss_devices)")
    return groups


# ----------------------------------------------------------------------------- initial weights


def _place(arrays: dict[str, np.ndarray], target: Any, shardings: Any) -> Any:
    """Put host arrays (by '/'-path) into a params tree, each directly into its shards."""
    def put(path, a, sh):
        key = path_str(path)
        if key not in arrays:
            return a
        host = np.asarray(arrays[key]).astype(a.dtype)
        return jax.make_array_from_callback(host.shape, sh, lambda idx: host[idx])

    return jax.tree_util.tree_map_with_path(put, target, shardings)


def check_init_architecture(path: str, cfg: LlavaConfig, preset: str) -> None:
    """`config.init.llava` must hold the architecture of `config.model`: its config.json (llava-hf, or
    original LLaVA with a known mm_vision_tower) is read through transformers' config classes and
    compared field by field. The original's 32000-row vocabulary is fitted at load time, so the
    vocabulary size is not compared for it."""
    from llava_jax.convert import hf_config
    from llava_jax.models.config import architecture_differences

    directory = as_path(path)
    if not (directory / "config.json").exists():
        return
    d = hf_config.read_config(directory)
    if hf_config.is_original_llava(d):
        try:
            vision = hf_config.original_vision_config(d, None)
        except ValueError:  # a tower not known by name: its weights, if any, are checked by shape on load
            vision = cfg.vision
        theirs, _ = hf_config.original_llava_config(d, vision, vocab_size=cfg.llm.vocab_size)
    elif d.get("model_type") == "llava":
        theirs = hf_config.llava_config_from_hf(d)
    else:
        raise ValueError(f"config.init.llava={path}: config.json has model_type={d.get('model_type')!r}; it takes a "
                         "llava-hf or original LLaVA directory (use init.vision / init.llm for CLIP and LLaMA)")
    diffs = architecture_differences(cfg, theirs)
    if diffs:
        from llava_jax.models.presets import PRESETS

        match = [name for name, c in PRESETS.items() if not architecture_differences(c, theirs)]
        fix = f"set config.model={match[0]!r}" if match else "no preset has this architecture"
        raise ValueError(f"config.init.llava={path} does not have the architecture of config.model={preset!r} "
                         f"(model != checkpoint): {'; '.join(diffs)}; {fix}")


def initial_params(config, spec: ModelSpec, mask: Any, shardings: Any, previous_stage: str | None) -> Any:
    """Random init (seeded), then the pretrained parts named in config.init, then the projector of the
    previous stage (the original's `--pretrain_mm_mlp_adapter`)."""
    from llava_jax.convert import convert_arrays, open_checkpoint

    frozen_dtype = _dtype(config.frozen_dtype, "frozen_dtype")
    params = init_params(spec, config.seed, mask, frozen_dtype, shardings)
    abstract_model = nnx.eval_shape(lambda: Llava(spec.cfg, rngs=nnx.Rngs(0)))
    if config.init.llava:
        check_init_architecture(config.init.llava, spec.cfg, config.model)
    for key in ("llava", "vision", "llm"):
        path = config.init[key]
        if path:
            log.info("loading %s weights from %s", key, path)
            params = _place(convert_arrays(abstract_model, open_checkpoint(path)), params, shardings)
    if previous_stage:
        prev = as_path(previous_stage)
        if prev.is_file() or any(prev.glob("mm_projector.*")):  # the original's stage-1 output
            from llava_jax.convert import load_projector

            log.info("projector from %s", prev)
            return _place(load_projector(prev, cfg=spec.cfg), params, shardings)
        prev = prev / "final_params" if (prev / "final_params").exists() else prev
        log.info("projector from %s", prev)
        target = {"multi_modal_projector": jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            params["multi_modal_projector"], shardings["multi_modal_projector"])}
        params = {**params, **restore_params(prev, target, partial=True)}
    return params


# ----------------------------------------------------------------------------- one stage


def write_model_info(stage_dir: Path, cfg: LlavaConfig, template: str, aspect_ratio: str) -> None:
    """`model.json` beside `final_params/`: what chat, serving and export need to rebuild the model."""
    from llava_jax.models.config import config_to_dict

    info = {"model": config_to_dict(cfg), "template": template, "image_aspect_ratio": aspect_ratio,
            "params": "final_params"}
    (stage_dir / "model.json").write_text(json.dumps(info, indent=2))


def _over_cap(labels: np.ndarray, cap: int) -> bool:
    """Whether any row of this process's batch has more targets than the cap. In a multi-process run
    every process must pick the same step function, so the answer is agreed across processes."""
    over = max_targets_per_row(labels) > cap
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        over = bool(np.any(multihost_utils.process_allgather(np.array([over]))))
    return over


def _memory_note(compiled) -> str:
    mem = compiled.memory_analysis()
    if mem is None:
        return ""
    peak = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
    return f" (peak {peak / 1024 ** 3:.2f} GiB per device)"


@dataclasses.dataclass
class StageResult:
    name: str
    steps: int
    final_loss: float | None
    seconds: float
    params: Any = None


def train_stage(config, name: str, spec: ModelSpec, mesh: Mesh, workdir: Path,
                previous_stage: str | None) -> StageResult:
    stage = config[name]
    stage_dir = workdir / name
    done_marker = stage_dir / "DONE"
    psh = param_shardings(spec, mesh)
    if done_marker.exists():
        log.info("%s already finished (%s): skipping", name, done_marker)
        return StageResult(name, json.loads(done_marker.read_text())["steps"], None, 0.0)
    check_batch_divides(stage, mesh)
    t_start = time.time()

    mask = trainable.trainable_mask(spec.abstract, stage.trainable)
    data_iter, num_records = data_iterator(config, stage, spec.cfg)
    steps = total_steps(stage, num_records)
    tx, lr = optimizer.make(stage.optim, spec.abstract, mask, steps)
    abstract = abstract_state(spec, mask, tx, _dtype(config.frozen_dtype, "frozen_dtype"))
    ssh = state_shardings(abstract, psh, mesh)
    log.info("%s: %d steps of %d rows (%d records), mesh %s, trainable %s / %s params", name, steps,
             stage.batch_size, num_records, describe(mesh), f"{spec.num_params(mask):,}", f"{spec.num_params():,}")

    ckpt = Checkpointer(stage_dir / "checkpoints", every=stage.checkpoint_every, keep=stage.keep_checkpoints)
    latest = ckpt.latest_step()
    if latest is not None:
        log.info("%s: resuming from step %d", name, latest)
        state = ckpt.restore(latest, abstract_with_shardings(abstract, ssh), data_iter)
    else:
        state = new_state(initial_params(config, spec, mask, psh, previous_stage), tx, ssh, config.seed)

    batch_sh = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))

    variants = {"capped": stage.targets_per_row, "full": 0} if stage.targets_per_row else {"full": 0}
    jitted = {v: jax.jit(make_train_step(spec.graphdef, tx, mask, lr, stage.micro_batches, tpr, stage.loss_reduction,
                                         loss_groups(stage, mesh)),
                         in_shardings=(ssh, batch_sh), out_shardings=(ssh, None), donate_argnums=0)
              for v, tpr in variants.items()}
    compiled: dict[tuple, Any] = {}

    def step_fn(variant: str, state, batch):
        """The compiled step for this variant and batch shape; compiled on first need (the loop asks
        for every variant before step 1, so a long row later does not stall the run)."""
        key = (variant,) + tuple((k, v.shape, str(v.dtype)) for k, v in sorted(batch.items()))
        if key not in compiled:
            t = time.time()
            compiled[key] = jitted[variant].lower(state, batch).compile()
            what = "full-logits fallback step" if variant == "full" and stage.targets_per_row else "train step"
            log.info("%s: compiled the %s in %.1fs%s", name, what, time.time() - t, _memory_note(compiled[key]))
        return compiled[key]

    llm_trains = "llm" in trainable.parse_trainable(stage.trainable)
    writer = MetricWriter(stage_dir, total_steps=steps, desc=name, initial=int(state.step))
    skipped_total = 0
    last = None
    step = int(state.step)  # counted on the host from here on: no device sync per step
    t_log, step_at_log = None, step
    warned = False
    try:
        with jax.set_mesh(mesh):
            while step < steps:
                local = next(data_iter)  # overlaps with the previous step still running on device
                skipped_total += int(np.sum(local.get("meta_skipped", 0)))
                batch = {k: jax.make_array_from_process_local_data(batch_sh, local[k]) for k in MODEL_KEYS}
                if t_log is None:  # before the first step: compile every variant (a stall now, not mid-run)
                    for v in variants:
                        step_fn(v, state, batch)
                    t_log = time.time()
                variant = "capped" if stage.targets_per_row else "full"
                if stage.targets_per_row and _over_cap(local["labels"], stage.targets_per_row):
                    if not warned:
                        log.warning("%s: a batch has rows with more than targets_per_row=%d targets; such "
                                    "batches use full logits (slower; raise targets_per_row)", name,
                                    stage.targets_per_row)
                        warned = True
                    variant = "full"
                state, metrics = step_fn(variant, state, batch)(state, batch)
                step += 1
                writer.advance()
                final = step == steps
                if (config.log_every > 0 and step % config.log_every == 0) or ckpt.due(step, final=final) or final:
                    m = jax.device_get(metrics)  # waits for this step
                    if not (np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"])):
                        good = ckpt.latest_step()
                        where = (f"The last good checkpoint is step {good} in {ckpt.directory}." if good is not None
                                 else "No checkpoint of this stage was written.")
                        raise NonFiniteLoss(
                            f"{name}: loss {m['loss']}, gradient norm {m['grad_norm']} at step {step}; stopping "
                            f"without saving. {where} Lower optim.lr, raise warmup, or check the data."
                        )
                    dt = (time.time() - t_log) / max(step - step_at_log, 1)
                    t_log, step_at_log = time.time(), step
                    flops = step_flops(spec.cfg, tokens=local["input_ids"].size * jax.process_count(),
                                       seq_len=local["input_ids"].shape[1], llm_trainable=llm_trains,
                                       images=int(np.prod(local["images"].shape[:2])) * jax.process_count())
                    m.update(step_time=dt, tokens_per_s=float(m["tokens"]) / dt, skipped_samples=skipped_total,
                             flops_per_step=flops)
                    if peak_flops():
                        m["mfu"] = flops / dt / (peak_flops() * mesh.size)
                    writer.write(step, m)
                    last = float(m["loss"])
                ckpt.save(step, state, data_iter, final=final)  # only after the finiteness check above
                if step == _KILL_AFTER_STEP:  # preemption drill: die like a preempted host would
                    ckpt.wait()
                    os.kill(os.getpid(), signal.SIGKILL)
        ckpt.wait()
        save_params(stage_dir / "final_params", state.params)
        if jax.process_index() == 0:
            write_model_info(stage_dir, spec.cfg, stage.data.template, stage.data.image_aspect_ratio)
            done_marker.write_text(json.dumps({"steps": steps, "final_loss": last}))
    finally:
        writer.close()
        ckpt.close()
    log.info("%s: done, %d steps in %.0fs, final loss %s; weights in %s", name, steps, time.time() - t_start,
             f"{last:.4g}" if last is not None else "n/a", stage_dir / "final_params")
    return StageResult(name, steps, last, time.time() - t_start, state.params)


# ----------------------------------------------------------------------------- all stages


def run(config, workdir: PathLike) -> dict[str, Any]:
    """Run every stage in `config.stages`; returns per-stage results (and eval, if configured)."""
    workdir = absolute(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    mesh = make_mesh(config.mesh.ici, config.mesh.dcn)
    spec = ModelSpec.create(model_config(config))
    previous = config.init.stage1 or None
    results: dict[str, Any] = {}
    names = [s.strip() for s in config.stages.split(",") if s.strip()]
    for name in names:
        if name not in config:
            raise ValueError(f"config.stages names {name!r}, which is not a stage dict of this config")
        res = train_stage(config, name, spec, mesh, workdir, previous)
        results[name] = res
        previous = str(workdir / name)
    return results
