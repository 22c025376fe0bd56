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

from llava_jax.checkpoint import adapters, hf_config, vocab
from llava_jax.checkpoint.files import open_checkpoint
from llava_jax.checkpoint.hf_load import CheckpointMismatch, convert_arrays, materialize
from llava_jax.checkpoint.mapping import FORMATS, to_ours
from llava_jax.models.config import LlavaConfig
from llava_jax.models.llava import Llava
from llava_jax.models.lora import BLOCK_LINEARS, merged_kernel
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


# ----------------------------------------------------------------------------- LoRA checkpoints

NON_LORA_FILE = "non_lora_trainables.bin"


class _Overlay:
    """Tensor source: `top`'s keys over `base`'s (a LoRA run's non-LoRA trainables over its base model)."""

    def __init__(self, base, top):
        self._base, self._top = base, top
        self._top_keys = set(top.keys())

    def keys(self) -> list[str]:
        return sorted(set(self._base.keys()) | self._top_keys)

    def get(self, key: str) -> np.ndarray:
        return (self._top if key in self._top_keys else self._base).get(key)


def _non_lora_trainables(path: Path):
    """The projector (and any other non-adapter tensors) a LoRA run trained, keys renamed from the
    PEFT wrapper's `base_model.model.model.mm_projector.0.weight` to `model.mm_projector.0.weight`."""
    from llava_jax.checkpoint.files import DictSource

    candidates = [path / NON_LORA_FILE, path / "non_lora_trainables.safetensors"]
    file = next((f for f in candidates if f.exists()), None)
    if file is None:
        raise FileNotFoundError(
            f"{path}: no {NON_LORA_FILE} (the projector of a LoRA run); an original LLaVA LoRA checkpoint has "
            "adapter_config.json, adapter_model.bin and non_lora_trainables.bin"
        )
    source = open_checkpoint(file)
    prefix = adapters.PEFT_PREFIX + "."
    return DictSource({(k[len(prefix) :] if k.startswith(prefix) else k): source.get(k) for k in source.keys()})  # noqa: SIM118


def adapter_arrays(abstract: Llava, source, settings, *, where) -> dict[str, np.ndarray]:
    """{`language_model/layers/X/lora_a` [L, in, r], `.../lora_b` [L, r, out]} from a PEFT adapter source
    on the original's `LlavaLlamaForCausalLM` (or a `LlamaForCausalLM`): keys
    `base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight` etc. Every layer of an adapted
    linear must be present and every key used."""
    kernels = FORMATS["llava_original"].rules(
        ours_prefix={"vision": None, "llm": "language_model", "projector": None},
        vision_prefix=None,
        projector=None,
        tied=abstract.cfg.llm.tie_word_embeddings,
    )
    keys = set(source.keys())
    layers = abstract.cfg.llm.num_layers
    out, used = {}, set()
    for rule in adapters.adapter_rules(kernels):
        names = [rule.theirs.format(i=i) for i in range(layers)] if rule.stacked else [rule.theirs]
        present = [k for k in names if k in keys]
        if not present:
            continue
        if len(present) < len(names):
            missing = sorted(set(names) - keys)
            raise CheckpointMismatch(
                f"{where}: adapter keys for only some layers of {rule.ours} (missing e.g. {missing[:3]}); "
                "llava_jax adapters cover every layer (layers_to_transform is not supported)"
            )
        used.update(names)
        tensors = [to_ours(rule.kind, np.asarray(source.get(k), np.float32)) for k in names]
        out[rule.ours] = np.stack(tensors) if rule.stacked else tensors[0]
    unused = sorted(keys - used)
    if unused:
        raise CheckpointMismatch(
            f"{where}: adapter keys that name no adapted LLM block linear: {unused[:5]} (adapters are read for "
            f"{', '.join(BLOCK_LINEARS)} of the LLM only)"
        )
    if not out:
        raise CheckpointMismatch(f"{where}: no LoRA tensors (…lora_A.weight / …lora_B.weight) found")
    adapters.check_adapter_shapes(out, settings, where)
    for k in out:
        pair = k[: -len("lora_a")] + ("lora_b" if k.endswith("lora_a") else "lora_a")
        if pair not in out:
            raise CheckpointMismatch(f"{where}: {k} has no partner {pair}")
    return out


