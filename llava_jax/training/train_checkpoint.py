"""Orbax train-state checkpoints: params, optimizer state, step, RNG + the grain iterator state.

Layout of a stage directory:
    <workdir>/<stage>/checkpoints/<step>/{state,data}   rolling, every N steps (0: none) and at the end, keep K
    <workdir>/<stage>/final_params/                     the trained parameters, written when the stage ends
                                                        (`checkpoint.params`, `checkpoint.stage_dir`)

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


class Checkpointer:
    """Saves when `due`: every `every` steps (0: never) and at the end of the stage (`final`)."""

    def __init__(self, directory: PathLike, *, every: int, keep: int):
        if every < 0:
            raise ValueError(f"checkpoint_every={every}: use a number of steps, or 0 for only the final checkpoint")
        self.every = int(every)
        self.directory = absolute(directory)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max(int(keep), 1),
                enable_async_checkpointing=True,
                create=True,
            ),
            item_names=("state", "data"),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def due(self, step: int, *, final: bool = False) -> bool:
        return final or (self.every > 0 and step % self.every == 0)

    def save(self, step: int, state: Any, data_iter: Any | None, *, final: bool = False) -> bool:
        """Save `step` if it is due (the caller checks the loss is finite first); returns whether it did."""
        if not self.due(step, final=final):
            return False
        items = {"state": ocp.args.StandardSave(state)}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def data_process_count(self, step: int) -> int | None:
        """How many processes wrote the data-iterator state of `step` (one file each), if known."""
        counts = {
            f.name.rsplit("-of-", 1)[-1].removesuffix(".json")
            for f in (self.directory / str(step) / "data").glob("process_*-of-*.json")
        }
        return int(counts.pop()) if len(counts) == 1 and next(iter(counts)).isdigit() else None

    def restore(self, step: int, abstract_state: Any, data_iter: Any | None) -> Any:
        """Restore `step` into `abstract_state` (ShapeDtypeStructs with shardings); the data
        iterator, if given, is set to its saved position in place."""
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None:
            saved = self.data_process_count(step)
            if saved is not None and saved != jax.process_count():
                raise ValueError(
                    f"checkpoint step {step} in {self.directory} was written by {saved} processes and this run has "
                    f"{jax.process_count()}: the data-iterator position is saved per process and cannot be split "
                    f"differently. Resume this stage with {saved} processes (the devices per process and the "
                    "mesh may differ); the next stage starts a new data order and may use any number."
                )
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        return self.manager.restore(step, args=ocp.args.Composite(**items))["state"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
