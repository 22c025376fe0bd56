"""The training loop: run the configured stages in order, each resumable.

for each stage (stage1: projector; stage2: projector + LLM; the demo's stage0: vision tower + LLM):
    setup     = mask, optimizer, shardings, jitted steps      (stage_setup.build_stage)
    state     = latest checkpoint, or initial weights        (checkpoint.py / init below)
    loop:       global batch -> jitted step -> metrics, NaN check, checkpoint, hooks
    final     = final_params/ for the next stage, chat and export
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from llava_jax.checkpoint import hf_config
from llava_jax.checkpoint.files import open_checkpoint
from llava_jax.checkpoint.hf_load import convert_arrays
from llava_jax.checkpoint.original import load_projector
from llava_jax.checkpoint.params import abstract_with_shardings, restore_params, save_params
from llava_jax.checkpoint.stage_dir import write_model_info
from llava_jax.data.settings import DataSettings
from llava_jax.models import Llava, LlavaConfig
from llava_jax.parallel.mesh import describe, make_mesh
from llava_jax.parallel.tree_paths import path_str
from llava_jax.paths import Path, PathLike, absolute, as_path
from llava_jax.training import trainable
from llava_jax.training.loss import max_targets_per_row
from llava_jax.training.metrics import MetricWriter, peak_flops, step_flops
from llava_jax.training.stage_setup import StageSetup, build_stage, check_batch_divides, dtype_of, model_config
from llava_jax.training.state import ModelSpec, init_params, new_state
from llava_jax.training.step import MODEL_KEYS
from llava_jax.training.train_checkpoint import Checkpointer

log = logging.getLogger("llava_jax.train")


class NonFiniteLoss(RuntimeError):
    pass


# ----------------------------------------------------------------------------- set-up


def data_iterator(config, stage, cfg: LlavaConfig):
    """This process's batches for a stage (repeating forever; the loop stops by step count), and the
    data source."""
    from llava_jax.data import pipeline

    settings = DataSettings.from_mapping(stage.data)
    source = pipeline.source_from_config(settings)
    it = pipeline.from_config(
        settings,
        source=source,
        image_size=cfg.vision.image_size,
        num_image_tokens=cfg.num_image_tokens,
        global_batch_size=stage.batch_size,
        seed=config.seed,
        num_epochs=None,
    )
    return it, source


def total_steps(config, stage, source, cfg: LlavaConfig) -> int:
    """num_steps, or the steps of `epochs` passes over the data. Without packing that is records x
    epochs / batch size; with packing the rows an epoch fills depend on the sample lengths and the
    shuffle, so every record is tokenized once (no images read) and the rows are counted as the
    pipeline fills them (`pipeline.count_batches`), per process shard; the smallest shard's count is
    the step count of every process (so they stop together)."""
    if stage.num_steps > 0:
        return int(stage.num_steps)
    if not stage.data.packing:
        return max(1, math.ceil(len(source) * stage.epochs / stage.batch_size))
    from llava_jax.data import pipeline
    from llava_jax.data.tokenizer import load_tokenizer

    settings = DataSettings.from_mapping(stage.data)
    tokenizer = load_tokenizer(settings.tokenizer_path) if settings.tokenizer_path else load_tokenizer()
    t = time.time()
    counts = [
        pipeline.count_batches(
            source,
            tokenizer=tokenizer,
            num_image_tokens=cfg.num_image_tokens,
            global_batch_size=stage.batch_size,
            seed=config.seed,
            epochs=stage.epochs,
            settings=settings,
            shard_index=shard,
            shard_count=jax.process_count(),
        )
        for shard in range(jax.process_count())
    ]
    log.info(
        "packing: %s epochs of %d records fill %d steps of %d rows (counted in %.0fs)",
        f"{stage.epochs:g}",
        len(source),
        min(counts),
        stage.batch_size,
        time.time() - t,
    )
    return max(1, min(counts))


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
        raise ValueError(
            f"config.init.llava={path}: config.json has model_type={d.get('model_type')!r}; it takes a "
            "llava-hf or original LLaVA directory (use init.vision / init.llm for CLIP and LLaMA)"
        )
    diffs = architecture_differences(cfg, theirs)
    if diffs:
        from llava_jax.models.presets import PRESETS

        match = [name for name, c in PRESETS.items() if not architecture_differences(c, theirs)]
        fix = f"set config.model={match[0]!r}" if match else "no preset has this architecture"
        raise ValueError(
            f"config.init.llava={path} does not have the architecture of config.model={preset!r} "
            f"(model != checkpoint): {'; '.join(diffs)}; {fix}"
        )


def initial_params(
    config, spec: ModelSpec, mask: Any, shardings: Any, previous_stage: str | None, pretrained: dict | None = None
) -> Any:
    """Random init (seeded), then the pretrained parts named in config.init, then the parts that an
    earlier stage of this run pretrained (`pretrained`: part -> that stage's dir, e.g. stage 0's vision
    tower and LLM), then the projector of the previous stage (the original's `--pretrain_mm_mlp_adapter`)."""
    frozen_dtype = dtype_of(config.frozen_dtype, "frozen_dtype")
    params = init_params(spec, config.seed, mask, frozen_dtype, shardings)
    abstract_model = nnx.eval_shape(lambda: Llava(spec.cfg, rngs=nnx.Rngs(0)))
    if config.init.llava:
        check_init_architecture(config.init.llava, spec.cfg, config.model)
    for key in ("llava", "vision", "llm"):
        path = config.init[key]
        if path:
            log.info("loading %s weights from %s", key, path)
            params = _place(convert_arrays(abstract_model, open_checkpoint(path)), params, shardings)
    for part, stage_dir in (pretrained or {}).items():
        log.info("%s from %s", part, stage_dir)
        params = {**params, **_restore_part(params, shardings, trainable.PART_KEYS[part], as_path(stage_dir))}
    if previous_stage:
        prev = as_path(previous_stage)
        if prev.is_file() or any(prev.glob("mm_projector.*")):  # the original's stage-1 output
            log.info("projector from %s", prev)
            return _place(load_projector(prev, cfg=spec.cfg), params, shardings)
        log.info("projector from %s", prev)
        params = {**params, **_restore_part(params, shardings, "multi_modal_projector", prev)}
    return params


def _restore_part(params: Any, shardings: Any, key: str, directory: Path) -> dict:
    """{key: params[key] as read from `directory` (a stage dir or its final_params), in params' dtypes}."""
    if (directory / "final_params").exists():
        directory = directory / "final_params"
    target = {
        key: jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), params[key], shardings[key])
    }
    return restore_params(directory, target, partial=True)


