"""Train-step speed: llava_jax beside transformers (PyTorch) on the same architecture and batch.

    python -m llava_jax.bench train                                   # tiny preset, CPU
    python -m llava_jax.bench train --preset vicuna-7b --layers 4 --batch 8 --seq 2048 --dtype bfloat16 \
        --reference none                                              # 7B-shaped, reduced depth (GPU)
    python -m llava_jax.bench train --hidden 512 --layers 4 --heads 8 --image-size 224 --patch-size 14 \
        --seq 512 --batch 4 [--no-gather]                             # LLaVA-like small widths (CPU)
    python -m llava_jax.bench train ... --packing --seq 2048          # padded vs packed LLaVA length mix

Both sides run the stage-2 step: vision tower frozen, projector + LLM trained with AdamW, loss over
the answer tokens. The reference is transformers' LlavaForConditionalGeneration with torch.optim.AdamW
(the original LLaVA trains through the same modules). The two steps take turns (warm-up first), and
the speed ratio is the median over back-to-back pairs. Prints step time (median), tokens/s, MFU on accelerators
with a known peak, and the speed ratio; `--out FILE` writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from llava_jax.models import get_preset
from llava_jax.parallel.mesh import make_mesh
from llava_jax.training.config_schema import stage_config
from llava_jax.training.metrics import peak_flops, step_flops
from llava_jax.training.stage_setup import build_stage
from llava_jax.training.state import ModelSpec, init_params, new_state


def _batch(cfg, batch: int, seq: int, answer: int, seed: int = 0) -> dict[str, np.ndarray]:
    """One image per row at the start, then text; the last `answer` tokens are targets."""
    rng = np.random.default_rng(seed)
    p = cfg.num_image_tokens
    if seq <= p + answer + 2:
        raise SystemExit(f"--seq {seq} too short for {p} image tokens + {answer} answer tokens")
    ids = rng.integers(3, 32000, (batch, seq)).astype(np.int32)
    ids[:, 0] = 1
    ids[:, 1 : 1 + p] = cfg.image_token_id
    labels = np.full((batch, seq), -100, np.int32)
    labels[:, -answer:] = ids[:, -answer:]
    s = cfg.vision.image_size
    return dict(
        input_ids=ids,
        labels=labels,
        positions=np.tile(np.arange(seq, dtype=np.int32), (batch, 1)),
        segment_ids=np.ones((batch, seq), np.int32),
        images=rng.integers(0, 256, (batch, 1, s, s, 3), dtype=np.uint8),
    )


def model_config(args):
    """The preset with the command line's LLM and vision overrides (random weights)."""
    cfg = get_preset(args.preset, dtype=jnp.dtype(args.dtype).type, remat="none")
    llm = {
        k: v
        for k, v in (
            ("hidden_size", args.hidden),
            ("num_layers", args.layers),
            ("num_heads", args.heads),
            ("num_kv_heads", args.kv_heads or args.heads),
            ("intermediate_size", args.intermediate),
        )
        if v
    }
    if args.hidden and not args.intermediate:
        llm["intermediate_size"] = int(args.hidden * 8 / 3 / 64 + 1) * 64  # LLaMA's SwiGLU width
    vision = {k: v for k, v in (("image_size", args.image_size), ("patch_size", args.patch_size)) if v}
    return dataclasses.replace(
        cfg, llm=dataclasses.replace(cfg.llm, **llm), vision=dataclasses.replace(cfg.vision, **vision)
    )


# A synthetic length mix after LLaVA-Instruct-158K's composition (58K multi-turn conversations, 23K
# detailed descriptions, 77K complex-reasoning answers): text tokens per sample (v1 template, LLaMA
# tokenizer) drawn log-normally per kind as (share, median, log-sigma, min, max). An approximation of
# the set's spread (about 100 to 1000 text tokens, most 150-350), not a measurement of the file.
LLAVA_INSTRUCT_MIX = {
    "conversation": (58 / 158, 230, 0.45, 60, 1100),
    "detail": (23 / 158, 150, 0.25, 70, 350),
    "complex_reasoning": (77 / 158, 220, 0.3, 80, 600),
}


def mix_samples(cfg, num: int, max_length: int, seed: int = 0) -> tuple[list[dict], int]:
    """`num` samples (image + text of the mix's lengths, the last 40 % of the text as targets) that fit
    `max_length`; returns them and the number left out as too long (as the pipeline would skip them)."""
    rng = np.random.default_rng(seed)
    kinds = list(LLAVA_INSTRUCT_MIX.values())
    picks = rng.choice(len(kinds), size=num, p=[k[0] for k in kinds])
    samples, too_long = [], 0
    s = cfg.vision.image_size
    image = rng.integers(0, 256, (s, s, 3), dtype=np.uint8)
    for k in picks:
        _, median, sigma, lo, hi = kinds[k]
        text = int(np.clip(rng.lognormal(np.log(median), sigma), lo, hi))
        n = 1 + cfg.num_image_tokens + text
        if n > max_length:
            too_long += 1
            continue
        ids = rng.integers(3, 32000, n).astype(np.int32)
        ids[0] = 1
        ids[1 : 1 + cfg.num_image_tokens] = cfg.image_token_id
        labels = np.full(n, -100, np.int32)
        labels[n - int(0.4 * text) :] = ids[n - int(0.4 * text) :]
        samples.append({"input_ids": ids, "labels": labels, "image": image})
    return samples, too_long


