"""Import checkpoints into llava_jax modules through the mapping tables.

    model = from_pretrained("path/to/llava-hf-dir")             # config.json + weights
    load_weights(model.vision_tower, "path/to/clip")           # one part of a model
    load_weights(model, "path/to/vicuna")                        # fills model.language_model

Every array is checked: a checkpoint key with no rule (and not on the format's ignore list), a rule
whose key is missing, and a shape mismatch are errors that name the key.

LLaMA-family checkpoints with a plain LLaMA vocabulary (32000 rows; 32003 for original LLaVA v0) are
fitted into the model's llava-hf vocabulary (32064 rows) as `vocab.fit_rows` documents: LLaMA ids
unchanged, added rows moved after `<image>`/`<pad>`, new rows set to the mean row.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from llava_jax.checkpoint import hf_config, vocab
from llava_jax.checkpoint.files import TensorSource, open_checkpoint
from llava_jax.checkpoint.mapping import FORMATS, Rule, detect_format, to_ours
from llava_jax.models.clip import ClipVisionTower
from llava_jax.models.llama import Llama
from llava_jax.models.llava import Llava
from llava_jax.models.lora import float_kernel_shape, quantize_arrays
from llava_jax.parallel.tree_paths import path_str

# Where each part sits inside each llava_jax root module ('' = the root itself; None = absent).
_PART_PREFIX = {
    Llava: {"vision": "vision_tower", "llm": "language_model", "projector": "multi_modal_projector"},
    Llama: {"vision": None, "llm": "", "projector": None},
    ClipVisionTower: {"vision": "", "llm": None, "projector": None},
}


log = logging.getLogger(__name__)

# Formats whose vocabulary tables may have LLaMA's row count instead of the model's (see `vocab`).
_VOCAB_FIT_FORMATS = ("hf_llama", "llava_original")
_VOCAB_PARAMS = {"embed_tokens/embedding": 0, "lm_head/kernel": 1}  # llava_jax path suffix -> vocab axis


class CheckpointMismatch(ValueError):
    """A checkpoint does not fit the model: the message names the key and the shapes."""


def _root_kind(module) -> dict[str, str | None]:
    for cls, prefixes in _PART_PREFIX.items():
        if isinstance(module, cls):
            return prefixes
    raise TypeError(f"cannot load into {type(module).__name__}; use Llava, Llama or ClipVisionTower")


def _config_of(module):
    cfg = module.cfg
    if isinstance(module, Llava):
        return cfg.projector, cfg.llm.tie_word_embeddings
    if isinstance(module, Llama):
        return None, cfg.tie_word_embeddings
    return None, False


def rules_for(module, fmt: str, keys) -> list[Rule]:
    """The format's table laid over this module: the parts both the module and checkpoint have."""
    f = FORMATS[fmt]
    projector, tied = _config_of(module)
    return f.rules(ours_prefix=_root_kind(module), vision_prefix=f.vision_prefix(keys), projector=projector, tied=tied)


def _fold_identity_act_projector(source: TensorSource, prefix: str) -> dict[str, np.ndarray]:
    """llava-hf stores a linear projector as linear_2(linear_1(x)) with the identity activation;
    fold it into one layer: W = W2 W1, b = W2 b1 + b2 (torch layout)."""
    w1, b1 = source.get(f"{prefix}.linear_1.weight"), source.get(f"{prefix}.linear_1.bias")
    w2, b2 = source.get(f"{prefix}.linear_2.weight"), source.get(f"{prefix}.linear_2.bias")
    w1, b1, w2, b2 = (np.asarray(a, np.float64) for a in (w1, b1, w2, b2))
    return {
        f"{prefix}.linear_1.weight": (w2 @ w1).astype(np.float32),
        f"{prefix}.linear_1.bias": (w2 @ b1 + b2).astype(np.float32),
    }


