"""Which parameters train: one regex table, the big_vision idiom.

Parameter paths are '/'-joined keys of the model's pure-dict state, e.g.
`language_model/layers/q_proj/kernel`. A stage names the parts it trains; every parameter must match
exactly one part pattern, so a new parameter can never silently fall through.

| stage | trains | frozen |
| --- | --- | --- |
| 0 (demo only: towers from scratch) | vision tower, LLM | projector (unused) |
| 1 (feature alignment) | projector | vision tower, LLM |
| 2 (instruction tuning) | projector, LLM | vision tower |
"""

from __future__ import annotations

import re
from typing import Any

import jax

from llava_jax.parallel.tree_paths import path_str

PARTS: dict[str, str] = {
    "vision": r"^vision_tower/",
    "projector": r"^multi_modal_projector/",
    "llm": r"^language_model/",
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
    return jax.tree_util.tree_map_with_path(lambda p, _: _part(path_str(p)) in parts, params)


def labels(mask: Any) -> Any:
    """The mask as optax.multi_transform labels."""
    return jax.tree.map(lambda t: "trainable" if t else "frozen", mask)


def decay_mask(params: Any, mask: Any) -> Any:
    """True where weight decay applies: trainable matrices, not norms/biases/embedding vectors."""

    def decays(path, _, trains):
        s = path_str(path)
        return bool(trains) and not any(re.search(p, s) for p in NO_DECAY)

    return jax.tree_util.tree_map_with_path(decays, params, mask)
