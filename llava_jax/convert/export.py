"""Export llava_jax models as Hugging Face directories, through the same mapping tables as import.

    export_llava_hf(model, "out/llava-hf")      # LlavaForConditionalGeneration + AutoProcessor
    export_llama_hf(model.language_model, "out/llm")   # LlamaForCausalLM + tokenizer
    export_checkpoint("runs/demo", "out/hf")    # anything `checkpoint.load_model` reads

A llava-hf directory holds `config.json`, `generation_config.json`, safetensors shards with
`model.safetensors.index.json` (keys in the llava-hf file layout, `FORMATS["llava_hf"]`, the same
files transformers 4.x and 5.x load), the tokenizer with `<image>` / `<pad>`, and the processor
files (`hf_processor`). A `linear` projector (the paper's) is written as llava-hf stores one: two
layers with `projector_hidden_act="linear"`, `linear_2` the identity with zero bias; import folds
it back into one layer exactly.

LoRA models (`models/lora.py`): `merge_lora=True` writes W + lora_a @ lora_b * alpha / r per layer in
float32 (an int8 or NF4 base dequantized first), cast once to the export dtype; `lora_format="peft"` writes the
(dequantized) base weights and, in `<out>/adapter/`, a PEFT adapter (`write_peft_adapter`) that
`peft.PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(out), out / "adapter")`
loads. A quantised base (int8 or NF4) without adapters is written dequantized.
"""

from __future__ import annotations

import json
import logging

import numpy as np
from flax import nnx

from llava_jax.checkpoint import adapters, hf_config
from llava_jax.checkpoint.hf_load import _config_of, _root_kind
from llava_jax.checkpoint.mapping import FORMATS, Kind, to_theirs
from llava_jax.checkpoint.shards import TensorPlan, parse_size, write_shards
from llava_jax.checkpoint.stage_dir import load_model
from llava_jax.convert.hf_processor import write_processor, write_tokenizer
from llava_jax.data.tokenizer import PAD_TOKEN_ID
from llava_jax.models.llama import Llama
from llava_jax.models.llava import Llava
from llava_jax.models.lora import dequantize_kernel, float_kernel_shape, merged_kernel
from llava_jax.parallel.tree_paths import path_str
from llava_jax.paths import Path, as_path, staged_dir

log = logging.getLogger(__name__)

DTYPES = ("bfloat16", "float16", "float32")


def _np_dtype(name: str):
    if name not in DTYPES:
        raise ValueError(f"export dtype {name!r}: use one of {DTYPES}")
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _theirs_shape(kind: Kind, shape: tuple[int, ...]) -> tuple[int, ...]:
    if kind == "linear":
        return shape[::-1]
    if kind == "conv":  # [kh, kw, in, out] -> [out, in, kh, kw]
        return (shape[3], shape[2], shape[0], shape[1])
    return shape


def _host(value, index: int | None = None) -> np.ndarray:
    return np.asarray(value if index is None else value[index])


LORA_MODES = ("merge", "base")


def _lora_settings(module):
    llm = module.cfg.llm if isinstance(module, Llava) else module.cfg
    return adapters.LoraSettings(llm.lora_rank, llm.lora_alpha, llm.lora_dropout)


def has_lora(module) -> bool:
    """Whether `module` carries LoRA adapters (any `lora_a` parameter)."""
    return any(p[-1] == "lora_a" for p, _ in nnx.to_flat_state(nnx.state(module, nnx.Param)))


def _kernel_maker(flat: dict, ours: str, lora: str | None, settings):
    """f(layer index or None) -> the float kernel of `ours` (llava_jax layout [in, out]) as a checkpoint
    holds it: an int8 base dequantized (`kernel * kernel_scale`), an NF4 base too (`nf4_dequantize` of
    `kernel` and `kernel_absmax`), the adapter folded in when
    `lora == "merge"` (W + lora_a @ lora_b * alpha / r), the plain kernel otherwise."""
    stem = ours[: -len("kernel")]
    kernel = flat[ours].value
    names = ("kernel_scale", "kernel_absmax", "lora_a", "lora_b")
    scale, absmax, a, b = (flat[stem + n].value if stem + n in flat else None for n in names)
    scale = absmax if absmax is not None else scale

    def make(i):
        k, s = _host(kernel, i), None if scale is None else _host(scale, i)
        if a is not None and lora == "merge":
            return merged_kernel(k, _host(a, i), _host(b, i), settings.alpha, settings.rank, s, np.float32)
        if s is not None:
            return dequantize_kernel(k, s, np.float32)
        return k

    return make, [stem + n for n in names if stem + n in flat]