def fold_adapters(arrays: dict[str, np.ndarray], lora: dict[str, np.ndarray], settings) -> dict[str, np.ndarray]:
    """`arrays` with every adapted kernel replaced by W + lora_a @ lora_b * alpha / r (float32)."""
    out = dict(arrays)
    for k, a in lora.items():
        if k.endswith("/lora_a"):
            base = k[: -len("lora_a")]
            out[base + "kernel"] = merged_kernel(
                arrays[base + "kernel"], a, lora[base + "lora_b"], settings.alpha, settings.rank, dtype=np.float32
            )
    return out


def load_original_lora(path, *, base, vision=None, merge: bool = True, param_dtype=np.float32):
    """An original LLaVA LoRA checkpoint (`llava-v1.5-*-lora`: config.json with `mm_*` fields,
    adapter_config.json, adapter_model.bin / .safetensors, non_lora_trainables.bin) applied onto its
    base (`base`: the LLaMA / Vicuna directory it was trained from, or an original LLaVA directory) ->
    (Llava, ImportInfo).

    The LLM's weights come from `base`, the projector from `non_lora_trainables.bin` (which replaces
    any the base has), the vision tower from `vision` (the CLIP directory `mm_vision_tower` names).
    merge: fold the adapters into the kernels (W + A B alpha / r; a plain model), else keep them as
      `lora_a` / `lora_b` parameters (`LlamaConfig.lora_rank` etc. set from adapter_config.json).
    """
    import jax.numpy as jnp

    path, base = as_path(path), as_path(base)
    d = hf_config.read_config(path)
    if not hf_config.is_original_llava(d):
        raise ValueError(
            f"{path}/config.json is not an original LLaVA config (no mm_vision_tower / mm_hidden_size fields); "
            "an original LoRA checkpoint keeps the LLaVA config of its run beside adapter_config.json"
        )
    settings, _, adapter_source = adapters.open_adapter(path)
    source = _Overlay(open_checkpoint(base), _non_lora_trainables(path))
    in_shards = FORMATS["llava_original"].vision_prefix(source.keys()) is not None
    vdir = _vision_dir(d, vision)
    if not in_shards and vdir is None:
        raise FileNotFoundError(
            f"{path}: mm_vision_tower={d.get('mm_vision_tower')!r} is not a local directory and the base holds no "
            "vision tower; pass the CLIP model directory it names (--vision DIR / vision=DIR)"
        )
    vcfg = hf_config.original_vision_config(d, hf_config.read_config(vdir) if vdir is not None else None)
    cfg, aspect = hf_config.original_llava_config(d, vcfg, vocab_size=VOCAB)
    cfg = cfg.with_runtime(param_dtype=jnp.dtype(param_dtype))
    abstract = nnx.eval_shape(lambda: Llava(cfg, rngs=nnx.Rngs(0)))
    arrays = convert_arrays(abstract, source, "llava_original")
    if not in_shards:
        arrays.update(convert_arrays(abstract, open_checkpoint(vdir), "hf_clip"))
    lora = adapter_arrays(abstract, adapter_source, settings, where=adapters.adapter_file(path))
    if merge:
        model = materialize(abstract, fold_adapters(arrays, lora, settings), what="llava_original LoRA (merged)")
    else:
        names = adapters.target_names(lora)
        cfg = cfg.with_lora(
            lora_rank=settings.rank,
            lora_alpha=settings.alpha,
            lora_dropout=settings.dropout,
            lora_targets=adapters.targets_regex(names),
        )
        abstract = nnx.eval_shape(lambda: Llava(cfg, rngs=nnx.Rngs(0)))
        model = materialize(abstract, {**arrays, **lora}, what="llava_original LoRA (adapters)")
    rows = source.get(f"{FORMATS['llava_original'].llm_body}.embed_tokens.weight").shape[0]
    info = ImportInfo(
        aspect,
        default_template(path.resolve().name),
        {
            "format": "llava_original_lora",
            "path": str(path),
            "base": str(base),
            "vision": str(vdir) if not in_shards else "checkpoint",
            "lora": {"r": settings.rank, "alpha": settings.alpha, "merged": merge},
            "vocab": _vocab_source(base, rows, d),
        },
    )
    return model, info
