"""Orbax checkpoints: train state (params, optimizer state, step, RNG) + the grain iterator state.

Layout of a stage directory:
    <workdir>/<stage>/checkpoints/<step>/{state,data}   rolling, every N steps and at the end, keep K
    <workdir>/<stage>/final_params/                     the trained parameters, written when the stage ends

Saves are asynchronous; orbax finalises a step directory only when every file is written, so a killed
run resumes from the latest complete step. Restores go into an abstract target that carries the
*current* mesh's shardings, so a run saved on one mesh / device count continues on another.
"""

from __future__ import annotations

from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from llava_jax.paths import PathLike, absolute


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the target shardings (what restore lays the arrays out as)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


class Checkpointer:
    def __init__(self, directory: PathLike, *, every: int, keep: int):
        self.directory = absolute(directory)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                save_interval_steps=max(int(every), 1), max_to_keep=max(int(keep), 1),
                enable_async_checkpointing=True, create=True,
            ),
            item_names=("state", "data"),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iter: Any | None, *, force: bool = False) -> bool:
        items = {"state": ocp.args.StandardSave(state)}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, step: int, abstract_state: Any, data_iter: Any | None) -> Any:
        """Restore `step` into `abstract_state` (ShapeDtypeStructs with shardings); the data
        iterator, if given, is set to its saved position in place."""
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        return self.manager.restore(step, args=ocp.args.Composite(**items))["state"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def save_params(directory: PathLike, params: Any) -> None:
    """Write a parameter tree (blocking), replacing what is there."""
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(absolute(directory), params, force=True)


def restore_params(directory: PathLike, abstract: Any, *, partial: bool = False) -> Any:
    """Read a parameter tree into `abstract` (ShapeDtypeStructs with shardings; dtypes are cast).
    `partial=True` reads only the subtree `abstract` names (e.g. just the projector)."""
    directory = absolute(directory)
    if not directory.exists():
        raise FileNotFoundError(f"no parameter checkpoint at {directory}")
    with ocp.PyTreeCheckpointer() as ckpt:
        restore_args = jax.tree.map(
            lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, dtype=a.dtype, global_shape=a.shape), abstract
        )
        return ckpt.restore(directory, args=ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args,
                                                                   partial_restore=partial))
