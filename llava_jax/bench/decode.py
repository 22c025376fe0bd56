"""Decode speed: llava_jax `generate` beside transformers `generate` on the same weights, plus the
memory-bandwidth bound of decoding a 7B-shaped LLaVA.

    python -m llava_jax.bench decode                                    # tiny preset, batch 1 and 8, CPU
    python -m llava_jax.bench decode --hidden 512 --layers 8 --heads 8  # a wider random LLM
    python -m llava_jax.bench decode --preset llava-v1.5-7b --dtype bfloat16 --reference none  # on a GPU

Each row is a LLaVA prompt: BOS, the image's tokens (one random image per row), `--prompt-tokens`
text tokens; then `--new-tokens` tokens are generated greedily with no EOS, so every row runs to the
end. The model is a random LLaVA of the chosen shape; transformers gets the very same weights through
the conversion tables (`llava_jax.checkpoint.mapping`, the llava-hf layout), and the first tokens of
both are compared as a check.

Figures, per batch size (medians over `--repeats` runs after a warm-up run that also compiles; the
two implementations take turns, so both see the same load on a shared machine):
  ttft_s      time to first token: prefill (vision tower, projector, prompt) and the first sample;
  decode_tok_s  generated tokens per second after the first, summed over the batch;
and the ratio llava_jax / transformers of each.

The bound, measured in the same run: `streaming_bound` times a float32 sum (numpy and jax) and a
numpy matrix-vector product over as many bytes as one decode step's weights; the best rate divided
by those bytes bounds tokens/s (times the batch), and each row prints llava_jax's share of it.

The accelerator bound: one decode step reads every LLM weight once (the embedding table only at the rows it
looks up) plus each row's KV cache, so tokens/s <= batch * HBM bandwidth / bytes read per step. It is
printed for the 7B-shaped `llava-v1.5-7b` preset at bf16 on common accelerators, and the bytes per
step of the benchmarked model give the bandwidth this run achieved, to set a GPU run against its
bound.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llava_jax.models import Llava
from llava_jax.models.presets import get_preset
from llava_jax.parallel.tree_paths import path_str

# Memory bandwidth (bytes/s) of common accelerators, for the bound table.
HBM_BANDWIDTH = {
    "A100 80GB SXM": 2.04e12,
    "H100 SXM": 3.35e12,
    "H200": 4.8e12,
    "TPU v4": 1.2e12,
    "TPU v5e": 0.82e12,
    "TPU v5p": 2.76e12,
}


# ------------------------------------------------------------------------------------------------
# the model and the inputs


def model_config(args):
    cfg = get_preset(
        args.preset, dtype=jnp.dtype(args.dtype).type, param_dtype=jnp.dtype(args.dtype).type, remat="none"
    )
    llm = cfg.llm
    changes = {
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
        changes["intermediate_size"] = int(args.hidden * 8 / 3 / 64 + 1) * 64  # LLaMA's SwiGLU width
    if changes:
        llm = dataclasses.replace(llm, **changes)
    vision = cfg.vision
    if args.image_size or args.patch_size:
        vision = dataclasses.replace(
            vision, image_size=args.image_size or vision.image_size, patch_size=args.patch_size or vision.patch_size
        )
    return dataclasses.replace(cfg, llm=llm, vision=vision)


def random_model(cfg) -> Llava:
    """A random LLaVA, initialised on the device in one compiled call."""
    return nnx.jit(lambda: Llava(cfg, rngs=nnx.Rngs(0)))()


def inputs(cfg, batch: int, prompt_tokens: int, seed: int = 0):
    """Prompt ids [B, L] (BOS, image tokens, text) and uint8 images [B, 1, S, S, 3]."""
    rng = np.random.default_rng(seed)
    p = cfg.num_image_tokens
    ids = rng.integers(3, 32000, (batch, 1 + p + prompt_tokens)).astype(np.int32)
    ids[:, 0] = 1
    ids[:, 1 : 1 + p] = cfg.image_token_id
    s = cfg.vision.image_size
    return ids, rng.integers(0, 256, (batch, 1, s, s, 3), dtype=np.uint8)


# ------------------------------------------------------------------------------------------------
# llava_jax


def run_ours(model, ids, images, new_tokens: int, chunk_size: int) -> tuple[float, float, list[list[int]]]:
    """(ttft seconds, total seconds, tokens)."""
    from llava_jax.inference import stream_generate

    t0 = time.perf_counter()
    first = None
    gen = stream_generate(model, ids, images, max_new_tokens=new_tokens, eos_ids=(), chunk_size=chunk_size)
    try:
        while True:
            next(gen)
            if first is None:
                first = time.perf_counter()
    except StopIteration as end:
        tokens = end.value
    return first - t0, time.perf_counter() - t0, tokens


# ------------------------------------------------------------------------------------------------
# transformers on the same weights


def to_transformers(model: Llava):
    """A transformers `LlavaForConditionalGeneration` holding `model`'s weights (fp32, eval mode)."""
    import torch
    import transformers as tf

    from llava_jax.checkpoint.hf_load import rules_for
    from llava_jax.checkpoint.mapping import to_theirs

    cfg = model.cfg
    if cfg.projector != "mlp2x_gelu":
        raise SystemExit("the transformers reference is built for the mlp2x_gelu projector; pick such a preset")
    hf = tf.LlavaForConditionalGeneration(_hf_config(cfg)).eval()
    theirs = hf.state_dict()
    flat = {path_str(p): np.array(x.value, np.float32) for p, x in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    weights = {}
    for rule in rules_for(model, "llava_hf_v5", theirs.keys()):
        a = flat[rule.ours]
        if rule.stacked:
            for i in range(a.shape[0]):
                weights[rule.theirs.format(i=i)] = torch.from_numpy(np.array(to_theirs(rule.kind, a[i])))
        else:
            weights[rule.theirs] = torch.from_numpy(np.array(to_theirs(rule.kind, a)))
    missing, unexpected = hf.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.endswith(("position_ids", "inv_freq"))]
    if missing or unexpected:
        raise RuntimeError(f"weight transfer incomplete: missing {missing[:5]}, unexpected {unexpected[:5]}")
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return hf


