"""Multi-process start-up: `jax.distributed.initialize` from explicit flags, SLURM, or TPU metadata.

Must run before anything touches a JAX backend (jax#12258). Grain worker processes re-import the main
module; they must not initialise (google/grain#802), hence the parent-process guard.

| where | how it is detected | what is passed |
| --- | --- | --- |
| explicit | config.distributed.coordinator_address set | address, num_processes, process_id |
| SLURM (multi-node GPU) | SLURM_JOB_ID and SLURM_NTASKS > 1 | nothing: JAX reads the SLURM variables |
| TPU pod / multi-slice | TPU_WORKER_HOSTNAMES or MEGASCALE_* set, more than one host | nothing: JAX reads TPU metadata |
| env | JAX_COORDINATOR_ADDRESS (+ JAX_NUM_PROCESSES, JAX_PROCESS_ID) | those values |
| otherwise | one process | no call |
"""

from __future__ import annotations

import logging
import multiprocessing
import os

log = logging.getLogger(__name__)


def _is_worker_process() -> bool:
    return multiprocessing.parent_process() is not None


def initialize(cfg=None) -> bool:
    """Start the multi-process runtime when this is a multi-process run; returns whether it did."""
    import jax

    if _is_worker_process():
        return False
    get = cfg.get if cfg is not None else {}.get
    address = get("coordinator_address", "") or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    if address:
        n = int(
            get("num_processes", -1)
            if get("num_processes", -1) not in (None, -1)
            else os.environ.get("JAX_NUM_PROCESSES", -1)
        )
        pid = int(
            get("process_id", -1) if get("process_id", -1) not in (None, -1) else os.environ.get("JAX_PROCESS_ID", -1)
        )
        if n < 1 or pid < 0:
            raise ValueError(
                f"coordinator_address={address!r} needs num_processes and process_id "
                "(config.distributed.* or JAX_NUM_PROCESSES / JAX_PROCESS_ID)"
            )
        if jax.config.jax_platforms in (None, "", "cpu") and os.environ.get("JAX_PLATFORMS", "") == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=address, num_processes=n, process_id=pid)
    elif (int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ) or _multi_host_tpu():
        jax.distributed.initialize()
    else:
        return False
    log.info(
        "process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True


def _multi_host_tpu() -> bool:
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return bool(os.environ.get("MEGASCALE_COORDINATOR_ADDRESS")) or len([h for h in hosts.split(",") if h]) > 1