def export_tensors(module: Llava | Llama, fmt: str | None = None, *, lora: str | None = None) -> list[TensorPlan]:
    """The checkpoint tensors of `module` in format `fmt` (default: `llava_hf` for `Llava`, `hf_llama`
    for `Llama`), as lazily made arrays in PyTorch layout (see `shards.TensorPlan`).

    A quantised base (int8: `kernel` + `kernel_scale`; NF4: `kernel` + `kernel_absmax`) is written dequantized. LoRA adapters (`lora_a`, `lora_b`):
    `lora="merge"` folds them into the kernels (W + A B alpha / r, per layer, in float32);
    `lora="base"` writes the base kernels only (the adapters go to a PEFT file: `adapter_tensors`);
    a model with adapters and `lora=None` is an error (export would drop them)."""
    fmt = fmt or ("llava_hf" if isinstance(module, Llava) else "hf_llama")
    if lora is not None and lora not in LORA_MODES:
        raise ValueError(f"lora={lora!r}: use one of {LORA_MODES} or None")
    f = FORMATS[fmt]
    projector, tied = _config_of(module)
    rules = f.rules(
        ours_prefix=_root_kind(module), vision_prefix=f.vision[0] if f.vision else None, projector=projector, tied=tied
    )
    flat = {path_str(p): v for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}
    if lora is None and any(k.endswith("/lora_a") for k in flat):
        raise ValueError(
            "the model has LoRA adapters: export them folded into the weights (--merge-lora, lora='merge') or "
            "as a PEFT adapter beside the base weights (--lora-format peft)"
        )
    settings = _lora_settings(module)
    plans: list[TensorPlan] = []
    covered = set()
    for rule in rules:
        if rule.ours not in flat:
            raise KeyError(f"mapping rule {rule.theirs!r} names {rule.ours!r}, which the model does not have")
        covered.add(rule.ours)
        value = flat[rule.ours].value
        make = lambda i, v=value: _host(v, i)  # noqa: E731
        ours_shape = tuple(value.shape)
        if rule.ours.endswith("/kernel"):
            make, extra = _kernel_maker(flat, rule.ours, lora, settings)
            covered.update(extra)
            ours_shape = float_kernel_shape(ours_shape, value.dtype)  # an NF4 kernel holds in / 2 rows
        if rule.stacked:
            shape = _theirs_shape(rule.kind, ours_shape[1:])
            plans += [
                TensorPlan(rule.theirs.format(i=i), shape, lambda m=make, i=i, k=rule.kind: to_theirs(k, m(i)))
                for i in range(value.shape[0])
            ]
        else:
            plans.append(
                TensorPlan(
                    rule.theirs,
                    _theirs_shape(rule.kind, ours_shape),
                    lambda m=make, k=rule.kind: to_theirs(k, m(None)),
                )
            )
    missing = sorted(set(flat) - covered)
    if missing:
        raise KeyError(f"parameters with no rule in the {fmt} table (export would drop them): {missing[:5]}")
    if isinstance(module, Llava) and projector == "linear" and f.projector_style == "hf":
        d = module.cfg.llm.hidden_size
        plans += [
            TensorPlan(f"{f.projector}.linear_2.weight", (d, d), lambda: np.eye(d, dtype=np.float32)),
            TensorPlan(f"{f.projector}.linear_2.bias", (d,), lambda: np.zeros(d, np.float32)),
        ]
    return plans


ADAPTER_DIR = "adapter"  # the PEFT adapter's folder inside a `--lora-format peft` export