def _hf_config(cfg):
    """The transformers `LlavaConfig` of a llava-hf model shaped like `cfg` (a `LlavaConfig` of ours)."""
    import transformers as tf

    v, t = cfg.vision, cfg.llm
    return tf.LlavaConfig(
        vision_config=tf.CLIPVisionConfig(
            hidden_size=v.hidden_size,
            intermediate_size=v.intermediate_size,
            num_hidden_layers=v.num_layers,
            num_attention_heads=v.num_heads,
            image_size=v.image_size,
            patch_size=v.patch_size,
            hidden_act="quick_gelu",
            layer_norm_eps=v.layer_norm_eps,
        ),
        text_config=tf.LlamaConfig(
            vocab_size=t.vocab_size,
            hidden_size=t.hidden_size,
            intermediate_size=t.intermediate_size,
            num_hidden_layers=t.num_layers,
            num_attention_heads=t.num_heads,
            num_key_value_heads=t.num_kv_heads,
            head_dim=t.head_dim,
            rms_norm_eps=t.rms_norm_eps,
            rope_theta=t.rope_theta,
            max_position_embeddings=t.max_position_embeddings,
            tie_word_embeddings=t.tie_word_embeddings,
        ),
        image_token_index=cfg.image_token_id,
        projector_hidden_act="gelu",
        vision_feature_layer=v.select_layer,
        vision_feature_select_strategy="default",
        image_seq_length=cfg.num_image_tokens,
    )


