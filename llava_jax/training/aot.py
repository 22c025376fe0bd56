"""Ahead-of-time memory check: compile the real-size train step for a mesh of fake devices, with no
weights allocated, and print per-device memory from the compiled executable. With `targets_per_row`
set, the full-logits step that the run compiles for batches with a longer row is reported too.

    python -m llava_jax.train --config configs/stage2_finetune.py:vicuna-13b --aot --fake_devices 8

The executable is compiled by the CPU backend for the same mesh and shardings the run would use, so
parameter, optimizer-state and batch bytes per device are exact; temporaries (activations kept for
the backward pass) are the CPU compiler's schedule, a close but not exact stand-in for GPU/TPU.
"""

from __future__ import annotations

import jax

from llava_jax.parallel.mesh import describe, make_mesh
from llava_jax.training.checkpoint import abstract_with_shardings
from llava_jax.training.stage_setup import build_stage, dtype_of, model_config
from llava_jax.training.state import ModelSpec

GiB = 1024 ** 3


def _bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def compile_stage(config, name: str, spec: ModelSpec, mesh) -> dict:
    stage = config[name]
    setup = build_stage(stage, spec, mesh, total_steps=max(stage.num_steps, 1000),
                        frozen_dtype=dtype_of(config.frozen_dtype, "frozen_dtype"))
    cfg = spec.cfg
    b, length = stage.batch_size, stage.data.max_length
    batch = setup.abstract_batch(length, stage.data.max_images_per_row or 1)
    state = abstract_with_shardings(setup.abstract, setup.state_shardings)
    n = mesh.size
    out = {
        "stage": name, "mesh": describe(mesh), "batch": f"{b} x {length} (micro_batches={stage.micro_batches})",
        "remat": cfg.llm.remat, "params_GiB": _bytes(setup.abstract.params) / n / GiB,
        "opt_state_GiB": _bytes(setup.abstract.opt_state) / n / GiB,
    }
    # With targets_per_row the run also compiles the full-logits step, for batches with a longer row.
    prefixes = {"capped": "", "full": "full_logits_" if stage.targets_per_row else ""}
    for variant, step in setup.jitted_steps().items():
        with jax.set_mesh(mesh):
            compiled = step.lower(state, batch).compile()
        out.update(_memory_row(compiled, prefixes[variant]))
    return out


def _memory_row(compiled, prefix: str) -> dict:
    mem = compiled.memory_analysis()
    if mem is None:
        return {}
    args, outs = mem.argument_size_in_bytes, mem.output_size_in_bytes
    temp, alias = mem.temp_size_in_bytes, mem.alias_size_in_bytes
    return {f"{prefix}arguments_GiB": args / GiB, f"{prefix}outputs_GiB": outs / GiB,
            f"{prefix}temps_GiB": temp / GiB, f"{prefix}peak_GiB": (args + outs + temp - alias) / GiB}


def report(config) -> list[dict]:
    """Compile every configured stage and print a memory table; returns the rows."""
    mesh = make_mesh(config.mesh.ici, config.mesh.dcn)
    spec = ModelSpec.create(model_config(config))
    print(f"model {config.model}: {spec.num_params():,} parameters; mesh {describe(mesh)}; "
          f"compute {config.dtype}, frozen weights {config.frozen_dtype}")
    rows = []
    for name in [s.strip() for s in config.stages.split(",") if s.strip()]:
        row = compile_stage(config, name, spec, mesh)
        rows.append(row)
        print(f"  {name}: batch {row['batch']}, remat {row['remat']}")
        print("    per device: params {params_GiB:.2f} GiB, optimizer {opt_state_GiB:.2f} GiB".format(**row)
              + (", temps {temps_GiB:.2f} GiB, peak {peak_GiB:.2f} GiB".format(**row) if "peak_GiB" in row else ""))
        if "full_logits_peak_GiB" in row:
            print("    full-logits fall-back step (a row with more than targets_per_row targets): temps "
                  "{full_logits_temps_GiB:.2f} GiB, peak {full_logits_peak_GiB:.2f} GiB".format(**row))
    return rows