def adapter_tensors(module: Llava | Llama) -> dict[str, np.ndarray]:
    """{PEFT key: array in PyTorch layout} of the module's LoRA adapters, keyed as `peft` names them on
    the transformers model (`base_model.model.<module path>.lora_A.weight` [r, in], `lora_B.weight`
    [out, r]; module paths of transformers 5: `model.language_model.layers.N...` for Llava,
    `model.layers.N...` for Llama)."""
    fmt = "llava_hf_v5" if isinstance(module, Llava) else "hf_llama"
    f = FORMATS[fmt]
    projector, tied = _config_of(module)
    rules = f.rules(ours_prefix=_root_kind(module), vision_prefix=None, projector=projector, tied=tied)
    flat = {path_str(p): v for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}
    out = {}
    for rule in adapters.adapter_rules(rules):
        if rule.ours in flat:
            value = flat[rule.ours].value
            for i in range(value.shape[0]) if rule.stacked else (None,):
                out[rule.theirs if i is None else rule.theirs.format(i=i)] = to_theirs(rule.kind, _host(value, i))
    wanted = {k for k in flat if k.endswith(("/lora_a", "/lora_b"))}
    done = {r.ours for r in adapters.adapter_rules(rules)} & wanted
    if wanted - done:
        raise KeyError(f"LoRA parameters with no PEFT key in the {fmt} table: {sorted(wanted - done)[:5]}")
    return out


def write_peft_adapter(
    module: Llava | Llama, out_dir, *, dtype: str = "float32", base_model: str | None = None
) -> Path:
    """Write the module's adapters as a PEFT LoRA directory: `adapter_config.json` +
    `adapter_model.safetensors` (`adapter_tensors`), which `peft.PeftModel.from_pretrained(base, out_dir)`
    loads onto the transformers model of the base weights. `base_model`: recorded as
    `base_model_name_or_path` (where the base llava-hf / LLaMA directory is)."""
    from safetensors.numpy import save_file

    np_dtype = _np_dtype(dtype)
    tensors = adapter_tensors(module)
    if not tensors:
        raise ValueError("the model has no LoRA adapters (lora_rank = 0): nothing to write as a PEFT adapter")
    out = as_path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = adapters.target_names(k for k, _ in _flat_paths(module))
    config = adapters.adapter_config(
        _lora_settings(module), names, llava=isinstance(module, Llava), base_model=base_model
    )
    with staged_dir(out) as local:
        _write_json(local / adapters.ADAPTER_CONFIG, config)
        arrays = {k: np.ascontiguousarray(a.astype(np_dtype)) for k, a in tensors.items()}
        save_file(arrays, str(local / adapters.ADAPTER_FILES[0]), metadata={"format": "pt"})
    log.info("wrote PEFT adapter (%d tensors, r=%d) to %s", len(tensors), config["r"], out)
    return out


def _flat_paths(module):
    return [(path_str(p), v) for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))]


def _lora_mode(module, merge_lora: bool, lora_format: str | None) -> str | None:
    """export_tensors' `lora` for the export options (`--merge-lora`, `--lora-format peft`)."""
    if merge_lora and lora_format is not None:
        raise ValueError("choose one: merge_lora (--merge-lora) folds the adapters in, lora_format='peft' keeps them")
    if lora_format not in (None, "peft"):
        raise ValueError(f"lora_format={lora_format!r}: the only adapter format is 'peft'")
    if (merge_lora or lora_format) and not has_lora(module):
        raise ValueError("--merge-lora / --lora-format: the model has no LoRA adapters (lora_rank = 0)")
    return "merge" if merge_lora else "base" if lora_format else None


