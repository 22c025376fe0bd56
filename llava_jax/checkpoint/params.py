"""The orbax parameter store: a parameter tree (`nnx.state(model).to_pure_dict()`) as one directory.

Used for a stage's `final_params/` (written by training and `convert import`, read by the next stage,
chat, serving, evaluation and export). Restores go into an abstract target that carries the shardings
(and dtypes) wanted, so a tree saved on one mesh loads on another.
"""

from __future__ import annotations

from typing import Any

import jax
import orbax.checkpoint as ocp

from llava_jax.paths import PathLike, absolute


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the target shardings (what restore lays the arrays out as)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


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
        return ckpt.restore(
            directory, args=ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args, partial_restore=partial)
        )
