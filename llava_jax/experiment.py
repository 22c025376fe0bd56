"""The experiment behind `python -m llava_jax.train`: prepare data (the demo's synthetic set), run the
stages (`training.loop`), evaluate on held-out questions (`eval.heldout`), and write a summary
(`<workdir>/summary.json`)."""

from __future__ import annotations

import json
import logging
import time

import jax
from flax import nnx

from llava_jax.checkpoint.params import restore_params
from llava_jax.data.synthetic import generate
from llava_jax.data.tokenizer import load_tokenizer
from llava_jax.eval.heldout import qa_accuracy
from llava_jax.models import Llava
from llava_jax.paths import Path, absolute, as_path
from llava_jax.training import loop
from llava_jax.training.state import ModelSpec

log = logging.getLogger("llava_jax.train")


def _resolve_paths(config, workdir: Path) -> None:
    """Paths may start with {workdir}; fill it in (the demo keeps its data under the run)."""

    def fill(d):
        for k, v in d.items():
            if isinstance(v, str) and "{workdir}" in v:
                d[k] = v.replace("{workdir}", str(workdir))
            elif hasattr(v, "items"):
                fill(v)

    with config.unlocked():
        fill(config)


def prepare_synthetic(config) -> None:
    s = config.synthetic
    if not s.enabled:
        return
    out = as_path(s.out)
    # Only process 0 looks and writes; every process then meets at the barrier. (Each process looking
    # for itself races: a fast process 0 can finish writing before another one looks and skips it.)
    if jax.process_index() == 0 and (out / "meta.json").exists():
        log.info("synthetic data already at %s", out)
    elif jax.process_index() == 0:
        t = time.time()
        generate(
            str(out),
            image_size=s.image_size,
            num_pretrain=s.num_pretrain,
            num_instruct=s.num_instruct,
            num_eval=s.num_eval,
            seed=s.seed,
            questions=tuple(s.questions),
        )
        log.info("synthetic data written to %s in %.1fs", out, time.time() - t)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("synthetic data")


def evaluate(config, params, stage: str | None = None) -> dict:
    """Held-out accuracy of `params`, trained by `stage` (default: the last configured one), whose
    template, tokenizer and image aspect mode (`square` / `pad`) the questions are prepared with."""
    stage = stage or [s.strip() for s in config.stages.split(",") if s.strip()][-1]
    data = config[stage].data
    spec_cfg = loop.model_config(config)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Llava(spec_cfg, rngs=nnx.Rngs(0))))
    if jax.process_count() > 1:  # every process evaluates on a full host copy (fine at eval sizes)
        from jax.experimental import multihost_utils

        params = multihost_utils.process_allgather(params, tiled=True)
    model = nnx.merge(graphdef, jax.device_get(params))
    e = config.eval
    tok = load_tokenizer(data.tokenizer_path or None)
    return qa_accuracy(
        model,
        e.json_path,
        tokenizer=tok,
        template=data.template,
        max_examples=e.max_examples,
        batch_size=e.batch_size,
        max_new_tokens=e.max_new_tokens,
        aspect_ratio=data.image_aspect_ratio,
    )


def main(config, workdir) -> int:
    workdir = absolute(workdir)
    _resolve_paths(config, workdir)
    t0 = time.time()
    prepare_synthetic(config)
    results = loop.run(config, workdir)
    summary = {
        name: {"steps": r.steps, "final_loss": r.final_loss, "seconds": round(r.seconds, 1)}
        for name, r in results.items()
    }
    if config.eval.json_path:
        last = results[list(results)[-1]]
        params = last.params
        if params is None:  # the stage had finished earlier: read its final parameters
            spec = ModelSpec.create(loop.model_config(config))
            params = restore_params(workdir / last.name / "final_params", spec.abstract)
        summary["eval"] = evaluate(config, params, last.name)
        ev = summary["eval"]
        log.info(
            "held-out accuracy %.3f on %d questions (chance %s); per category %s",
            ev["accuracy"],
            ev["n"],
            f"{ev['chance']:.3f}" if ev["chance"] else "n/a",
            ev["per_category"],
        )
    summary["total_seconds"] = round(time.time() - t0, 1)
    if jax.process_index() == 0:
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
        print(json.dumps(summary, indent=2))
    return 0