def _prepare(out_dir, overwrite: bool) -> Path:
    out = as_path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty; choose a new directory or pass overwrite=True (--overwrite)")
        for old in list(out.glob("model*.safetensors")) + list(out.glob("*.index.json")):
            old.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _generation_config(cfg_pad: int | None) -> dict:
    return {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": cfg_pad}


def export_llava_hf(
    model: Llava,
    out_dir,
    *,
    dtype: str = "bfloat16",
    max_shard_size: str | int = "5GB",
    tokenizer=None,
    template: str | None = "v1",
    image_aspect_ratio: str = "square",
    overwrite: bool = False,
    merge_lora: bool = False,
    lora_format: str | None = None,
) -> Path:
    """Write `model` as a llava-hf directory (module docstring).

    dtype: storage dtype of the weights (`bfloat16`, `float16`, `float32`).
    tokenizer: a tokenizer with `<image>`=32000 and `<pad>`=32001 (default: `load_tokenizer()`).
    template: conversation template name for the chat template (None: no chat template).
    image_aspect_ratio: `square` or `pad`, the preprocessing the model was trained with.
    merge_lora: fold LoRA adapters into the weights (W + A B alpha / r; an int8 / NF4 base is dequantized first).
    lora_format: "peft": write the base weights and the adapters as a PEFT adapter in `out_dir/adapter`.
    """
    if not isinstance(model, Llava):
        raise TypeError(f"export_llava_hf needs a Llava model, got {type(model).__name__} (use export_llama_hf)")
    np_dtype = _np_dtype(dtype)
    lora = _lora_mode(model, merge_lora, lora_format)
    out = _prepare(out_dir, overwrite)
    cfg = model.cfg
    with staged_dir(out) as local:  # safetensors and tokenizers write local files; a URL gets them uploaded
        _write_json(
            local / "config.json", hf_config.llava_config_to_hf(cfg, dtype=dtype, image_aspect_ratio=image_aspect_ratio)
        )
        _write_json(local / "generation_config.json", _generation_config(cfg.pad_token_id))
        write_shards(
            export_tensors(model, lora=lora),
            local,
            dtype=np_dtype,
            max_shard_bytes=parse_size(max_shard_size),
            progress=log.info,
        )
        write_tokenizer(local, tokenizer, template=template, max_length=cfg.llm.context_length)
        write_processor(local, cfg, image_aspect_ratio=image_aspect_ratio, template=template)
    if lora == "base":
        write_peft_adapter(model, out / ADAPTER_DIR, dtype=dtype, base_model=str(out))
    log.info("exported llava-hf model to %s", out)
    return out


def export_llama_hf(
    model: Llama,
    out_dir,
    *,
    dtype: str = "bfloat16",
    max_shard_size: str | int = "5GB",
    tokenizer=None,
    template: str | None = "v1",
    pad_token_id: int | None = PAD_TOKEN_ID,
    overwrite: bool = False,
    merge_lora: bool = False,
    lora_format: str | None = None,
) -> Path:
    """Write a `Llama` (e.g. `llava.language_model`) as a `LlamaForCausalLM` directory with the tokenizer
    (LoRA options as `export_llava_hf`)."""
    if not isinstance(model, Llama):
        raise TypeError(f"export_llama_hf needs a Llama model, got {type(model).__name__}")
    np_dtype = _np_dtype(dtype)
    lora = _lora_mode(model, merge_lora, lora_format)
    out = _prepare(out_dir, overwrite)
    cfg = model.cfg
    hf = hf_config.llama_config_to_hf(cfg, dtype=dtype, pad_token_id=pad_token_id)
    with staged_dir(out) as local:
        _write_json(local / "config.json", hf)
        _write_json(local / "generation_config.json", _generation_config(hf["pad_token_id"]))
        write_shards(
            export_tensors(model, lora=lora),
            local,
            dtype=np_dtype,
            max_shard_bytes=parse_size(max_shard_size),
            progress=log.info,
        )
        write_tokenizer(local, tokenizer, template=template, max_length=cfg.context_length)
    if lora == "base":
        write_peft_adapter(model, out / ADAPTER_DIR, dtype=dtype, base_model=str(out))
    log.info("exported LLaMA model to %s", out)
    return out


def export_checkpoint(
    checkpoint,
    out_dir,
    *,
    dtype: str = "bfloat16",
    max_shard_size: str | int = "5GB",
    llm_only: bool = False,
    tokenizer_path=None,
    template: str | None = None,
    overwrite: bool = False,
    merge_lora: bool = False,
    lora_format: str | None = None,
) -> Path:
    """Export a training run / stage directory or a llava-hf directory (anything
    `llava_jax.checkpoint.load_model` reads). The conversation template and image aspect ratio come
    from the checkpoint (`template` overrides the first)."""
    from llava_jax.data.tokenizer import load_tokenizer

    _np_dtype(dtype)  # fail before loading
    parse_size(max_shard_size)
    loaded = load_model(checkpoint)
    template = template or loaded.template
    tokenizer = load_tokenizer(tokenizer_path)
    if llm_only:
        return export_llama_hf(
            loaded.model.language_model,
            out_dir,
            dtype=dtype,
            max_shard_size=max_shard_size,
            tokenizer=tokenizer,
            template=template,
            pad_token_id=loaded.model.cfg.pad_token_id,
            overwrite=overwrite,
            merge_lora=merge_lora,
            lora_format=lora_format,
        )
    return export_llava_hf(
        loaded.model,
        out_dir,
        dtype=dtype,
        max_shard_size=max_shard_size,
        tokenizer=tokenizer,
        template=template,
        image_aspect_ratio=loaded.image_aspect_ratio,
        overwrite=overwrite,
        merge_lora=merge_lora,
        lora_format=lora_format,
    )
