"""The stage directory: what a finished training stage (or `convert import`) leaves for the next stage,
chat, serving, evaluation and export.

    <stage>/model.json      {"model": config_to_dict(cfg), "template", "image_aspect_ratio",
                             "params": "final_params", "source": {where imported weights came from}}
    <stage>/final_params/   the parameter tree (`nnx.state(model).to_pure_dict()`, `checkpoint.params`)

`load_model` accepts:
- a training workdir (`runs/demo`): its last finished stage;
- a stage directory (`runs/demo/stage2`);
- a llava-hf directory (`config.json` + safetensors), through the conversion tables.
It returns a `Loaded` with the model (float32 params unless asked otherwise), the conversation
template and the image aspect-ratio mode the model was trained with.
"""

from __future__ import annotations

import dataclasses
import json
import logging

import jax
import jax.numpy as jnp
from flax import nnx

from llava_jax.checkpoint.hf_load import from_pretrained
from llava_jax.checkpoint.params import restore_params, save_params
from llava_jax.data.image import ASPECT_RATIOS
from llava_jax.data.templates import get_template
from llava_jax.models import Llava
from llava_jax.models.config import LlavaConfig, config_from_dict, config_to_dict
from llava_jax.paths import Path, as_path

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Loaded:
    model: Llava
    template: str
    image_aspect_ratio: str
    path: Path


def write_model_info(
    stage_dir: Path, cfg: LlavaConfig, template: str, aspect_ratio: str, *, source: dict | None = None
) -> None:
    """`model.json` beside `final_params/`: what chat, serving and export need to rebuild the model."""
    info = {
        "model": config_to_dict(cfg),
        "template": template,
        "image_aspect_ratio": aspect_ratio,
        "params": "final_params",
    }
    if source:
        info["source"] = source
    (as_path(stage_dir) / "model.json").write_text(json.dumps(info, indent=2) + "\n")


def _stored(path, a, dtype):
    """`a` cast to `dtype` for storage, except a quantized base's integer kernels and their float32
    `kernel_scale` / `kernel_absmax` (`models/lora.py`), which are kept exact."""
    name = getattr(path[-1], "key", None)
    if not jnp.issubdtype(a.dtype, jnp.floating) or name in ("kernel_scale", "kernel_absmax"):
        return a
    return jnp.asarray(a, dtype)


def save_stage(
    model: Llava,
    out_dir,
    *,
    template: str,
    image_aspect_ratio: str,
    source: dict | None = None,
    dtype=None,
    overwrite: bool = False,
) -> Path:
    """Write `model` into `out_dir` (created). `dtype` casts the stored parameters (default: as they are)."""
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
        params = jax.tree_util.tree_map_with_path(lambda p, a: _stored(p, a, dtype), params)
    save_params(out / "final_params", params)
    write_model_info(out, model.cfg, template, image_aspect_ratio, source=source)
    return out


def _stage_dir(path: Path) -> Path:
    if (path / "model.json").exists():
        return path
    stages = sorted(p.parent for p in path.glob("*/model.json"))
    if not stages:
        raise FileNotFoundError(
            f"{path}: no model.json found (expected a llava_jax run/stage directory or a llava-hf directory)"
        )
    cfg_file = path / "config.json"
    if cfg_file.exists():  # a run: follow its stage order, last finished wins
        order = [s.strip() for s in json.loads(cfg_file.read_text()).get("stages", "").split(",") if s.strip()]
        ranked = [path / s for s in order if (path / s / "model.json").exists()]
        if ranked:
            return ranked[-1]
    return stages[-1]


def load_model(path, *, dtype=jnp.float32, template: str | None = None) -> Loaded:
    path = as_path(path)
    if (
        (path / "config.json").exists()
        and not (path / "model.json").exists()
        and json.loads((path / "config.json").read_text()).get("model_type") == "llava"
    ):
        model = from_pretrained(path, dtype=dtype)
        hf = json.loads((path / "config.json").read_text())
        aspect = hf.get("image_aspect_ratio") or ("pad" if model.cfg.projector == "mlp2x_gelu" else "square")
        return Loaded(model, template or "v1", aspect, path)
    stage = _stage_dir(path)
    info = json.loads((stage / "model.json").read_text())
    cfg = config_from_dict(info["model"]).with_runtime(dtype=dtype, param_dtype=jnp.float32, remat="none")
    abstract = nnx.eval_shape(lambda: Llava(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    # float parameters come back float32; a quantized base's integer kernels (int8, NF4's packed uint8) as stored
    target = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(
            a.shape,
            jnp.float32 if jnp.issubdtype(a.dtype, jnp.floating) else a.dtype,
            sharding=jax.sharding.SingleDeviceSharding(jax.local_devices()[0]),
        ),
        state.to_pure_dict(),
    )
    params = restore_params(stage / info.get("params", "final_params"), target)
    return Loaded(nnx.merge(graphdef, params), template or info["template"], info["image_aspect_ratio"], stage)