# ----------------------------------------------------------------------------- one stage


@dataclasses.dataclass
class StageResult:
    name: str
    steps: int
    final_loss: float | None
    seconds: float
    params: Any = None


# Called after every step, once its checkpoint (if due) is saved: hook(step, checkpointer).
StepHook = Callable[[int, Checkpointer], None]


def train_stage(
    config,
    name: str,
    spec: ModelSpec,
    mesh: Mesh,
    workdir: Path,
    previous_stage: str | None,
    hooks: Sequence[StepHook] = (),
    pretrained: dict | None = None,
) -> StageResult:
    """Train one stage to its last step (resuming from its latest checkpoint) and write its final weights.
    `pretrained`: part -> the dir of the earlier stage whose trained weights of that part to start from."""
    stage, stage_dir = config[name], workdir / name
    if (stage_dir / "DONE").exists():
        return _finished_before(name, stage_dir)
    t_start = time.time()
    check_batch_divides(stage, mesh)
    data_iter, source = data_iterator(config, stage, spec.cfg)
    num_records = len(source)
    steps = total_steps(config, stage, source, spec.cfg)
    frozen_dtype = dtype_of(config.frozen_dtype, "frozen_dtype")
    setup = build_stage(stage, spec, mesh, total_steps=steps, frozen_dtype=frozen_dtype)
    log.info(
        "%s: %d steps of %d rows (%d records), mesh %s, trainable %s / %s params",
        name,
        steps,
        stage.batch_size,
        num_records,
        describe(mesh),
        f"{spec.num_params(setup.mask):,}",
        f"{spec.num_params():,}",
    )
    ckpt = Checkpointer(stage_dir / "checkpoints", every=stage.checkpoint_every, keep=stage.keep_checkpoints)
    state = _restore_or_init(config, name, setup, ckpt, data_iter, previous_stage, pretrained)
    writer = MetricWriter(stage_dir, total_steps=steps, desc=name, initial=int(state.step))
    try:
        state, last = _run_steps(config, name, setup, state, data_iter, steps, ckpt, writer, hooks)
        ckpt.wait()
        _write_final(stage_dir, setup, state, steps, last)
    finally:
        writer.close()
        ckpt.close()
    log.info(
        "%s: done, %d steps in %.0fs, final loss %s; weights in %s",
        name,
        steps,
        time.time() - t_start,
        f"{last:.4g}" if last is not None else "n/a",
        stage_dir / "final_params",
    )
    return StageResult(name, steps, last, time.time() - t_start, state.params)


