"""Entry point: python -m llava_jax.train --config configs/<file>.py[:arg] --workdir DIR [--config.key=value ...]

Without --config it runs the bundled demo (configs/demo.py): synthetic data, stage 1, stage 2, and the
held-out accuracy. `--aot --fake_devices 8` compiles the real-size train step of every configured stage
for a mesh of fake CPU devices without allocating weights and prints per-device memory;
`--aot --topology v5p:2x2x2 [--slices 2]` compiles it with the TPU compiler for that topology (no TPU
needed, libtpu from the `tpu-compile` extra) and says whether it fits the chips' HBM; `--topology
h100:8` does the same with the GPU compiler (`gpu-compile` extra, no GPU needed).
"""

from __future__ import annotations

import os
import pathlib

from absl import app, flags
from ml_collections import config_flags

_DEMO = pathlib.Path(__file__).resolve().parents[1] / "configs" / "demo.py"

_CONFIG = config_flags.DEFINE_config_file(
    "config", str(_DEMO), "experiment config file (configs/*.py[:arg])", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "output directory (default: runs/<config name>)")
_AOT = flags.DEFINE_bool("aot", False, "compile the train step ahead of time and report memory; no training")
_FAKE = flags.DEFINE_integer("fake_devices", 0, "with --aot: pretend to have this many CPU devices")
_VERBOSE = flags.DEFINE_bool("verbose", False, "also print the libraries' INFO lines (always in <workdir>/train.log)")
_TOPOLOGY = flags.DEFINE_string(
    "topology", "", "with --aot: compile for this TPU topology or GPU host, e.g. v5p:2x2x2, v5e:4x4, h100:8"
)
_SLICES = flags.DEFINE_integer("slices", 1, "with --aot --topology: number of slices (multi-slice over DCN)")
_FIT_TRIES = flags.DEFINE_integer("fit_tries", 8, "with --aot --topology: settings tried when a stage does not fit")
_HBM_GIB = flags.DEFINE_float(
    "hbm_gib",
    None,
    "with --aot: memory per device (GiB) for the fit check, instead of the chip's HBM (a reserve, a chip not "
    "in the table); with --fake_devices it adds the verdict and the search",
)


def _default_workdir(config_file: str) -> str:
    arg = _CONFIG.value.get("arg", "") if hasattr(_CONFIG.value, "get") else ""
    name = pathlib.Path(config_file).stem
    return str(pathlib.Path("runs") / (f"{name}_{arg}" if arg else name))


def main(argv):
    del argv
    from llava_jax.training import console

    console.setup(verbose=_VERBOSE.value)
    if _HBM_GIB.value is not None and not _AOT.value:
        raise app.UsageError("--hbm_gib goes with --aot")
    if _TOPOLOGY.value or _SLICES.value != 1:
        if not _AOT.value or _FAKE.value or not _TOPOLOGY.value:
            raise app.UsageError("--topology/--slices go with --aot and without --fake_devices")
        from llava_jax.parallel import topology

        topology.parse(_TOPOLOGY.value)
        topology.prepare_environment(_TOPOLOGY.value)
    if _FAKE.value:
        os.environ["JAX_PLATFORMS"] = "cpu"
        import jax

        jax.config.update("jax_num_cpu_devices", _FAKE.value)
    from llava_jax.parallel.distributed import initialize

    initialize(_CONFIG.value.distributed)
    import jax

    config = _CONFIG.value
    if _AOT.value:
        from llava_jax.training.aot import report

        report(
            config, topology=_TOPOLOGY.value, slices=_SLICES.value, fit_tries=_FIT_TRIES.value, hbm_gib=_HBM_GIB.value
        )
        return 0
    workdir = _WORKDIR.value or _default_workdir(config_flags.get_config_filename(flags.FLAGS["config"]))
    console.add_log_file(workdir, jax.process_index())  # other processes: warnings and errors on the console
    from llava_jax.experiment import main as run_job

    return run_job(config, workdir)


if __name__ == "__main__":
    app.run(main)