def convert_arrays(module, source: TensorSource, fmt: str | None = None) -> dict[str, np.ndarray]:
    """{llava_jax param path: array in llava_jax layout} for every rule the module and format share.

    `module` may be abstract (`nnx.eval_shape`); only shapes and dtypes are read from it. A model with
    an int8 base gets int8 kernels and their `kernel_scale` entries, an NF4 base packed uint8 kernels
    and their `kernel_absmax` entries (`lora.quantize_arrays`).
    """
    keys = source.keys()
    fmt = fmt or detect_format(keys)
    if fmt not in FORMATS:
        raise ValueError(f"unknown checkpoint format {fmt!r}; one of {sorted(FORMATS)}")
    rules = rules_for(module, fmt, keys)
    overrides: dict[str, np.ndarray] = {}
    f = FORMATS[fmt]
    if (
        isinstance(module, Llava)
        and module.cfg.projector == "linear"
        and f.projector_style == "hf"
        and f"{f.projector}.linear_2.weight" in keys
    ):
        overrides = _fold_identity_act_projector(source, f.projector)

    flat = {path_str(p): v for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}
    out: dict[str, np.ndarray] = {}
    used: set[str] = {f"{f.projector}.linear_2.{w}" for w in ("weight", "bias")} if overrides else set()
    keyset = set(keys) | set(overrides)

    def read(key: str) -> np.ndarray:
        if key not in keyset:
            raise CheckpointMismatch(f"checkpoint ({fmt}) has no key {key!r}, which the model needs")
        used.add(key)
        return overrides[key] if key in overrides else source.get(key)

    for rule in rules:
        if rule.ours not in flat:
            raise CheckpointMismatch(f"mapping rule for {rule.theirs!r} targets {rule.ours!r}, not a model parameter")
        # an NF4 kernel (uint8) holds [in / 2, out]: the checkpoint gives the float [in, out] it packs
        want = float_kernel_shape(tuple(flat[rule.ours].shape), flat[rule.ours].value.dtype)
        out[rule.ours] = _rule_array(rule, want, fmt, read)
    _check_tied_head(module, f, keyset, used, read)
    _check_all_used(keys, used, f.ignore, fmt)
    # A quantised base (models/lora.py): float kernels become int8 per output channel (scales added) or
    # NF4 (absmax added).
    return quantize_arrays(out, {k: np.dtype(v.value.dtype) for k, v in flat.items()})


def _rule_array(rule, want: tuple[int, ...], fmt: str, read) -> np.ndarray:
    """The array of shape `want` (llava_jax layout) that `rule` makes of the checkpoint tensors `read` returns:
    per-layer tensors stacked for a stacked rule, vocabulary rows fitted for the formats that allow it."""
    if rule.stacked:
        arr = np.stack([to_ours(rule.kind, read(rule.theirs.format(i=i))) for i in range(want[0])])
    else:
        arr = read(rule.theirs)
        axis = _vocab_axis(rule.ours) if fmt in _VOCAB_FIT_FORMATS else None
        if axis is not None and vocab.needs_fit(arr.shape[0], want[axis]):
            rows = arr.shape[0]
            try:
                arr = vocab.fit_rows(arr, want[axis], key=rule.theirs)
            except ValueError as e:
                raise CheckpointMismatch(str(e)) from None
            log.info("%s: %s", rule.theirs, vocab.describe(rows, want[axis]))
        arr = to_ours(rule.kind, arr)
    if tuple(arr.shape) != want:
        raise CheckpointMismatch(
            f"{rule.theirs!r}: checkpoint shape {tuple(arr.shape)} (in llava_jax layout) does not match "
            f"parameter {rule.ours!r} of shape {want}; is the config right for this checkpoint?"
        )
    return arr


