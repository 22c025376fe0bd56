"""Named rematerialisation (activation checkpointing) policies for the scanned layer stacks.

`none` keeps every activation; `full` recomputes the whole block in the backward pass; `dots` saves
matmul outputs without a batch dimension (weights-times-activations), the usual middle ground;
`qkv_proj` / `qkv_mlp` save only the tensors tagged with `checkpoint_name` in the blocks.
"""

from collections.abc import Callable

import jax

_CP = jax.checkpoint_policies

POLICIES: dict[str, Callable | None] = {
    "none": None,
    "full": _CP.nothing_saveable,
    "dots": _CP.dots_with_no_batch_dims_saveable,
    "qkv_proj": _CP.save_only_these_names("query_proj", "key_proj", "value_proj", "out_proj"),
    "qkv_mlp": _CP.save_only_these_names("query_proj", "key_proj", "value_proj", "out_proj", "mlp_hidden"),
}


def remat(fn: Callable, policy: str) -> Callable:
    """Wrap a scan body with the named policy (identity for `none`)."""
    if policy not in POLICIES:
        raise ValueError(f"remat policy {policy!r}; choose one of {sorted(POLICIES)}")
    if policy == "none":
        return fn
    return jax.checkpoint(fn, policy=POLICIES[policy], prevent_cse=False)
