"""On CPU the train step is compiled with XLA's own dot emitter (YNNPACK fusions off: slower at LLaMA
widths, see README Benchmarks); elsewhere with the defaults."""

import types

import jax
import jax.numpy as jnp

from llava_jax.models import get_preset
from llava_jax.parallel.mesh import make_mesh
from llava_jax.training.config_schema import stage_config
from llava_jax.training.stage_setup import build_stage, step_compiler_options
from llava_jax.training.state import ModelSpec


def test_options_by_platform():
    cpu = make_mesh((1, -1, 1))
    assert step_compiler_options(cpu) == {"xla_cpu_experimental_ynn_fusion_type": ""}
    tpu = types.SimpleNamespace(devices=types.SimpleNamespace(flat=[types.SimpleNamespace(platform="tpu")]))
    assert step_compiler_options(tpu) is None


def test_cpu_step_has_no_ynnpack_fusions():
    mesh = make_mesh((1, -1, 1))
    spec = ModelSpec.create(get_preset("tiny"))
    stage = stage_config(trainable="projector,llm", lr=1e-3, batch_size=8, epochs=1, template="v1")
    setup = build_stage(stage, spec, mesh, total_steps=10, frozen_dtype=jnp.float32)
    with jax.set_mesh(mesh):
        text = setup.jitted_step(0).lower(setup.abstract, setup.abstract_batch(96)).compile().as_text()
    assert "dot(" in text
    assert "ynn_fusion" not in text