def run_transformers(hf, ids, images, new_tokens: int, image_mean, image_std):
    """(ttft seconds, total seconds, tokens) for transformers greedy `generate`."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        def __init__(self):
            self.puts = []

        def put(self, value):
            self.puts.append(time.perf_counter())

        def end(self):
            pass

    mean = torch.tensor(image_mean).view(1, 3, 1, 1)
    std = torch.tensor(image_std).view(1, 3, 1, 1)
    pixels = (torch.from_numpy(images[:, 0]).permute(0, 3, 1, 2).float() / 255 - mean) / std
    input_ids = torch.from_numpy(ids).long()
    clock = Clock()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(
            input_ids=input_ids,
            pixel_values=pixels,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            streamer=clock,
        )
    end = time.perf_counter()
    # the streamer sees the prompt first, then each new token
    return clock.puts[1] - t0, end - t0, out[:, ids.shape[1] :].tolist()


# ------------------------------------------------------------------------------------------------
# the bandwidth bound


def decode_bytes(cfg, batch: int, context: int, bytes_per_value: int) -> tuple[float, float]:
    """(weight bytes, KV-cache bytes) read by one decode step of the LLM at `context` cached tokens."""
    t = cfg.llm
    kv = t.num_kv_heads * t.head_dim
    per_layer = (
        t.hidden_size * (t.num_heads * t.head_dim) * 2
        + t.hidden_size * kv * 2
        + 3 * t.hidden_size * t.intermediate_size
        + 2 * t.hidden_size
    )
    weights = t.num_layers * per_layer + t.hidden_size + t.vocab_size * t.hidden_size  # + final norm, lm_head
    weights += batch * t.hidden_size  # embedding rows looked up
    cache = batch * context * t.num_layers * 2 * kv
    return float(weights * bytes_per_value), float(cache * bytes_per_value)


def bound_table(context: int, batches=(1, 8, 32)) -> list[dict]:
    cfg = get_preset("llava-v1.5-7b")
    rows = []
    for b in batches:
        w, kv = decode_bytes(cfg, b, context, 2)
        for name, bw in HBM_BANDWIDTH.items():
            rows.append(
                {
                    "device": name,
                    "batch": b,
                    "gb_per_step": (w + kv) / 1e9,
                    "step_ms": (w + kv) / bw * 1e3,
                    "max_tok_s": b * bw / (w + kv),
                }
            )
    return rows


def streaming_bound(nbytes: float, repeats: int = 5) -> dict:
    """This machine's weight-streaming rate, measured now: the fastest of a float32 sum (numpy, jax) and a
    numpy matrix-vector product over an array of `nbytes` (the weights one decode step reads), each the
    median of `repeats`. Returns GB/s per method and `gb_s`, the best."""
    n = max(1, int(nbytes) // 4)
    cols = 512
    a = np.random.default_rng(0).random(-(-n // cols) * cols, dtype=np.float32)
    m, x = a.reshape(-1, cols), np.ones(cols, np.float32)
    d = jnp.asarray(a)
    jsum = jax.jit(jnp.sum)
    methods = {
        "numpy_sum": lambda: a.sum(),
        "jax_sum": lambda: jsum(d).block_until_ready(),
        "numpy_matvec": lambda: m @ x,
    }
    out = {}
    for name, f in methods.items():
        f()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            f()
            times.append(time.perf_counter() - t0)
        out[name] = a.nbytes / statistics.median(times) / 1e9
    out["gb_s"] = max(out.values())
    return out


# ------------------------------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    args = _parse_args(argv)
    cfg = model_config(args)
    reference = args.reference == "transformers"
    if reference and args.dtype != "float32":
        raise SystemExit("the transformers reference runs in float32; use --dtype float32 or --reference none")
    model = random_model(cfg)
    result = _header(cfg, args)
    hf = None
    if reference:
        import torch

        hf = to_transformers(model)
        result["torch_default_threads"] = torch.get_num_threads()

    for batch in args.batch:
        row = _measure(model, hf, cfg, args, batch, result.get("torch_default_threads"))
        result["runs"].append(row)
        _print_row(row)

    result["bound_7b"] = {
        "preset": "llava-v1.5-7b",
        "dtype": "bfloat16",
        "context": args.bound_context,
        "table": bound_table(args.bound_context),
    }
    _print_bound(result["bound_7b"])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    print(json.dumps({k: v for k, v in result.items() if k not in ("runs", "bound_7b")}))
    return 0


def _parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m llava_jax.bench decode", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny", help="model shape (random weights); default tiny")
    ap.add_argument("--hidden", type=int, default=0, help="override the LLM width")
    ap.add_argument("--layers", type=int, default=0, help="override the LLM depth")
    ap.add_argument("--heads", type=int, default=0, help="override the LLM attention heads")
    ap.add_argument("--kv-heads", type=int, default=0, help="override the LLM KV heads (default: --heads)")
    ap.add_argument("--intermediate", type=int, default=0, help="override the LLM MLP width")
    ap.add_argument("--image-size", type=int, default=0, help="override the vision tower's image size (pixels)")
    ap.add_argument("--patch-size", type=int, default=0, help="override the vision tower's patch size (pixels)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt-tokens", type=int, default=32, help="text tokens after the image")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--chunk-size", type=int, default=16, help="llava_jax decode steps per device call")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--reference", default="transformers", choices=["transformers", "none"])
    ap.add_argument(
        "--torch-threads",
        type=int,
        default=0,
        help="torch intra-op threads (default: the faster of torch's default and 1, measured)",
    )
    ap.add_argument("--bound-context", type=int, default=1024, help="cached tokens assumed in the 7B bound")
    ap.add_argument("--out", default="")
    return ap.parse_args(argv)


def _header(cfg, args) -> dict:
    """The run's settings: device, model shape, prompt and reply lengths; `runs` is filled per batch size."""
    device = jax.devices()[0]
    llm_fields = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "vocab_size")
    return {
        "device": f"{device.platform}: {device.device_kind}",
        "cpu": platform.processor() or platform.machine(),
        "preset": args.preset,
        "llm": {k: getattr(cfg.llm, k) for k in llm_fields},
        "image_tokens": cfg.num_image_tokens,
        "prompt_tokens": 1 + cfg.num_image_tokens + args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "dtype": args.dtype,
        "runs": [],
    }


