"""Ahead-of-time memory check: compile the real-size train step of every configured stage with no
weights allocated, and print per-device memory from the compiled executable. With `targets_per_row`
set, the full-logits step that the run compiles for batches with a longer row is reported too.

    python -m llava_jax.train --config configs/stage2_finetune.py:vicuna-13b --aot --fake_devices 8
    python -m llava_jax.train --config configs/stage2_finetune.py:vicuna-13b --aot --topology v5p:2x2x2

`--fake_devices N`: the CPU backend compiles for N fake devices with the run's mesh and shardings, so
parameter, optimizer-state and batch bytes per device are exact; temporaries are the CPU compiler's
schedule, an estimate. `--topology NAME [--slices K]`: the real TPU compiler (libtpu, no TPU needed)
compiles for that topology, so every figure is what the TPU run allocates, compared with the chip's
HBM; FLOPs per step come from the compiled cost analysis. A stage that does not fit is recompiled with
the knobs a user has (frozen dtype, FSDP width, micro-batches, remat policy), cheapest first, and the
first setting that fits is printed (`--fit_tries` bounds the number of compiles). `--hbm_gib G` sets
the budget per device instead of the chip's HBM (a reserve, a chip the table does not know), and gives
the CPU estimate (`--fake_devices`) a verdict and the same search too.
"""

from __future__ import annotations

import dataclasses
import re

import jax

from llava_jax.checkpoint.params import abstract_with_shardings
from llava_jax.data.settings import DataSettings
from llava_jax.parallel import topology as topo
from llava_jax.parallel.mesh import describe, make_mesh, resolve_shape
from llava_jax.training import metrics
from llava_jax.training.stage_setup import build_stage, dtype_of, model_config
from llava_jax.training.state import ModelSpec

GiB = 1024**3
# Remat policies from the least recomputation (fastest, most memory) to the most.
REMAT_ORDER = ("none", "dots", "qkv_mlp", "qkv_proj", "full")
_OOM = re.compile(r"HLO temporaries \(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)")


def _bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _flops(compiled) -> float | None:
    """FLOPs of one call of the executable (per device for an SPMD program), or None if not reported."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 (some backends do not implement it)
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])


def compile_stage(config, name: str, spec: ModelSpec, mesh) -> dict:
    """Compile stage `name`'s train step for `mesh`; per-device memory (GiB) and FLOPs."""
    stage = config[name]
    setup = build_stage(
        stage,
        spec,
        mesh,
        total_steps=max(stage.num_steps, 1000),
        frozen_dtype=dtype_of(config.frozen_dtype, "frozen_dtype"),
    )
    cfg = spec.cfg
    b, length = stage.batch_size, stage.data.max_length
    m = DataSettings.from_mapping(stage.data).images_per_row(cfg.num_image_tokens)  # as the pipeline fills rows
    batch = setup.abstract_batch(length, m)
    state = abstract_with_shardings(setup.abstract, setup.state_shardings)
    n = mesh.size
    out = {
        "stage": name,
        "mesh": describe(mesh),
        "devices": n,
        "batch": f"{b} x {length} (micro_batches={stage.micro_batches})",
        "images_per_row": m,
        "remat": cfg.llm.remat,
        "frozen_dtype": config.frozen_dtype,
        "llm_base": cfg.llm.quantized_base if cfg.llm.quantized_base != "none" else config.frozen_dtype,
        "lora_rank": cfg.llm.lora_rank,
        "trainable_params": spec.num_params(setup.mask),
        "params_GiB": _bytes(setup.abstract.params) / n / GiB,
        "opt_state_GiB": _bytes(setup.abstract.opt_state) / n / GiB,
        "model_flops": metrics.step_flops(
            cfg, tokens=b * length, images=b * m, seq_len=length, llm_trainable="llm" in stage.trainable
        ),
    }
    # With targets_per_row the run also compiles the full-logits step, for batches with a longer row.
    prefixes = {"capped": "", "full": "full_logits_" if stage.targets_per_row else ""}
    for variant, step in setup.jitted_steps().items():
        prefix = prefixes[variant]
        with jax.set_mesh(mesh):
            lowered = step.lower(state, batch)
            try:
                compiled = lowered.compile()
            except jax.errors.JaxRuntimeError as e:
                if not _record_oom(out, prefix, e):
                    raise
                if not prefix:
                    return out
                continue
        if not prefix:
            out["flops_per_device"] = _flops(compiled)
        out.update(_memory_row(compiled, prefix))
    return out


def _record_oom(out: dict, prefix: str, e: Exception) -> bool:
    """The TPU compiler refuses a program that cannot fit HBM and says how much it needs: record that
    in the row (True), or False for any other error."""
    m_ = _OOM.search(str(e))
    if "RESOURCE_EXHAUSTED" not in str(e) or m_ is None:
        return False
    out.update(
        {
            f"{prefix}oom": str(e).splitlines()[0],
            f"{prefix}temps_GiB": float(m_.group(1)),
            f"{prefix}hbm_available_GiB": float(m_.group(2)),
        }
    )
    return True


