"""Parameter paths as strings: the one spelling every module uses to name a leaf of a params tree.

`path_str(path)` joins the keys of a pytree path (`jax.tree_util` DictKey / GetAttrKey entries, or
the plain keys of `nnx.to_flat_state`) with '/', e.g. `language_model/layers/q_proj/kernel`. The
freeze table, the sharding of optimizer moments and the checkpoint key maps all match on this form.
"""

from __future__ import annotations


def path_str(path) -> str:
    """('language_model', 'layers', 'q_proj', 'kernel') or jax key entries -> 'language_model/layers/q_proj/kernel'."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