def _check_all_used(keys, used: set[str], ignore_patterns, fmt: str) -> None:
    """Raise `CheckpointMismatch` when a checkpoint key was neither read nor matches one of `ignore_patterns`."""
    ignore = [re.compile(p) for p in ignore_patterns]
    unknown = [k for k in keys if k not in used and not any(p.search(k) for p in ignore)]
    if unknown:
        raise CheckpointMismatch(
            f"checkpoint ({fmt}) has {len(unknown)} key(s) the model does not use, e.g. {unknown[:5]}; "
            "the config (layer count, tied embeddings, projector) probably differs from the checkpoint's"
        )


def _vocab_axis(ours: str) -> int | None:
    for suffix, axis in _VOCAB_PARAMS.items():
        if ours == suffix or ours.endswith("/" + suffix):
            return axis
    return None


def _check_tied_head(module, f, keyset, used, read) -> None:
    """A tied model's state_dict still lists `lm_head.weight` (the same tensor as the embedding):
    accept it when equal, refuse it when the checkpoint really has a separate head."""
    _, tied = _config_of(module)
    if not tied or f.lm_head is None or f"{f.lm_head}.weight" not in keyset:
        return
    head, embed = f"{f.lm_head}.weight", f"{f.llm_body}.embed_tokens.weight"
    if not np.array_equal(read(head), read(embed)):
        raise CheckpointMismatch(f"{head!r} differs from {embed!r} but the config ties them (tie_word_embeddings=True)")


def load_weights(module, path_or_source: Any, fmt: str | None = None):
    """Load a checkpoint (path or source) into `module` in place; returns the module."""
    source = open_checkpoint(path_or_source) if not hasattr(path_or_source, "get") else path_or_source
    arrays = convert_arrays(module, source, fmt)
    state = nnx.state(module, nnx.Param)
    for path, var in nnx.to_flat_state(state):
        key = path_str(path)
        if key in arrays:
            var.value = jnp.asarray(arrays[key], dtype=var.value.dtype)
    nnx.update(module, state)
    return module


def config_from_hf(d: dict):
    """A HF config dict -> (llava_jax module class, config)."""
    mt = d.get("model_type")
    if hf_config.is_original_llava(d):
        raise ValueError(
            "this is an original LLaVA (LlavaLlamaForCausalLM) config; its shards usually hold no vision tower. "
            "Import it with `python -m llava_jax.convert import --from DIR [--vision CLIP_DIR] --out RUN_DIR` "
            "or llava_jax.checkpoint.original.load_original(DIR, vision=CLIP_DIR)"
        )
    if mt == "llava":
        return Llava, hf_config.llava_config_from_hf(d)
    if mt in ("llama",):
        return Llama, hf_config.llama_config_from_hf(d)
    if mt in ("clip", "clip_vision_model"):
        return ClipVisionTower, hf_config.vision_config_from_hf(d)
    raise ValueError(f"model_type {mt!r} is not supported (llava, llama, clip, clip_vision_model)")


def from_pretrained(path, *, dtype=jnp.float32, param_dtype=jnp.float32, fmt: str | None = None):
    """Build a module from a Hugging Face directory (config.json + weights), without random init."""
    import dataclasses

    cls, cfg = config_from_hf(hf_config.read_config(path))
    runtime = dict(dtype=dtype, param_dtype=param_dtype)
    cfg = cfg.with_runtime(**runtime) if cls is Llava else dataclasses.replace(cfg, **runtime)
    abstract = nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0)))
    return materialize(abstract, convert_arrays(abstract, open_checkpoint(path), fmt), what=fmt or "detected")


def materialize(abstract, arrays: dict[str, np.ndarray], *, what: str = "checkpoint"):
    """An abstract module (`nnx.eval_shape`) filled with `arrays` ({param path: array}); every
    parameter must be given (`what` names the source in the error)."""
    graphdef, state = nnx.split(abstract)
    for p, var in nnx.to_flat_state(state):
        key = path_str(p)
        if key not in arrays:
            raise CheckpointMismatch(f"parameter {key!r} has no entry in the {what} mapping table")
        var.value = jnp.asarray(arrays[key], dtype=var.value.dtype)
    return nnx.merge(graphdef, state)