def _memory_row(compiled, prefix: str) -> dict:
    mem = compiled.memory_analysis()
    if mem is None:
        return {}
    args, outs = mem.argument_size_in_bytes, mem.output_size_in_bytes
    temp, alias = mem.temp_size_in_bytes, mem.alias_size_in_bytes
    return {
        f"{prefix}arguments_GiB": args / GiB,
        f"{prefix}outputs_GiB": outs / GiB,
        f"{prefix}temps_GiB": temp / GiB,
        f"{prefix}peak_GiB": (args + outs + temp - alias) / GiB,
    }


@dataclasses.dataclass(frozen=True)
class Setting:
    """The memory knobs of one stage."""

    frozen_dtype: str
    ici: tuple[int, ...]
    micro_batches: int
    remat: str

    def describe(self, name: str) -> str:
        return (
            f"--config.frozen_dtype={self.frozen_dtype} --config.mesh.ici='{self.ici}' "
            f"--config.{name}.micro_batches={self.micro_batches} --config.remat={self.remat}"
        )

    def apply(self, config, name: str):
        c = config.copy_and_resolve_references()
        c.frozen_dtype = self.frozen_dtype
        c.mesh.ici = self.ici
        c[name].micro_batches = self.micro_batches
        c.remat = self.remat
        return c


def candidates(config, name: str, devices_per_slice: int) -> list[Setting]:
    """Settings to try when stage `name` does not fit, cheapest first: free knobs (bf16 frozen weights,
    FSDP over every chip of a slice) before micro-batches (same FLOPs, smaller passes) before heavier
    remat (extra recomputation), and within a remat policy fewer micro-batches first."""
    stage = config[name]
    free = Setting("bfloat16", (1, devices_per_slice, 1), stage.micro_batches, config.remat)
    shards = devices_per_slice * max(1, int(_prod(config.mesh.dcn)))
    start = REMAT_ORDER.index(config.remat) if config.remat in REMAT_ORDER else 0
    out = []
    for remat in REMAT_ORDER[start:]:
        mb = stage.micro_batches
        while stage.batch_size % (shards * mb) == 0:
            out.append(dataclasses.replace(free, micro_batches=mb, remat=remat))
            mb *= 2
    ici = resolve_shape(config.mesh.ici, devices_per_slice, "mesh.ici")
    current = Setting(config.frozen_dtype, ici, stage.micro_batches, config.remat)
    return [s for s in out if s != current]


def _prod(xs) -> int:
    p = 1
    for x in xs:
        p *= int(x)
    return p


def peak_of(row: dict) -> float | None:
    """A stage's peak per device: the larger of its compiled steps (the capped one and, with
    targets_per_row, the full-logits one); None when a step has no memory analysis or did not compile."""
    if "oom" in row or "full_logits_oom" in row or row.get("peak_GiB") is None:
        return None
    return max(row["peak_GiB"], row.get("full_logits_peak_GiB") or 0.0)


def _fits(row: dict, hbm_gib: float) -> bool:
    peak = peak_of(row)
    return peak is not None and peak <= hbm_gib


def _verdict(row: dict, hbm_gib: float) -> str:
    if "oom" in row:
        return (
            f"does not fit: the TPU compiler needs {row['temps_GiB']:.2f} GiB of temporaries, "
            f"{row['hbm_available_GiB']:.2f} GiB of HBM is available"
        )
    if "full_logits_oom" in row:
        return "does not fit: the full-logits fall-back step exceeds HBM"
    peak = peak_of(row)
    if peak is None:
        return "no memory analysis"
    if peak <= hbm_gib:
        return f"fits ({hbm_gib - peak:.1f} GiB free of {hbm_gib:g})"
    return f"does not fit, by {peak - hbm_gib:.1f} GiB ({hbm_gib:g} GiB HBM)"


def _print_row(row: dict, chip: topo.Chip | None) -> None:
    lora = f", LoRA rank {row['lora_rank']}, LLM base {row['llm_base']}" if row.get("lora_rank") else ""
    if not lora and row.get("llm_base", row["frozen_dtype"]) != row["frozen_dtype"]:
        lora = f", LLM base {row['llm_base']}"
    print(
        f"  {row['stage']}: batch {row['batch']}, remat {row['remat']}, frozen {row['frozen_dtype']}{lora}, "
        f"mesh {row['mesh']}; {row['trainable_params']:,} trainable parameters"
    )
    line = "    per device: params {params_GiB:.2f} GiB, optimizer {opt_state_GiB:.2f} GiB".format(**row)
    if "peak_GiB" in row:
        line += ", temps {temps_GiB:.2f} GiB, peak {peak_GiB:.2f} GiB".format(**row)
    elif "oom" in row:
        line += ", temps over {temps_GiB:.2f} GiB".format(**row)
    if chip is not None:
        line += f": {_verdict(row, chip.hbm_gib)}"
    print(line)
    if "full_logits_peak_GiB" in row:
        print(
            "    full-logits fall-back step (a row with more than targets_per_row targets): temps "
            "{full_logits_temps_GiB:.2f} GiB, peak {full_logits_peak_GiB:.2f} GiB".format(**row)
        )
    elif "full_logits_oom" in row:
        print("    full-logits fall-back step: temps over {full_logits_temps_GiB:.2f} GiB (does not fit)".format(**row))
    # XLA's cost analysis counts a while-loop body once, so with scanned layers the compiled figure
    # is about one layer's worth; the model figure (metrics.step_flops) counts every layer.
    if "oom" in row:
        return
    f, model = row.get("flops_per_device"), row["model_flops"]
    msg = f"    FLOPs per step: model {model:.3e} ({model / row['devices']:.3e} per device)"
    if f:
        msg += f"; compiled cost analysis {f * row['devices']:.3e} (scanned layer stacks counted once)"
    print(msg)
    if chip is not None and chip.bf16_tflops:
        print(
            f"    >= {model / row['devices'] / (chip.bf16_tflops * 1e12):.2f} s per step at the chip's peak bf16 rate"
        )


