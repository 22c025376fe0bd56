"""One mapping table per checkpoint format, used for import and export alike.

A table is a list of `Rule(ours, theirs, kind)`:
- `ours`: the llava_jax parameter path, '/'-separated (e.g. `layers/q_proj/kernel`);
- `theirs`: the checkpoint key, with `{i}` standing for the layer index when `ours` lives in a
  scanned stack (its arrays carry a leading `layers` axis);
- `kind`: how the array changes between the two layouts (see `to_ours` / `to_theirs`).

Part tables (`CLIP_VISION`, `LLAMA`, projectors) are written once, without prefixes; formats
(`FORMATS`) combine them under the prefixes each checkpoint family uses.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

Kind = Literal["same", "linear", "conv"]


@dataclasses.dataclass(frozen=True)
class Rule:
    ours: str
    theirs: str
    kind: Kind = "same"

    @property
    def stacked(self) -> bool:
        return "{i}" in self.theirs


def to_ours(kind: Kind, a: np.ndarray) -> np.ndarray:
    """PyTorch layout -> llava_jax layout."""
    if kind == "linear":  # torch [out, in] -> [in, out]
        return a.T
    if kind == "conv":  # torch [out, in, kh, kw] -> [kh, kw, in, out]
        return a.transpose(2, 3, 1, 0)
    return a


def to_theirs(kind: Kind, a: np.ndarray) -> np.ndarray:
    """llava_jax layout -> PyTorch layout."""
    if kind == "linear":
        return a.T
    if kind == "conv":
        return a.transpose(3, 2, 0, 1)
    return a


def _key(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _norm(ours: str, theirs: str, bias: bool) -> list[Rule]:
    rules = [Rule(f"{ours}/scale", _key(theirs, "weight"))]
    return rules + [Rule(f"{ours}/bias", _key(theirs, "bias"))] if bias else rules


def _linear(ours: str, theirs: str, bias: bool) -> list[Rule]:
    rules = [Rule(f"{ours}/kernel", _key(theirs, "weight"), "linear")]
    return rules + [Rule(f"{ours}/bias", _key(theirs, "bias"))] if bias else rules


# transformers CLIPVisionModel, keys below `vision_model.`
CLIP_VISION: list[Rule] = [
    Rule("patch_embedding/kernel", "embeddings.patch_embedding.weight", "conv"),
    Rule("class_embedding", "embeddings.class_embedding"),
    Rule("position_embedding", "embeddings.position_embedding.weight"),
    *_norm("pre_layrnorm", "pre_layrnorm", bias=True),
    *[
        r
        for p in ("q", "k", "v", "out")
        for r in _linear(f"layers/{p}_proj", f"encoder.layers.{{i}}.self_attn.{p}_proj", True)
    ],
    *_norm("layers/layer_norm1", "encoder.layers.{i}.layer_norm1", bias=True),
    *_norm("layers/layer_norm2", "encoder.layers.{i}.layer_norm2", bias=True),
    *_linear("layers/fc1", "encoder.layers.{i}.mlp.fc1", True),
    *_linear("layers/fc2", "encoder.layers.{i}.mlp.fc2", True),
    *_norm("post_layernorm", "post_layernorm", bias=True),
]

# transformers LlamaModel, keys below `model.` (the decoder body)
LLAMA_BODY: list[Rule] = [
    Rule("embed_tokens/embedding", "embed_tokens.weight"),
    *[r for p in ("q", "k", "v", "o") for r in _linear(f"layers/{p}_proj", f"layers.{{i}}.self_attn.{p}_proj", False)],
    *[r for p in ("gate", "up", "down") for r in _linear(f"layers/{p}_proj", f"layers.{{i}}.mlp.{p}_proj", False)],
    *_norm("layers/input_layernorm", "layers.{i}.input_layernorm", bias=False),
    *_norm("layers/post_attention_layernorm", "layers.{i}.post_attention_layernorm", bias=False),
    *_norm("norm", "norm", bias=False),
]
LM_HEAD = Rule("lm_head/kernel", "weight", "linear")  # below the format's lm_head prefix

PROJECTOR_HF: list[Rule] = [*_linear("linear_1", "linear_1", True), *_linear("linear_2", "linear_2", True)]
PROJECTOR_ORIGINAL_MLP: list[Rule] = [*_linear("linear_1", "0", True), *_linear("linear_2", "2", True)]
PROJECTOR_ORIGINAL_LINEAR: list[Rule] = [*_linear("linear_1", "", True)]


def _prefixed(rules: list[Rule], ours: str, theirs: str) -> list[Rule]:
    return [Rule("/".join(p for p in (ours, r.ours) if p), _key(theirs, r.theirs), r.kind) for r in rules]


@dataclasses.dataclass(frozen=True)
class Format:
    """Where each part lives in one checkpoint family. A `None` prefix: the part is absent.

    `vision` lists candidate prefixes, first = what export writes: transformers 5 saves the CLIP
    tower without the `vision_model.` level that Hub checkpoints have, and both must load.
    """

    name: str
    vision: tuple[str, ...] | None
    llm_body: str | None
    lm_head: str | None
    projector: str | None = None
    projector_style: Literal["hf", "original"] = "hf"
    vision_optional: bool = False  # original LLaVA shards usually leave the tower out
    ignore: tuple[str, ...] = ()  # regexes of keys that are known and deliberately not loaded

    def vision_prefix(self, keys) -> str | None:
        """The candidate prefix these keys use, or None when the checkpoint holds no vision tower."""
        keys = set(keys)
        for c in self.vision or ():
            if _key(c, "embeddings.class_embedding") in keys:
                return c
        if self.vision and not self.vision_optional:
            raise ValueError(
                f"{self.name} checkpoint without a vision tower: none of "
                f"{[_key(c, 'embeddings.class_embedding') for c in self.vision]} is present"
            )
        return None

    def rules(
        self, *, ours_prefix: dict[str, str | None], vision_prefix: str | None, projector: str | None, tied: bool
    ) -> list[Rule]:
        """The full table. `ours_prefix` maps part -> llava_jax path prefix (None: the model has no
        such part); `vision_prefix` is the checkpoint's (see `vision_prefix`)."""
        out: list[Rule] = []
        if vision_prefix is not None and ours_prefix["vision"] is not None:
            out += _prefixed(CLIP_VISION, ours_prefix["vision"], vision_prefix)
        if self.llm_body is not None and ours_prefix["llm"] is not None:
            out += _prefixed(LLAMA_BODY, ours_prefix["llm"], self.llm_body)
            if not tied:
                out += _prefixed([LM_HEAD], ours_prefix["llm"], self.lm_head)
        if self.projector is not None and projector is not None and ours_prefix["projector"] is not None:
            if self.projector_style == "hf":
                table = PROJECTOR_HF if projector == "mlp2x_gelu" else PROJECTOR_HF[:2]
            else:
                table = PROJECTOR_ORIGINAL_MLP if projector == "mlp2x_gelu" else PROJECTOR_ORIGINAL_LINEAR
            out += _prefixed(table, ours_prefix["projector"], self.projector)
        return out