def _run_steps(
    config,
    name: str,
    setup: StageSetup,
    state,
    data_iter,
    steps: int,
    ckpt: Checkpointer,
    writer: MetricWriter,
    hooks: Sequence[StepHook],
) -> tuple[Any, float | None]:
    """The step loop: batch -> step -> (metrics, finiteness check) -> checkpoint -> hooks."""
    train_step = CompiledSteps(setup, name)
    meter = Throughput(setup)
    step = int(state.step)  # counted on the host from here on: no device sync per step
    skipped, last = 0, None
    with jax.set_mesh(setup.mesh):
        while step < steps:
            local = next(data_iter)  # overlaps with the previous step still running on device
            skipped += int(np.sum(local.get("meta_skipped", 0)))
            batch = {k: jax.make_array_from_process_local_data(setup.batch_sharding, local[k]) for k in MODEL_KEYS}
            if not train_step.ready:  # before the first step: compile every variant (a stall now, not mid-run)
                train_step.compile_all(state, batch)
                meter.restart(step)
            state, metrics = train_step(state, batch, local["labels"])
            step += 1
            writer.advance()
            final = step == steps
            if (config.log_every > 0 and step % config.log_every == 0) or ckpt.due(step, final=final) or final:
                last = _write_metrics(name, step, metrics, local, skipped, meter, ckpt, writer)
            ckpt.save(step, state, data_iter, final=final)  # only after the finiteness check above
            for hook in hooks:
                hook(step, ckpt)
    return state, last


# ----------------------------------------------------------------------------- the stage's steps


def _finished_before(name: str, stage_dir: Path) -> StageResult:
    done_marker = stage_dir / "DONE"
    log.info("%s already finished (%s): skipping", name, done_marker)
    return StageResult(name, json.loads(done_marker.read_text())["steps"], None, 0.0)


def _restore_or_init(
    config, name: str, setup: StageSetup, ckpt: Checkpointer, data_iter, previous_stage: str | None, pretrained=None
):
    """The latest checkpoint of this stage (with the data position), or step 0 from the initial weights."""
    latest = ckpt.latest_step()
    if latest is not None:
        log.info("%s: resuming from step %d", name, latest)
        return ckpt.restore(latest, abstract_with_shardings(setup.abstract, setup.state_shardings), data_iter)
    params = initial_params(config, setup.spec, setup.mask, setup.param_shardings, previous_stage, pretrained)
    return new_state(params, setup.tx, setup.state_shardings, config.seed)


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
    return f" (peak {peak / 1024**3:.2f} GiB per device)"


class CompiledSteps:
    """The stage's step variants, each compiled once per batch shape; a call picks the variant for
    the batch (the full-logits fall-back when a row has more than targets_per_row targets)."""

    def __init__(self, setup: StageSetup, name: str):
        self.name, self.cap = name, setup.stage.targets_per_row
        self.eager = setup.stage.get("eager_fallback", True)
        self.jitted = setup.jitted_steps()
        self.compiled: dict[tuple, Any] = {}
        self.warned = False

    @property
    def ready(self) -> bool:
        return bool(self.compiled)

    def get(self, variant: str, state, batch):
        """The compiled step for this variant and batch shape; compiled on first need."""
        key = (variant,) + tuple((k, v.shape, str(v.dtype)) for k, v in sorted(batch.items()))
        if key not in self.compiled:
            t = time.time()
            self.compiled[key] = self.jitted[variant].lower(state, batch).compile()
            what = "full-logits fallback step" if variant == "full" and self.cap else "train step"
            log.info(
                "%s: compiled the %s in %.1fs%s", self.name, what, time.time() - t, _memory_note(self.compiled[key])
            )
        return self.compiled[key]

    def compile_all(self, state, batch) -> None:
        """Every variant (or, with eager_fallback off, the capped one) for this batch shape."""
        for variant in self.jitted:
            if self.eager or variant != "full" or not self.cap:
                self.get(variant, state, batch)

    def variant(self, labels: np.ndarray) -> str:
        if not self.cap:
            return "full"
        if not _over_cap(labels, self.cap):
            return "capped"
        if not self.warned:
            log.warning(
                "%s: a batch has rows with more than targets_per_row=%d targets; such batches use full "
                "logits (slower; raise targets_per_row)",
                self.name,
                self.cap,
            )
            self.warned = True
        return "full"

    def __call__(self, state, batch, labels: np.ndarray):
        return self.get(self.variant(labels), state, batch)(state, batch)