def fit(config, name: str, chip: topo.Chip, devices: list, slices: int, tries: int) -> dict | None:
    """Recompile stage `name` with cheaper-to-costlier settings until one fits `chip`'s HBM."""
    per_slice = len(devices) // slices
    settings = candidates(config, name, per_slice)
    print(f"    searching {min(tries, len(settings))} of {len(settings)} settings, cheapest first ...")
    for setting in settings[:tries]:
        c = setting.apply(config, name)
        mesh = make_mesh(c.mesh.ici, c.mesh.dcn, devices=devices)
        row = compile_stage(c, name, ModelSpec.create(model_config(c)), mesh)
        peak = peak_of(row)
        print(
            f"      {setting.describe(name)}: "
            + (f"peak {peak:.2f} GiB" if peak is not None else _verdict(row, chip.hbm_gib))
        )
        if _fits(row, chip.hbm_gib):
            print(f"    cheapest setting that fits: {setting.describe(name)}")
            return {**row, "setting": setting.describe(name)}
        if row["params_GiB"] + row["opt_state_GiB"] > chip.hbm_gib:
            break
    print(
        f"    no tried setting fits {chip.name} ({chip.hbm_gib:g} GiB); use more chips (a larger topology or "
        "more slices)"
    )
    return None


def budget(chip: topo.Chip | None, hbm_gib: float | None) -> topo.Chip | None:
    """The memory budget the fit check uses: the chip's HBM, or `hbm_gib` per device when given (a chip
    the table does not know, a reserve kept free, or a budget for the devices jax has)."""
    if hbm_gib is None:
        return chip
    if not hbm_gib > 0:
        raise ValueError(f"--hbm_gib={hbm_gib}: give the memory per device in GiB, a positive number")
    if chip is None:
        return topo.Chip(f"{jax.devices()[0].platform} device (--hbm_gib)", hbm_gib, 0.0, 0, "")
    return dataclasses.replace(chip, name=f"{chip.name} (--hbm_gib)", hbm_gib=hbm_gib)


def report(config, topology: str = "", slices: int = 1, fit_tries: int = 8, hbm_gib: float | None = None) -> list[dict]:
    """Compile every configured stage and print a memory table; returns the rows.

    topology: '' = the devices jax has (real or --fake_devices); else a TPU topology name.
    hbm_gib: memory per device for the fit check, instead of the chip's HBM (see `budget`)."""
    chip, devices, dcn = None, None, config.mesh.dcn
    if topology:
        chip, _ = topo.parse(topology)
    chip = budget(chip, hbm_gib)
    if topology:
        devices = topo.devices(topology, slices)
        if slices > 1 and _prod(dcn) == 1:
            config = config.copy_and_resolve_references()
            config.mesh.dcn = dcn = (slices, 1, 1)  # data parallel across slices
        elif _prod(dcn) != slices:
            raise ValueError(f"--slices={slices} but config.mesh.dcn={tuple(dcn)} spans {_prod(dcn)} slices")
    mesh = make_mesh(config.mesh.ici, dcn, devices=devices)
    spec = ModelSpec.create(model_config(config))
    where = f"{topology} x {slices} slice(s), " if topology else ""
    where += f"{chip.name}, {chip.hbm_gib:g} GiB HBM per chip; " if chip else ""
    print(
        f"model {config.model}: {spec.num_params():,} parameters; {where}mesh {describe(mesh)}; "
        f"compute {config.dtype}, frozen weights {config.frozen_dtype}"
    )
    rows = []
    for name in [s.strip() for s in config.stages.split(",") if s.strip()]:
        row = compile_stage(config, name, spec, mesh)
        _print_row(row, chip)
        if chip is not None:
            row["hbm_GiB"] = chip.hbm_gib
            row["fits"] = _fits(row, chip.hbm_gib)
            if not row["fits"] and fit_tries > 0:
                row["fit"] = fit(config, name, chip, devices or list(jax.devices()), slices, fit_tries)
        rows.append(row)
    return rows
