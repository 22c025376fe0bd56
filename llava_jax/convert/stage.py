"""Write an imported model as a llava_jax stage directory: `model.json` + orbax `final_params/`.

The layout is the one training writes at the end of a stage, so `inference.load_model`, chat,
evaluation, export and a following training stage all read it:

    <out>/model.json      {"model": config_to_dict(cfg), "template", "image_aspect_ratio",
                           "params": "final_params", "source": {where the weights came from}}
    <out>/final_params/   the parameter tree (`nnx.state(model).to_pure_dict()`)
"""

from __future__ import annotations

import json
import logging

import jax
import jax.numpy as jnp
from flax import nnx

from llava_jax.models.config import config_to_dict
from llava_jax.models.llava import Llava
from llava_jax.paths import Path, as_path

log = logging.getLogger(__name__)


def save_stage(model: Llava, out_dir, *, template: str, image_aspect_ratio: str, source: dict | None = None,
               dtype=None, overwrite: bool = False) -> Path:
    """Write `model` into `out_dir` (created). `dtype` casts the stored parameters (default: as they are)."""
    from llava_jax.data.image import ASPECT_RATIOS
    from llava_jax.data.templates import get_template
    from llava_jax.training.checkpoint import save_params

    get_template(template)  # refuse unknown names before writing anything
    if image_aspect_ratio not in ASPECT_RATIOS:
        raise ValueError(f"image_aspect_ratio={image_aspect_ratio!r}: use one of {ASPECT_RATIOS}")
    out = as_path(out_dir)
    if (out / "model.json").exists() or (out / "final_params").exists():
        if not overwrite:
            raise FileExistsError(f"{out} already holds a stage (model.json / final_params); pass --overwrite")
        (out / "final_params").rmtree(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    log.info("writing %s/final_params", out)
    params = nnx.state(model).to_pure_dict()
    if dtype is not None:
        params = jax.tree.map(lambda a: jnp.asarray(a, dtype), params)
    save_params(out / "final_params", params)
    info = {"model": config_to_dict(model.cfg), "template": template, "image_aspect_ratio": image_aspect_ratio,
            "params": "final_params"}
    if source:
        info["source"] = source
    (out / "model.json").write_text(json.dumps(info, indent=2) + "\n")
    return out


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


def import_checkpoint(source, out_dir, *, vision=None, projector=None, select_layer: int | None = None,
                      template: str | None = None, image_aspect_ratio: str | None = None, dtype=None,
                      overwrite: bool = False) -> Path:
    """Import `source` into a stage directory (`save_stage`). `source` is one of:

    - an original LLaVA directory (`mm_*` config fields): `vision` is the CLIP directory when the
      shards hold no tower (`original.load_original`);
    - a llava-hf directory (`model_type` llava with `text_config`);
    - a LLaMA / Vicuna directory, with `vision` (CLIP directory) and `projector` (a stage-1
      `mm_projector` file or folder): the model the original's stage 2 starts from (`original.load_pair`).

    `template` / `image_aspect_ratio` override what the source says or implies.
    """
    from llava_jax.convert import hf_config, original
    from llava_jax.convert.load import from_pretrained

    path = as_path(source)
    d = hf_config.read_config(path)
    log.info("importing %s", path)
    if hf_config.is_original_llava(d):
        if projector is not None:
            raise ValueError("--projector is for a LLaMA directory + CLIP + stage-1 projector; an original LLaVA "
                             "checkpoint already holds its projector")
        if select_layer is not None:
            raise ValueError("--select-layer applies to the LLaMA + CLIP + projector import only; an original "
                             "checkpoint's mm_vision_select_layer is used as is")
        model, info = original.load_original(path, vision=vision)
    elif d.get("model_type") == "llava" and "text_config" in d:
        if vision is not None or projector is not None:
            raise ValueError("a llava-hf directory holds all parts; drop --vision / --projector")
        model = from_pretrained(path)
        info = original.ImportInfo(_llava_hf_aspect_ratio(path, d, model.cfg.projector), "v1",
                                   {"format": "llava_hf", "path": str(path)})
    elif d.get("model_type") == "llama":
        if vision is None or projector is None:
            raise ValueError(f"{path} is a LLaMA directory: pass --vision CLIP_DIR and --projector FILE (a stage-1 "
                             "mm_projector.bin / .safetensors) to make a LLaVA model of it")
        model, info = original.load_pair(path, vision=vision, projector=projector, select_layer=select_layer)
    else:
        raise ValueError(f"{path}/config.json: model_type={d.get('model_type')!r} is not an original LLaVA, llava-hf "
                         "or LLaMA checkpoint")
    return save_stage(model, out_dir, template=template or info.template,
                      image_aspect_ratio=image_aspect_ratio or info.image_aspect_ratio, source=info.source,
                      dtype=dtype, overwrite=overwrite)
