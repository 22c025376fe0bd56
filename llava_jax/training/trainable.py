"""Which parameters train: one regex table, the big_vision idiom.

Parameter paths are '/'-joined keys of the model's pure-dict state, e.g.
`language_model/layers/q_proj/kernel`. A stage names the parts it trains; every parameter must match
exactly one part pattern, so a new parameter can never silently fall through.

| stage | trains | frozen |
| --- | --- | --- |
| 0 (demo only: towers from scratch) | vision tower, LLM | projector (unused) |
| 1 (feature alignment) | projector | vision tower, LLM |
| 2 (instruction tuning) | projector, LLM | vision tower |
| 2 with LoRA (`projector,lora`) | projector, the LLM's LoRA adapters | vision tower, LLM base |

The `lora` part is the adapters (`lora_a`, `lora_b`, see `models/lora.py`); `llm` is every other LLM
parameter (its base), so `projector,llm` on a model with adapters trains the base, not the adapters.
An int8 or NF4 base cannot train (`check_trainable_dtypes`).
"""

from __future__ import annotations

import re
from typing import Any

import jax

from llava_jax.parallel.tree_paths import path_str

PARTS: dict[str, str] = {
    "vision": r"^vision_tower/",
    "projector": r"^multi_modal_projector/",
    "llm": r"^language_model/(?!.*/lora_[ab]$)",
    "lora": r"^language_model/.*/lora_[ab]$",
}
PART_KEYS = {"vision": "vision_tower", "projector": "multi_modal_projector", "llm": "language_model"}  # top-level keys

# Weight decay applies to matrices only (not norms, biases, embeddings' padding), as is usual.
NO_DECAY = (r"/bias$", r"/scale$", r"(^|/)(class|position)_embedding$")


def _part(path: str) -> str:
    hits = [name for name, pattern in PARTS.items() if re.search(pattern, path)]
    if len(hits) != 1:
        raise ValueError(f"parameter {path!r} matches parts {hits}; every parameter must match exactly one of {PARTS}")
    return hits[0]


def parse_trainable(spec: str) -> tuple[str, ...]:
    """'projector' / 'projector,llm' / 'projector+llm' -> part names (checked)."""
    parts = tuple(p.strip() for p in re.split(r"[,+]", spec) if p.strip())
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        raise ValueError(f"trainable={spec!r}: name parts from {sorted(PARTS)}, e.g. 'projector' or 'projector,llm'")
    return parts


def trainable_mask(params: Any, trainable: str) -> Any:
    """Pytree of bools like `params`: True where the parameter trains in this stage."""
    parts = parse_trainable(trainable)
    mask = jax.tree_util.tree_map_with_path(lambda p, _: _part(path_str(p)) in parts, params)
    found = {_part(path_str(p)) for p, _ in jax.tree_util.tree_leaves_with_path(params)}
    if missing := [p for p in parts if p not in found]:
        fix = " (set config.lora.rank > 0 for adapters)" if "lora" in missing else ""
        raise ValueError(f"trainable={trainable!r}: the model has no {missing[0]!r} parameters{fix}")
    return mask


def check_trainable_dtypes(params: Any, mask: Any) -> None:
    """Every trainable parameter is a float (an int8 / NF4 base kernel cannot take gradient updates)."""
    bad = [
        path_str(p)
        for p, a in jax.tree_util.tree_leaves_with_path(params)
        if not jax.numpy.issubdtype(a.dtype, jax.numpy.floating)
    ]
    flags = {path_str(p): t for p, t in jax.tree_util.tree_leaves_with_path(mask)}
    bad = [p for p in bad if flags[p]]
    if bad:
        raise ValueError(
            f"{len(bad)} trainable parameter(s) are integer (an int8 or nf4 base), e.g. {bad[0]!r}: train the "
            "adapters instead (trainable='projector,lora') or set lora.quantized_base='none'"
        )


def labels(mask: Any, separate: tuple[str, ...] = ()) -> Any:
    """The mask as optax.multi_transform labels: 'frozen', 'trainable', or the part's own name for
    the trainable parts listed in `separate` (which then get their own transformation, e.g. the
    projector's learning rate)."""
    if not separate:
        return jax.tree.map(lambda t: "trainable" if t else "frozen", mask)

    def one(path, t):
        if not t:
            return "frozen"
        part = _part(path_str(path))
        return part if part in separate else "trainable"

    return jax.tree_util.tree_map_with_path(one, mask)


def decay_mask(params: Any, mask: Any) -> Any:
    """True where weight decay applies: trainable matrices, not norms/biases/embedding vectors."""

    def decays(path, _, trains):
        s = path_str(path)
        return bool(trains) and not any(re.search(p, s) for p in NO_DECAY)

    return jax.tree_util.tree_map_with_path(decays, params, mask)