def mix_batches(cfg, samples: list[dict], batch: int, seq: int, packing: bool) -> list[dict]:
    """The pipeline's row filling (`pipeline.BatchRows`: one sample per row, or first-fit packing)."""
    import grain

    from llava_jax.data.pipeline import BatchRows, BatchSpec

    images = max(1, seq // (cfg.num_image_tokens + 1)) if packing else 1
    spec = BatchSpec(batch, seq, packing, images, cfg.vision.image_size)
    rows = BatchRows(grain.MapDataset.source(samples).to_iter_dataset(), spec)
    return [{k: v for k, v in b.items() if k != "meta_skipped"} for b in rows]


def bench_packing(cfg, args) -> dict:
    """Padded vs packed rows of the LLaVA-Instruct length mix: padding fraction, steps per pass over
    the samples, and real (non-padding) tokens per second of the llava_jax step."""
    from llava_jax.training.loss import max_targets_per_row

    samples, too_long = mix_samples(cfg, args.mix_samples, args.seq)
    real = sum(len(x["input_ids"]) for x in samples)
    out = {"samples": len(samples), "left_out_too_long": too_long, "mean_sample_tokens": real / max(1, len(samples))}
    for name, packing in (("padded", False), ("packed", True)):
        batches = mix_batches(cfg, samples, args.batch, args.seq, packing)
        cap = max(max_targets_per_row(b["labels"]) for b in batches) if args.gather else 0
        cap = -(-cap // 32) * 32
        r = bench_jax(cfg, batches[0], args, targets_per_row=cap)
        positions = len(batches) * args.batch * args.seq
        out[name] = {
            "steps": len(batches),
            "padding_fraction": 1 - real / positions,
            "step_time_s": r["step_time_s"],
            "effective_tokens_per_s": real / len(batches) / r["step_time_s"],
            "pass_time_s": len(batches) * r["step_time_s"],
            "targets_per_row": cap,
        }
    out["packed_speedup"] = out["padded"]["pass_time_s"] / out["packed"]["pass_time_s"]
    return out


def _timeit(fn, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t) / steps


def _interleaved(fns: dict, steps: int, warmup: int) -> dict[str, list[float]]:
    """Seconds of each call of every function, the functions taking turns step by step, so that load
    from other work on the machine falls on all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(steps):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return times


def bench_jax(cfg, batch, args, targets_per_row: int | None = None) -> dict:
    """Step time etc. of `jax_step` (alone)."""
    one, figures = jax_step(cfg, batch, args, targets_per_row)
    return figures(_timeit(one, args.steps, args.warmup))


def jax_step(cfg, batch, args, targets_per_row: int | None = None):
    """The stage-2 step on `batch`, as (one step, figures(step seconds) -> dict); logits at
    `targets_per_row` targets per row (default: --answer with --gather, else all positions)."""
    mesh = make_mesh((1, -1, 1))
    spec = ModelSpec.create(cfg)
    stage = stage_config(
        trainable="projector,llm", lr=2e-5, batch_size=len(batch["input_ids"]), epochs=1, template="v1"
    )
    stage.targets_per_row = (args.answer if args.gather else 0) if targets_per_row is None else targets_per_row
    frozen = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    setup = build_stage(stage, spec, mesh, total_steps=1000, frozen_dtype=frozen)
    state = new_state(
        init_params(spec, 0, setup.mask, frozen, setup.param_shardings), setup.tx, setup.state_shardings, 0
    )
    step = setup.jitted_step(stage.targets_per_row)
    batch_sh = setup.batch_sharding
    gbatch = {k: jax.device_put(v, batch_sh) for k, v in batch.items()}
    box = {"state": state}

    def one():
        with jax.set_mesh(mesh):
            box["state"], m = step(box["state"], gbatch)
            jax.block_until_ready(m["loss"])

    flops = step_flops(
        cfg,
        tokens=batch["input_ids"].size,
        images=len(batch["images"]),
        llm_trainable=True,
        seq_len=batch["input_ids"].shape[1],
    )
    peak = peak_flops()
    return one, lambda dt: {
        "step_time_s": dt,
        "tokens_per_s": batch["input_ids"].size / dt,
        "model_tflops_per_step": flops / 1e12,
        "mfu": flops / dt / (peak * mesh.size) if peak else None,
        "device": jax.devices()[0].device_kind,
        "devices": mesh.size,
    }


def torch_step(cfg, batch, args):
    """transformers' stage-2 step on `batch`, as (one step, figures(step seconds) -> dict)."""
    import torch
    import transformers as tf

    torch.manual_seed(0)
    v, t = cfg.vision, cfg.llm
    hf_cfg = tf.LlavaConfig(
        vision_config=tf.CLIPVisionConfig(
            hidden_size=v.hidden_size,
            intermediate_size=v.intermediate_size,
            num_hidden_layers=v.num_layers,
            num_attention_heads=v.num_heads,
            image_size=v.image_size,
            patch_size=v.patch_size,
            hidden_act="quick_gelu",
        ),
        text_config=tf.LlamaConfig(
            vocab_size=t.vocab_size,
            hidden_size=t.hidden_size,
            intermediate_size=t.intermediate_size,
            num_hidden_layers=t.num_layers,
            num_attention_heads=t.num_heads,
            num_key_value_heads=t.num_kv_heads,
            rms_norm_eps=t.rms_norm_eps,
            tie_word_embeddings=t.tie_word_embeddings,
        ),
        image_token_index=cfg.image_token_id,
        projector_hidden_act="gelu",
        vision_feature_layer=v.select_layer,
        image_seq_length=cfg.num_image_tokens,
    )
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    model = tf.LlavaForConditionalGeneration(hf_cfg).to(dtype).train()
    for p in model.model.vision_tower.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-5, weight_decay=0.0)
    mean = torch.tensor(v.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(v.image_std).view(1, 3, 1, 1)
    pixels = ((torch.from_numpy(batch["images"][:, 0]).permute(0, 3, 1, 2).float() / 255 - mean) / std).to(dtype)
    ids = torch.from_numpy(batch["input_ids"]).long()
    labels = torch.from_numpy(batch["labels"]).long()

    def one():
        opt.zero_grad(set_to_none=True)
        out = model(input_ids=ids, pixel_values=pixels, labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()

    return one, lambda dt: {
        "step_time_s": dt,
        "tokens_per_s": batch["input_ids"].size / dt,
        "torch_threads": torch.get_num_threads(),
    }


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m llava_jax.bench train", description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--hidden", type=int, default=0, help="override the LLM width (0 = preset's)")
    ap.add_argument("--layers", type=int, default=0, help="override the LLM depth (0 = preset's)")
    ap.add_argument("--heads", type=int, default=0, help="override the LLM attention heads")
    ap.add_argument("--kv-heads", type=int, default=0, help="override the LLM KV heads (default: --heads)")
    ap.add_argument("--intermediate", type=int, default=0, help="override the LLM MLP width")
    ap.add_argument("--image-size", type=int, default=0, help="override the vision input size in pixels")
    ap.add_argument("--patch-size", type=int, default=0, help="override the vision patch size")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--answer", type=int, default=32, help="target tokens at the end of each row")
    ap.add_argument(
        "--gather",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="logits only at target positions (targets_per_row); --no-gather for all positions",
    )
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reference", default="transformers", choices=["transformers", "none"])
    ap.add_argument(
        "--packing",
        action="store_true",
        help="instead: padded vs packed rows of a LLaVA-Instruct-158K length mix (padding, real tokens/s)",
    )
    ap.add_argument("--mix-samples", type=int, default=256, help="samples of the length mix with --packing")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)

    cfg = model_config(args)
    if args.packing:
        result = {"preset": args.preset, "batch": args.batch, "seq": args.seq, "packing": bench_packing(cfg, args)}
        print(json.dumps(result, indent=2))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=2)
        return 0
    batch = _batch(cfg, args.batch, args.seq, args.answer)
    result = {
        "preset": args.preset,
        "llm_layers": cfg.llm.num_layers,
        "batch": args.batch,
        "seq": args.seq,
        "dtype": args.dtype,
        "gather": args.gather,
    }
    steps = {"llava_jax": jax_step(cfg, batch, args)}
    if args.reference == "transformers":
        steps["transformers"] = torch_step(cfg, batch, args)
    times = _interleaved({k: one for k, (one, _) in steps.items()}, args.steps, args.warmup)
    for name, (_, figures) in steps.items():
        result[name] = figures(float(np.median(times[name])))
    if args.reference == "transformers":
        # per step pair (the two ran back to back), then the median: robust to load that comes and goes
        pairs = [t / j for t, j in zip(times["transformers"], times["llava_jax"], strict=True)]
        result["speedup"] = float(np.median(pairs))
        result["speedup_per_step"] = [round(x, 3) for x in pairs]
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0
