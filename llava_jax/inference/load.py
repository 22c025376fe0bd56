"""Load a model for inference from a llava_jax run or a Hugging Face directory.

Accepted paths:
- a training workdir (`runs/demo`): its last finished stage;
- a stage directory (`runs/demo/stage2`) holding `model.json` + `final_params/`;
- a llava-hf directory (`config.json` + safetensors), through the conversion tables.

Returns a `Loaded` with the model (float32 params unless asked otherwise), the conversation template
and the image aspect-ratio mode the model was trained with.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
from flax import nnx

from llava_jax.models import Llava
from llava_jax.models.config import config_from_dict
from llava_jax.paths import Path, as_path


@dataclasses.dataclass
class Loaded:
    model: Llava
    template: str
    image_aspect_ratio: str
    path: Path


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
    if (path / "config.json").exists() and not (path / "model.json").exists() \
            and json.loads((path / "config.json").read_text()).get("model_type") == "llava":
        from llava_jax.convert import from_pretrained

        model = from_pretrained(path, dtype=dtype)
        hf = json.loads((path / "config.json").read_text())
        aspect = hf.get("image_aspect_ratio") or ("pad" if model.cfg.projector == "mlp2x_gelu" else "square")
        return Loaded(model, template or "v1", aspect, path)
    stage = _stage_dir(path)
    info = json.loads((stage / "model.json").read_text())
    cfg = config_from_dict(info["model"]).with_runtime(dtype=dtype, param_dtype=jnp.float32, remat="none")
    abstract = nnx.eval_shape(lambda: Llava(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    from llava_jax.training.checkpoint import restore_params

    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32,
                                                         sharding=jax.sharding.SingleDeviceSharding(jax.local_devices()[0])),
                          state.to_pure_dict())
    params = restore_params(stage / info.get("params", "final_params"), target)
    return Loaded(nnx.merge(graphdef, params), template or info["template"], info["image_aspect_ratio"], stage)