class Throughput:
    """Step time, tokens/s, FLOPs and MFU averaged over the steps since the last metrics row."""

    def __init__(self, setup: StageSetup):
        self.cfg, self.devices = setup.spec.cfg, setup.mesh.size
        self.llm_trains = "llm" in trainable.parse_trainable(setup.stage.trainable)
        self.t, self.step = time.time(), 0

    def restart(self, step: int) -> None:
        self.t, self.step = time.time(), step

    def figures(self, step: int, tokens: float, local: dict, skipped: int) -> dict:
        dt = (time.time() - self.t) / max(step - self.step, 1)
        self.restart(step)
        flops = step_flops(
            self.cfg,
            tokens=local["input_ids"].size * jax.process_count(),
            seq_len=local["input_ids"].shape[1],
            llm_trainable=self.llm_trains,
            images=int(np.prod(local["images"].shape[:2])) * jax.process_count(),
        )
        positions = local["input_ids"].size * jax.process_count()
        out = dict(
            step_time=dt,
            tokens_per_s=positions / dt,  # row positions, padding included: what the step computes
            effective_tokens_per_s=tokens / dt,  # real (non-padding) tokens
            padding_fraction=1.0 - tokens / positions,
            skipped_samples=skipped,
            flops_per_step=flops,
        )
        if peak_flops():
            out["mfu"] = flops / dt / (peak_flops() * self.devices)
        return out


def check_finite(name: str, step: int, m: dict, ckpt: Checkpointer) -> None:
    """Stop before a non-finite state is saved, naming the last good checkpoint."""
    if np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"]):
        return
    good = ckpt.latest_step()
    where = (
        f"The last good checkpoint is step {good} in {ckpt.directory}."
        if good is not None
        else "No checkpoint of this stage was written."
    )
    raise NonFiniteLoss(
        f"{name}: loss {m['loss']}, gradient norm {m['grad_norm']} at step {step}; stopping "
        f"without saving. {where} Lower optim.lr, raise warmup, or check the data."
    )


def _write_metrics(
    name: str,
    step: int,
    metrics,
    local: dict,
    skipped: int,
    meter: Throughput,
    ckpt: Checkpointer,
    writer: MetricWriter,
) -> float:
    """Wait for this step, check it is finite, and write its metrics row; returns its loss."""
    m = jax.device_get(metrics)
    check_finite(name, step, m, ckpt)
    m.update(meter.figures(step, float(m["tokens"]), local, skipped))
    writer.write(step, m)
    return float(m["loss"])


def _write_final(stage_dir: Path, setup: StageSetup, state, steps: int, last: float | None) -> None:
    """final_params/ and model.json for the next stage, chat and export; then the DONE marker."""
    save_params(stage_dir / "final_params", state.params)
    if jax.process_index() == 0:
        data = setup.stage.data
        write_model_info(stage_dir, setup.spec.cfg, data.template, data.image_aspect_ratio)
        (stage_dir / "DONE").write_text(json.dumps({"steps": steps, "final_loss": last}))


# ----------------------------------------------------------------------------- all stages


def run(config, workdir: PathLike, hooks: Sequence[StepHook] = ()) -> dict[str, Any]:
    """Run every stage in `config.stages`; returns per-stage results. `hooks` are called after every
    step of every stage (see StepHook)."""
    workdir = absolute(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    mesh = make_mesh(config.mesh.ici, config.mesh.dcn)
    spec = ModelSpec.create(model_config(config))
    previous = config.init.stage1 or None
    pretrained: dict[str, str] = {}  # vision / llm -> the latest stage that trained it (stage 0)
    results: dict[str, Any] = {}
    names = [s.strip() for s in config.stages.split(",") if s.strip()]
    for name in names:
        if name not in config:
            raise ValueError(f"config.stages names {name!r}, which is not a stage dict of this config")
        res = train_stage(config, name, spec, mesh, workdir, previous, hooks=hooks, pretrained=dict(pretrained))
        results[name] = res
        parts = trainable.parse_trainable(config[name].trainable)
        if "projector" in parts:
            previous = str(workdir / name)
        pretrained.update({p: str(workdir / name) for p in parts if p != "projector"})
    return results
