"""LoRA adapters in checkpoint files: PEFT adapter directories (what `peft` saves and loads, and what the
original LLaVA's `llava-v1.5-*-lora` checkpoints are), read and written through the format tables.

A PEFT adapter directory holds `adapter_config.json` (r, lora_alpha, lora_dropout, target_modules, ...)
and `adapter_model.safetensors` (or `adapter_model.bin`). Its keys are the adapted linear's module path
in the base model under `base_model.model.`, e.g. for a transformers 5 `LlavaForConditionalGeneration`

    base_model.model.model.language_model.layers.3.self_attn.q_proj.lora_A.weight   [r, in]
    base_model.model.model.language_model.layers.3.self_attn.q_proj.lora_B.weight   [out, r]

and for a `LlamaForCausalLM` or the original's `LlavaLlamaForCausalLM`
`base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`. In llava_jax the same adapter is
`<llm>/layers/q_proj/lora_a` [L, in, r] (= lora_A.weight.T per layer) and `lora_b` [L, r, out]
(= lora_B.weight.T), with the same scaling lora_alpha / r (`models/lora.py`). The adapter table of a
format is derived from its kernel rules (`adapter_rules`), so the two never disagree.
"""

from __future__ import annotations

import dataclasses
import json

from llava_jax.checkpoint.files import open_checkpoint
from llava_jax.checkpoint.hf_load import CheckpointMismatch
from llava_jax.checkpoint.mapping import Rule
from llava_jax.models.lora import BLOCK_LINEARS
from llava_jax.paths import Path, as_path

PEFT_PREFIX = "base_model.model"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")

# PEFT options that change the adapter's maths or placement beyond W + B A * alpha / r on whole layers.
_UNSUPPORTED = {
    "use_dora": (False, None),
    "use_rslora": (False, None),
    "fan_in_fan_out": (False, None),
    "layers_to_transform": (None,),
    "rank_pattern": ({}, None),
    "alpha_pattern": ({}, None),
    "modules_to_save": (None, []),
    "lora_bias": (False, None),
}


def adapter_rules(kernel_rules: list[Rule], prefix: str = PEFT_PREFIX) -> list[Rule]:
    """The PEFT adapter rules of a table: for every linear kernel rule (`X/kernel` <-> `K.weight`),
    `X/lora_a` <-> `prefix.K.lora_A.weight` and `X/lora_b` <-> `prefix.K.lora_B.weight`, both of kind
    `linear` (a transpose per layer: [in, r] <-> [r, in], [r, out] <-> [out, r])."""
    out = []
    for r in kernel_rules:
        if r.kind == "linear" and r.ours.endswith("/kernel") and r.theirs.endswith(".weight"):
            ours, theirs = r.ours[: -len("kernel")], f"{prefix}.{r.theirs[: -len('weight')]}"
            out += [Rule(f"{ours}lora_a", f"{theirs}lora_A.weight", "linear")]
            out += [Rule(f"{ours}lora_b", f"{theirs}lora_B.weight", "linear")]
    return out


@dataclasses.dataclass(frozen=True)
class LoraSettings:
    """What llava_jax needs of an adapter config: `LlamaConfig.lora_rank / lora_alpha / lora_dropout`."""

    rank: int
    alpha: float
    dropout: float


def read_adapter_config(path) -> tuple[LoraSettings, dict]:
    """`adapter_config.json` in the directory `path` -> (settings, the raw dict). Options llava_jax's
    adapter cannot express (DoRA, rsLoRA, per-module ranks, bias training, ...) are refused by name."""
    f = as_path(path) / ADAPTER_CONFIG
    if not f.exists():
        raise FileNotFoundError(f"{as_path(path)}: no {ADAPTER_CONFIG} (a PEFT LoRA adapter directory has one)")
    d = json.loads(f.read_text())
    if d.get("peft_type", "LORA").upper() != "LORA":
        raise ValueError(f"{f}: peft_type={d.get('peft_type')!r}; only LoRA adapters can be read")
    bad = {k: d[k] for k, ok in _UNSUPPORTED.items() if k in d and d[k] not in ok}
    if d.get("bias", "none") != "none":
        bad["bias"] = d["bias"]
    if bad:
        raise ValueError(
            f"{f}: adapter options llava_jax's LoRA (W + A B alpha/r on whole layers) does not support: {bad}; "
            "merge the adapter with peft (merge_and_unload) and import the merged model instead"
        )
    try:
        settings = LoraSettings(int(d["r"]), float(d["lora_alpha"]), float(d.get("lora_dropout") or 0.0))
    except KeyError as e:
        raise ValueError(f"{f}: missing field {e.args[0]!r} (need r and lora_alpha)") from None
    if settings.rank <= 0:
        raise ValueError(f"{f}: r={settings.rank}; a LoRA adapter needs r > 0")
    return settings, d


def adapter_file(path) -> Path:
    """The adapter weights file in directory `path` (safetensors first)."""
    path = as_path(path)
    for name in ADAPTER_FILES:
        if (path / name).exists():
            return path / name
    raise FileNotFoundError(f"{path}: no {' or '.join(ADAPTER_FILES)} (the adapter weights of a PEFT directory)")


def open_adapter(path):
    """(settings, raw config, tensor source) of the PEFT adapter directory `path`."""
    settings, raw = read_adapter_config(path)
    return settings, raw, open_checkpoint(adapter_file(path))


def target_names(paths) -> list[str]:
    """The block linear names (q_proj, ...) that carry adapters among llava_jax param paths, in block order."""
    found = {p.split("/")[-2] for p in paths if p.endswith("/lora_a")}
    return [n for n in BLOCK_LINEARS if n in found]


def targets_regex(names) -> str:
    """`LlamaConfig.lora_targets` for exactly these linear names."""
    return "|".join(names)


def peft_target_modules(names, *, llava: bool) -> str:
    """PEFT `target_modules` (a regex fully matched against module paths) naming exactly the adapted
    block linears of the LLM: in a Llava model the vision tower has `q_proj` too, so bare names would
    put adapters there. Matches transformers 5 (`model.language_model.layers.N`) and 4
    (`language_model.model.layers.N`) module paths."""
    body = r".*language_model\.(model\.)?layers" if llava else r"(.*\.)?layers"
    return rf"{body}\.\d+\.(self_attn|mlp)\.({'|'.join(names)})"


def adapter_config(settings: LoraSettings, names, *, llava: bool, base_model: str | None) -> dict:
    """`adapter_config.json` contents for a plain LoRA on the named block linears."""
    return {
        "peft_type": "LORA",
        "task_type": None if llava else "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": settings.rank,
        "lora_alpha": settings.alpha,
        "lora_dropout": settings.dropout,
        "target_modules": peft_target_modules(names, llava=llava),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }


def check_adapter_shapes(arrays: dict, settings: LoraSettings, where) -> None:
    """Every lora_a [..., in, r] / lora_b [..., r, out] has the config's rank."""
    for k, a in arrays.items():
        r = a.shape[-1] if k.endswith("/lora_a") else a.shape[-2] if k.endswith("/lora_b") else None
        if r is not None and r != settings.rank:
            raise CheckpointMismatch(f"{where}: {k} has rank {r} but adapter_config.json says r={settings.rank}")
