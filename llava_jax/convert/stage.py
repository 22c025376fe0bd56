"""Import a Hugging Face / original LLaVA checkpoint as a llava_jax stage directory
(`checkpoint.stage_dir`: `model.json` + orbax `final_params/`), the layout training writes at the end
of a stage, so chat, evaluation, export and a following training stage all read it.
"""

from __future__ import annotations

import json
import logging

from llava_jax.checkpoint import adapters, hf_config, original
from llava_jax.checkpoint.hf_load import from_pretrained
from llava_jax.checkpoint.stage_dir import save_stage
from llava_jax.paths import Path, as_path

log = logging.getLogger(__name__)

LORA_MODES = ("merge", "keep")


def _llava_hf_aspect_ratio(path: Path, d: dict, projector: str) -> str:
    """The preprocessing a llava-hf directory's model expects: its config's `image_aspect_ratio`
    (llava_jax exports write it), else a padding image processor, else LLaVA-1.5's habit (`pad`
    with the MLP projector, `square` with the linear one)."""
    if d.get("image_aspect_ratio") in ("square", "pad"):
        return d["image_aspect_ratio"]
    pre = path / "preprocessor_config.json"
    if pre.exists() and json.loads(pre.read_text()).get("do_pad"):
        return "pad"
    return "pad" if projector == "mlp2x_gelu" else "square"


def import_checkpoint(
    source,
    out_dir,
    *,
    vision=None,
    projector=None,
    select_layer: int | None = None,
    base=None,
    lora: str = "merge",
    template: str | None = None,
    image_aspect_ratio: str | None = None,
    dtype=None,
    overwrite: bool = False,
) -> Path:
    """Import `source` into a stage directory (`save_stage`). `source` is one of:

    - an original LLaVA directory (`mm_*` config fields): `vision` is the CLIP directory when the
      shards hold no tower (`original.load_original`);
    - a llava-hf directory (`model_type` llava with `text_config`);
    - a LLaMA / Vicuna directory, with `vision` (CLIP directory) and `projector` (a stage-1
      `mm_projector` file or folder): the model the original's stage 2 starts from (`original.load_pair`);
    - an original LLaVA LoRA checkpoint (`llava-v1.5-*-lora`: adapter_config.json, adapter_model.bin,
      non_lora_trainables.bin), with `base` (the Vicuna / LLaMA directory it was trained on) and `vision`:
      `lora="merge"` folds the adapters into the weights, `lora="keep"` keeps them as LoRA parameters
      (`original.load_original_lora`).

    `template` / `image_aspect_ratio` override what the source says or implies.
    """
    path = as_path(source)
    d = hf_config.read_config(path)
    log.info("importing %s", path)
    if lora not in LORA_MODES:
        raise ValueError(f"lora={lora!r}: use one of {LORA_MODES}")
    if (path / adapters.ADAPTER_CONFIG).exists():
        if base is None:
            raise ValueError(
                f"{path} is a LoRA checkpoint (adapter_config.json): pass its base model with --base DIR (the "
                "Vicuna / LLaMA directory the LoRA run started from, e.g. vicuna-7b-v1.5 for llava-v1.5-7b-lora)"
            )
        if projector is not None or select_layer is not None:
            raise ValueError("--projector / --select-layer do not apply to a LoRA checkpoint (it holds its projector)")
        model, info = original.load_original_lora(path, base=base, vision=vision, merge=lora == "merge")
    else:
        if base is not None:
            raise ValueError(f"--base is for a LoRA checkpoint; {path} has no adapter_config.json")
        model, info = _load_source(path, d, vision=vision, projector=projector, select_layer=select_layer)
    return save_stage(
        model,
        out_dir,
        template=template or info.template,
        image_aspect_ratio=image_aspect_ratio or info.image_aspect_ratio,
        source=info.source,
        dtype=dtype,
        overwrite=overwrite,
    )


def _load_source(path: Path, d: dict, *, vision, projector, select_layer: int | None):
    """(model, `original.ImportInfo`) for the checkpoint directory `path` whose config is `d`: an original
    LLaVA, a llava-hf or a LLaMA directory (+ CLIP + stage-1 projector); see `import_checkpoint`."""
    if hf_config.is_original_llava(d):
        if projector is not None:
            raise ValueError(
                "--projector is for a LLaMA directory + CLIP + stage-1 projector; an original LLaVA "
                "checkpoint already holds its projector"
            )
        if select_layer is not None:
            raise ValueError(
                "--select-layer applies to the LLaMA + CLIP + projector import only; an original "
                "checkpoint's mm_vision_select_layer is used as is"
            )
        model, info = original.load_original(path, vision=vision)
    elif d.get("model_type") == "llava" and "text_config" in d:
        if vision is not None or projector is not None:
            raise ValueError("a llava-hf directory holds all parts; drop --vision / --projector")
        model = from_pretrained(path)
        info = original.ImportInfo(
            _llava_hf_aspect_ratio(path, d, model.cfg.projector), "v1", {"format": "llava_hf", "path": str(path)}
        )
    elif d.get("model_type") == "llama":
        if vision is None or projector is None:
            raise ValueError(
                f"{path} is a LLaMA directory: pass --vision CLIP_DIR and --projector FILE (a stage-1 "
                "mm_projector.bin / .safetensors) to make a LLaVA model of it"
            )
        model, info = original.load_pair(path, vision=vision, projector=projector, select_layer=select_layer)
    else:
        raise ValueError(
            f"{path}/config.json: model_type={d.get('model_type')!r} is not an original LLaVA, llava-hf "
            "or LLaMA checkpoint"
        )
    return model, info