def _measure(model, hf, cfg, args, batch: int, torch_default_threads: int | None) -> dict:
    """One batch size: llava_jax (and transformers when `hf`) timed in turns, and their figures."""
    ids, images = inputs(cfg, batch, args.prompt_tokens, seed=batch)
    row = {"batch": batch}
    ours, theirs = [], []
    if hf is not None:
        row["torch_threads"] = _pick_torch_threads(hf, ids, images, args, cfg, torch_default_threads)
    for _ in range(args.repeats + 1):  # interleaved, so both see the same machine load; run 0 warms up
        ours.append(run_ours(model, ids, images, args.new_tokens, args.chunk_size))
        if hf is not None:
            theirs.append(
                run_transformers(hf, ids, images, args.new_tokens, cfg.vision.image_mean, cfg.vision.image_std)
            )
    weights, cache = decode_bytes(cfg, batch, ids.shape[1] + args.new_tokens // 2, jnp.dtype(args.dtype).itemsize)
    bound = streaming_bound(weights)  # measured right after the runs, under the same load
    row["llava_jax"] = _figures(ours[1:], batch, args.new_tokens)
    row["llava_jax"]["achieved_gb_s"] = (weights + cache) * row["llava_jax"]["decode_tok_s"] / batch / 1e9
    # the weight-streaming bound: every step reads all weights once, so tokens/s <= batch x rate / weight bytes
    row["bound"] = {**bound, "weight_mb": weights / 1e6, "max_tok_s": batch * bound["gb_s"] * 1e9 / weights}
    row["llava_jax"]["of_bound"] = row["llava_jax"]["decode_tok_s"] / row["bound"]["max_tok_s"]
    if hf is not None:
        row["transformers"] = _figures(theirs[1:], batch, args.new_tokens)
        row["tokens_agree_before_first_difference"] = _agreement(ours[0][2], theirs[0][2])
        row["decode_speedup"] = row["llava_jax"]["decode_tok_s"] / row["transformers"]["decode_tok_s"]
        row["ttft_speedup"] = row["transformers"]["ttft_s"] / row["llava_jax"]["ttft_s"]
    return row


def _agreement(ours: list[list[int]], theirs: list[list[int]]) -> int:
    """Over the rows, the fewest leading tokens on which both implementations agree."""
    agree = [
        next((i for i, (a, b) in enumerate(zip(x, y, strict=False)) if a != b), len(x))
        for x, y in zip(ours, theirs, strict=True)
    ]
    return min(agree)


def _pick_torch_threads(hf, ids, images, args, cfg, default: int) -> int:
    """torch's intra-op thread count for the reference: `--torch-threads`, or else whichever of torch's
    default and 1 runs faster here (on a small, busy machine one thread often beats several)."""
    import torch

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
        return args.torch_threads
    timings = {}
    for n in dict.fromkeys((default, 1)):
        torch.set_num_threads(n)
        run_transformers(hf, ids, images, args.new_tokens, cfg.vision.image_mean, cfg.vision.image_std)
        timings[n] = min(
            run_transformers(hf, ids, images, args.new_tokens, cfg.vision.image_mean, cfg.vision.image_std)[1]
            for _ in range(2)
        )
    best = min(timings, key=timings.get)
    torch.set_num_threads(best)
    return best


def _figures(runs, batch: int, new_tokens: int) -> dict:
    return {
        "ttft_s": statistics.median(r[0] for r in runs),
        "decode_tok_s": statistics.median(batch * (new_tokens - 1) / (r[1] - r[0]) for r in runs),
    }


def _print_row(row: dict) -> None:
    ours = row["llava_jax"]
    line = (
        f"batch {row['batch']:3d}  llava_jax: ttft {ours['ttft_s'] * 1e3:8.1f} ms, decode {ours['decode_tok_s']:9.1f}"
        f" tok/s ({ours['achieved_gb_s']:.1f} GB/s of weights + KV; {100 * ours['of_bound']:.0f}% of the bound"
        f" {row['bound']['max_tok_s']:.1f} tok/s = {row['bound']['gb_s']:.1f} GB/s / {row['bound']['weight_mb']:.0f} MB)"
    )
    if "transformers" in row:
        ref = row["transformers"]
        line += (
            f"  |  transformers: ttft {ref['ttft_s'] * 1e3:8.1f} ms, decode {ref['decode_tok_s']:9.1f} tok/s"
            f" ({row['torch_threads']} torch threads)"
            f"  |  decode x{row['decode_speedup']:.2f}, ttft x{row['ttft_speedup']:.2f}"
            f"  (greedy tokens agree for the first {row['tokens_agree_before_first_difference']})"
        )
    print(line, flush=True)


def _print_bound(bound: dict) -> None:
    print(
        f"\ndecode bound, {bound['preset']} LLM in bf16, {bound['context']} cached tokens per row: "
        "tokens/s <= batch x bandwidth / (weights + KV cache read per step)"
    )
    for r in bound["table"]:
        print(
            f"  {r['device']:14s} batch {r['batch']:3d}: {r['gb_per_step']:6.2f} GB/step, >= {r['step_ms']:6.2f} ms/step,"
            f" <= {r['max_tok_s']:8.1f} tok/s"
        )