_BUFFERS = (r".*\.inv_freq$", r".*position_ids$")

FORMATS: dict[str, Format] = {
    # transformers CLIPVisionModel / CLIPModel (text tower and heads ignored)
    "hf_clip": Format(
        "hf_clip",
        vision=("vision_model", ""),
        llm_body=None,
        lm_head=None,
        ignore=_BUFFERS + (r"^text_model\.", r"^visual_projection\.", r"^text_projection\.", r"^logit_scale$"),
    ),
    # transformers LlamaForCausalLM (Vicuna, SmolLM2, ...)
    "hf_llama": Format("hf_llama", vision=None, llm_body="model", lm_head="lm_head", ignore=_BUFFERS),
    # llava-hf LlavaForConditionalGeneration files (Hub, and what transformers 5 save_pretrained writes)
    "llava_hf": Format(
        "llava_hf",
        vision=("vision_tower.vision_model", "vision_tower"),
        llm_body="language_model.model",
        lm_head="language_model.lm_head",
        projector="multi_modal_projector",
        ignore=_BUFFERS,
    ),
    # the same model's in-memory state_dict under transformers 5
    "llava_hf_v5": Format(
        "llava_hf_v5",
        vision=("model.vision_tower.vision_model", "model.vision_tower"),
        llm_body="model.language_model",
        lm_head="lm_head",
        projector="model.multi_modal_projector",
        ignore=_BUFFERS,
    ),
    # original LLaVA (LlavaLlamaForCausalLM)
    "llava_original": Format(
        "llava_original",
        vision=("model.vision_tower.vision_tower.vision_model",),
        llm_body="model",
        lm_head="lm_head",
        projector="model.mm_projector",
        projector_style="original",
        vision_optional=True,
        ignore=_BUFFERS,
    ),
}


def detect_format(keys) -> str:
    """Guess the checkpoint family from its key names."""
    keys = list(keys)

    def has(prefix):
        return any(k.startswith(prefix) for k in keys)

    if has("model.language_model.") or has("model.multi_modal_projector."):
        return "llava_hf_v5"
    if has("language_model.") or has("multi_modal_projector."):
        return "llava_hf"
    if has("model.mm_projector") or has("model.vision_tower."):
        return "llava_original"
    if has("model.layers.") or has("model.embed_tokens."):
        return "hf_llama"
    if has("vision_model.") or has("embeddings.patch_embedding."):
        return "hf_clip"
    raise ValueError(
        "cannot tell the checkpoint format from its keys (first few: "
        f"{keys[:5]}); pass the format explicitly, one of {sorted(FORMATS)}"
    )
