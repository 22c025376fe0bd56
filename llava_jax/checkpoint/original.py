"""Import original LLaVA (haotian-liu/LLaVA, `LlavaLlamaForCausalLM`) checkpoints and stage-1 projectors.

    model, info = load_original("llava-v1.5-7b", vision="clip-vit-large-patch14-336")
    arrays = load_projector("llava-v1.5-mlp2x-336px-pretrain/mm_projector.bin")
    model, info = load_pair("vicuna-7b-v1.5", vision="clip-vit-large-patch14-336",
                            projector="llava-v1.5-mlp2x-336px-pretrain")

An original checkpoint is a LLaMA checkpoint (`model.*`, `lm_head.weight`) plus the projector
(`model.mm_projector.{0,2}.*` for `mlp2x_gelu`, `model.mm_projector.{weight,bias}` for `linear`) and
`mm_*` config fields (`hf_config.original_llava_config`). Its shards usually hold no vision tower:
the tower is the CLIP model named by `mm_vision_tower`, given as `vision=` (a local CLIP directory).
When the shards do hold it (`model.vision_tower.vision_tower.vision_model.*`) those weights are used.

Vocabulary: the checkpoint's 32000 (v1, v1.5) or 32003 (v0) rows are fitted into the llava-hf
vocabulary of 32064 rows as `vocab.fit_rows` describes (LLaMA ids unchanged; rows the checkpoint
added moved to 32002+; all other rows the mean LLaMA row). Image positions use `<image>` = 32000,
as in llava-hf, whatever token the original used for them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re

import numpy as np
from flax import nnx

from llava_jax.checkpoint import hf_config, vocab
from llava_jax.checkpoint.files import open_checkpoint
from llava_jax.checkpoint.hf_load import CheckpointMismatch, convert_arrays, materialize
from llava_jax.checkpoint.mapping import FORMATS, to_ours
from llava_jax.models.config import LlavaConfig
from llava_jax.models.llava import Llava
from llava_jax.models.presets import VOCAB
from llava_jax.paths import Path, as_path

log = logging.getLogger(__name__)

PROJECTOR_FILES = ("mm_projector.safetensors", "mm_projector.bin")
_PROJECTOR_KEY = re.compile(r"(?:^|\.)mm_projector\.(.+)$")
_PROJECTOR_PREFIX = FORMATS["llava_original"].projector  # "model.mm_projector"


@dataclasses.dataclass
class ImportInfo:
    """What an import learnt beside the weights: what `model.json` records."""

    image_aspect_ratio: str
    template: str
    source: dict


# ----------------------------------------------------------------------------- stage-1 projector


def _projector_file(path: Path) -> Path:
    if path.is_file():
        return path
    for name in PROJECTOR_FILES:
        if (path / name).exists():
            return path / name
    raise FileNotFoundError(f"{path}: no {' or '.join(PROJECTOR_FILES)} found (a stage-1 projector file or its folder)")


def projector_kind(keys) -> str:
    """`mlp2x_gelu` or `linear`, from canonical `model.mm_projector.*` keys."""
    rest = {k[len(_PROJECTOR_PREFIX) + 1 :] for k in keys}
    if {"0.weight", "2.weight"} <= rest:
        return "mlp2x_gelu"
    if "weight" in rest:
        return "linear"
    raise CheckpointMismatch(
        f"cannot tell the projector type from keys {sorted(keys)[:6]}: expected {_PROJECTOR_PREFIX}.0/.2.* "
        f"(mlp2x_gelu) or {_PROJECTOR_PREFIX}.weight/bias (linear)"
    )


def load_projector(path, *, projector: str | None = None, cfg: LlavaConfig | None = None) -> dict[str, np.ndarray]:
    """A stage-1 projector (the original's `mm_projector.bin` / `.safetensors`, or the folder holding
    it) -> {llava_jax param path: float32 array}, e.g.

        {"multi_modal_projector/linear_1/kernel": [Dv, D], "multi_modal_projector/linear_1/bias": [D],
         "multi_modal_projector/linear_2/kernel": [D, D], "multi_modal_projector/linear_2/bias": [D]}

    Keys are read through the `llava_original` table; any prefix before `mm_projector.` is accepted
    (`model.mm_projector.0.weight`, `base_model.model.model.mm_projector.0.weight`, ...).
    projector: the type the model wants (`linear` or `mlp2x_gelu`); a file of the other type is an
      error. Default: whatever the file holds.
    cfg: when given, the shapes are checked against this model config too (and `projector` defaults
      to `cfg.projector`).
    """
    file = _projector_file(as_path(path))
    source = open_checkpoint(file)
    renamed, other = {}, []
    for k in source.keys():  # noqa: SIM118 (a tensor source, not a dict)
        m = _PROJECTOR_KEY.search(k)
        if m:
            renamed[f"{_PROJECTOR_PREFIX}.{m.group(1)}"] = k
        else:
            other.append(k)
    if other:
        raise CheckpointMismatch(f"{file}: keys that are not projector weights (…mm_projector.*): {other[:5]}")
    kind = projector_kind(renamed)
    want = projector or (cfg.projector if cfg is not None else None)
    if want is not None and want != kind:
        raise CheckpointMismatch(
            f"{file} holds a {kind} projector (keys {sorted(renamed)[:4]}) but the model's projector is {want!r}; "
            "set the model's projector type to match the stage-1 run"
        )
    rules = FORMATS["llava_original"].rules(
        ours_prefix={"vision": None, "llm": None, "projector": "multi_modal_projector"},
        vision_prefix=None,
        projector=kind,
        tied=False,
    )
    out, used = {}, set()
    for rule in rules:
        if rule.theirs not in renamed:
            raise CheckpointMismatch(f"{file}: no key {rule.theirs!r} (needed by a {kind} projector)")
        used.add(rule.theirs)
        out[rule.ours] = to_ours(rule.kind, np.asarray(source.get(renamed[rule.theirs]), np.float32))
    unused = sorted(set(renamed) - used)
    if unused:
        raise CheckpointMismatch(f"{file}: keys a {kind} projector does not use: {[renamed[k] for k in unused][:5]}")
    if cfg is not None:
        _check_projector_shapes(out, cfg, file)
    return out


def _check_projector_shapes(arrays: dict[str, np.ndarray], cfg: LlavaConfig, file) -> None:
    dv, d = cfg.vision.hidden_size, cfg.llm.hidden_size
    want = {
        "multi_modal_projector/linear_1/kernel": (dv, d),
        "multi_modal_projector/linear_1/bias": (d,),
        "multi_modal_projector/linear_2/kernel": (d, d),
        "multi_modal_projector/linear_2/bias": (d,),
    }
    for key, a in arrays.items():
        if tuple(a.shape) != want[key]:
            raise CheckpointMismatch(
                f"{file}: {key} has shape {tuple(a.shape)}, the model needs {want[key]} (vision width {dv}, "
                f"LLM width {d}); was the projector trained for this vision tower and LLM?"
            )


# ----------------------------------------------------------------------------- full checkpoints


def default_template(name: str) -> str:
    """Conversation template for a checkpoint name, by the original's rule: llama-2 models use
    `llava_llama_2`, v1 / v1.5 models `v1` (what their training used), others `llava_v0`."""
    low = name.lower()
    if "llama-2" in low or "llama_2" in low:
        return "llava_llama_2"
    if "v1" in low:
        return "v1"
    return "llava_v0"


def _vision_dir(d: dict, vision) -> Path | None:
    if vision is not None:
        return as_path(vision)
    named = d.get("mm_vision_tower")
    if named and as_path(named).is_dir():  # a local path written by the original training run
        return as_path(named)
    return None


def _added_tokens(path: Path) -> dict[int, str]:
    """{id: token} of tokens beyond LLaMA's 32000, from the checkpoint's tokenizer files if present."""
    f = path / "added_tokens.json"
    if f.exists():
        return {int(i): t for t, i in json.loads(f.read_text()).items() if int(i) >= vocab.LLAMA_PIECES}
    f = path / "tokenizer_config.json"
    if f.exists():
        dec = json.loads(f.read_text()).get("added_tokens_decoder") or {}
        return {int(i): v.get("content", "") for i, v in dec.items() if int(i) >= vocab.LLAMA_PIECES}
    return {}


def _vocab_source(path: Path, rows: int, d: dict) -> dict:
    moved = vocab.added_token_ids(rows)
    names = _added_tokens(path)
    info = {"checkpoint_rows": rows, "rows": VOCAB, "mapping": vocab.describe(rows, VOCAB)}
    if moved:
        info["moved_ids"] = {str(a): {"id": b, "token": names.get(a)} for a, b in moved.items()}
    if d.get("mm_use_im_start_end"):
        log.warning(
            "checkpoint was trained with mm_use_im_start_end=True (<im_start>/<im_end> around the image); "
            "their rows are kept at %s but llava_jax prompts do not insert them",
            moved,
        )
    return info


def load_original(path, *, vision=None, param_dtype=np.float32) -> tuple[Llava, ImportInfo]:
    """An original LLaVA directory (config.json with `mm_*` fields + shards) -> (Llava, ImportInfo).

    vision: the CLIP directory `mm_vision_tower` names (needed when the shards hold no tower; when
      they do, it only supplies the tower's config). Default: `mm_vision_tower` itself when it is a
      local directory.
    """
    import jax.numpy as jnp

    path = as_path(path)
    d = hf_config.read_config(path)
    if not hf_config.is_original_llava(d):
        raise ValueError(
            f"{path}/config.json is not an original LLaVA config (no mm_vision_tower / mm_hidden_size "
            "fields); for llava-hf or LLaMA directories use from_pretrained / load_weights"
        )
    source = open_checkpoint(path)
    keys = source.keys()
    in_shards = FORMATS["llava_original"].vision_prefix(keys) is not None
    vdir = _vision_dir(d, vision)
    if not in_shards and vdir is None:
        raise FileNotFoundError(
            f"{path}: the shards hold no vision tower and mm_vision_tower={d.get('mm_vision_tower')!r} is not a "
            "local directory; pass the CLIP model directory it names (--vision DIR / vision=DIR)"
        )
    vcfg = hf_config.original_vision_config(d, hf_config.read_config(vdir) if vdir is not None else None)
    cfg, aspect = hf_config.original_llava_config(d, vcfg, vocab_size=VOCAB)
    cfg = cfg.with_runtime(param_dtype=jnp.dtype(param_dtype))
    abstract = nnx.eval_shape(lambda: Llava(cfg, rngs=nnx.Rngs(0)))
    arrays = convert_arrays(abstract, source, "llava_original")
    if not in_shards:
        arrays.update(convert_arrays(abstract, open_checkpoint(vdir), "hf_clip"))
    rows = source.get(f"{FORMATS['llava_original'].llm_body}.embed_tokens.weight").shape[0]
    model = materialize(abstract, arrays, what="llava_original")
    info = ImportInfo(
        aspect,
        default_template(path.resolve().name),
        {
            "format": "llava_original",
            "path": str(path),
            "vision": str(vdir) if not in_shards else "checkpoint",
            "vocab": _vocab_source(path, rows, d),
        },
    )
    return model, info


def _projector_fields(projector_path: Path) -> dict:
    """`mm_*` fields of the stage-1 run's config.json beside the projector file, if there is one."""
    folder = projector_path if projector_path.is_dir() else projector_path.parent
    f = folder / "config.json"
    if not f.exists():
        return {}
    d = json.loads(f.read_text())
    return {k: v for k, v in d.items() if k.startswith("mm_") or k == "image_aspect_ratio"}


def load_pair(
    llm, *, vision, projector, select_layer: int | None = None, param_dtype=np.float32, template: str = "v1"
) -> tuple[Llava, ImportInfo]:
    """The pieces the original's stage 2 starts from: a LLaMA / Vicuna directory, the CLIP directory,
    and a stage-1 projector (file or its folder; the folder's config.json supplies `mm_*` fields).
    `select_layer` overrides `mm_vision_select_layer` (default: the stage-1 config's, else -2)."""
    import jax.numpy as jnp

    llm, vision, projector = as_path(llm), as_path(vision), as_path(projector)
    proj = load_projector(projector)
    kind = "mlp2x_gelu" if "multi_modal_projector/linear_2/kernel" in proj else "linear"
    d = {
        **hf_config.read_config(llm),
        "mm_vision_select_layer": -2,
        **_projector_fields(projector),
        "mm_projector_type": kind,
    }
    if select_layer is not None:
        d["mm_vision_select_layer"] = select_layer
    if "text_config" in d or d.get("model_type") not in ("llama", "llava", "llava_llama"):
        raise ValueError(f"{llm}/config.json: model_type={d.get('model_type')!r}; the LLM must be a LLaMA directory")
    cfg, aspect = hf_config.original_llava_config(
        d, hf_config.vision_config_from_hf(hf_config.read_config(vision)), vocab_size=VOCAB
    )
    cfg = cfg.with_runtime(param_dtype=jnp.dtype(param_dtype))
    _check_projector_shapes(proj, cfg, projector)
    abstract = nnx.eval_shape(lambda: Llava(cfg, rngs=nnx.Rngs(0)))
    llm_source = open_checkpoint(llm)
    arrays = {
        **convert_arrays(abstract, llm_source, "hf_llama"),
        **convert_arrays(abstract, open_checkpoint(vision), "hf_clip"),
        **proj,
    }
    rows = llm_source.get("model.embed_tokens.weight").shape[0]
    model = materialize(abstract, arrays, what="LLM + CLIP + projector")
    return model, ImportInfo(
        aspect,
        template,
        {
            "format": "pair",
            "llm": str(llm),
            "vision": str(vision),
            "projector": str(projector),
            "vocab": _vocab_source(llm, rows, d),
        },
    )
