"""Serving throughput: `python -m llava_jax.serve`'s continuous-batching scheduler beside the one-batch-
at-a-time scheduler, on the same random model, the same requests and the same machine, in one run.

    python -m llava_jax.bench serve                                   # tiny preset
    python -m llava_jax.bench serve --hidden 512 --layers 4 --heads 8 --image-size 224 --patch-size 14

An in-process server (uvicorn on a loopback port) per scheduler serves a random LLaVA of the chosen
shape (model flags as in `bench decode`), with `ServerConfig.warmup` and limits of
`--max-prompt-tokens` and MAX new tokens: the continuous scheduler compiles every shape such requests
can need before serving (its start-up time is printed), the batch scheduler batches of a typical
image question. `--clients` threads, each with the official `openai` client, send `--requests` chat
completions between them (a closed loop: each client sends its next request when the previous one
is answered; use many more requests than clients, so that requests keep joining running batches),
streamed, greedy. The requests are a fixed random mix: half with an image, text of `--words` words
(uniform), `max_tokens` in `--max-tokens` drawn by `--lengths` (uniform, or log-uniform: as many
one-word answers as long descriptions, closer to real chat and VQA traffic); a random model rarely
says EOS, so most replies run to their budget.

Each scheduler serves the whole load `--warmup` times (default 1; the batch scheduler compiles the
batch shapes it meets), then `--repeats` times measured, the two schedulers taking turns. Figures per
scheduler (medians over the repeats): requests/s, completion tokens/s, latency p50/p99 (request sent
-> last chunk), time to first token p50/p99 (request sent -> first streamed content), failed
requests, compilations during the measured passes; the ratios continuous / batch; and the ideal
ratios for the same request list (`ideal`: both schedulers simulated in decode steps, prefill free),
which bound what continuous batching can gain on that length mix.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures as futures
import contextlib
import json
import socket
import statistics
import threading
import time

import numpy as np

from llava_jax.bench import decode as decode_bench

SCHEDULERS = ("batch", "continuous")


def _chat_model(args):
    from llava_jax.data.templates import get_template
    from llava_jax.data.tokenizer import load_tokenizer
    from llava_jax.inference.chat_model import ChatModel

    cfg = decode_bench.model_config(args)
    model = decode_bench.random_model(cfg)
    return ChatModel(model=model, tokenizer=load_tokenizer(None), template=get_template("v1"), name="bench")


def _requests(args, seed: int = 0) -> list[dict]:
    """The load: `chat.completions.create` keyword arguments."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    words = [
        "red",
        "blue",
        "round",
        "square",
        "small",
        "large",
        "left",
        "right",
        "one",
        "two",
        "cat",
        "dog",
        "tree",
        "house",
        "car",
        "sky",
    ]
    budgets = output_budgets(args.lengths, args.max_tokens, args.requests, seed)
    out = []
    for i in range(args.requests):
        text = " ".join(rng.choice(words, int(rng.integers(args.words[0], args.words[1] + 1))))
        content: list[dict] = [{"type": "text", "text": f"Question {i}: {text}?"}]
        if i % 2 == 0:
            pixels = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
            import base64
            import io

            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, format="PNG")
            uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
            content.insert(0, {"type": "image_url", "image_url": {"url": uri}})
        out.append(
            dict(
                model="bench",
                messages=[{"role": "user", "content": content}],
                max_tokens=budgets[i],
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
    return out


def output_budgets(lengths: str, bounds, n: int, seed: int = 0) -> list[int]:
    """n `max_tokens` values in [MIN, MAX]: 'uniform', or 'loguniform' (log of the budget uniform: as
    many replies of 4-16 tokens as of 64-256, closer to chat and VQA traffic, where one-word answers
    and long descriptions mix)."""
    low, high = bounds
    rng = np.random.default_rng([seed, 1])
    if lengths == "uniform":
        return [int(x) for x in rng.integers(low, high + 1, n)]
    x = np.exp(rng.uniform(np.log(low), np.log(high + 1), n))
    return [int(v) for v in np.clip(np.floor(x), low, high)]


def ideal(budgets: list[int], clients: int, slots: int, chunk: int = 1) -> dict:
    """Both schedulers simulated in decode steps (prefill free, every row runs to its budget, one token
    per step after the first, which prefill gives), `slots` rows at a time, a closed loop of `clients`
    sending `budgets` in order. 'batch': the oldest `slots` waiting requests run until the longest one
    ends. 'continuous': finished rows leave and waiting requests join every `chunk` steps (a chunk
    runs until its longest row ends or `chunk` steps). Returns each one's steps for the whole load and
    median latency (steps), and the ratios continuous / batch (requests/s and p50 latency)."""
    out = {}
    for name in ("batch", "continuous"):
        pending = list(range(len(budgets)))
        arrival = {i: 0 for i in pending[:clients]}
        waiting, pending = pending[:clients], pending[clients:]
        running: dict[int, int] = {}  # request -> steps left
        latency, t = [], 0
        while waiting or running:
            free = slots - len(running)
            for i in waiting[:free]:
                running[i] = budgets[i] - 1
            waiting = waiting[free:]
            longest = max(running.values())
            steps = longest if name == "batch" else min(chunk, longest)
            t += steps
            finished = []
            for i in list(running):
                running[i] -= steps
                if running[i] <= 0 or name == "batch":
                    finished.append(i)
                    del running[i]
            for i in finished:
                latency.append(t - arrival[i])
                if pending:
                    nxt = pending.pop(0)
                    arrival[nxt] = t
                    waiting.append(nxt)
        out[name] = {"steps": t, "latency_p50": float(np.percentile(latency, 50))}
    b, c = out["batch"], out["continuous"]
    out["requests_s"] = b["steps"] / c["steps"] if c["steps"] else float("nan")
    out["latency_p50"] = c["latency_p50"] / b["latency_p50"] if b["latency_p50"] else float("nan")
    return out


class _Compilations:
    """Counts XLA compilations in this process (jax's backend-compile events)."""

    def __init__(self):
        import jax

        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self._event)

    def _event(self, event: str, _duration: float, **_) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            self.count += 1


@contextlib.contextmanager
def _server(app):
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the benchmark server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)


def _one(client, request: dict) -> dict:
    """Send one streamed request; (latency s, ttft s, completion tokens) or the error."""
    t0 = time.perf_counter()
    first, tokens = None, 0
    try:
        for chunk in client.chat.completions.create(**request):
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter()
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
    except Exception as e:  # counted and reported, never hidden
        return {"error": f"{type(e).__name__}: {e}"}
    end = time.perf_counter()
    return {"latency": end - t0, "ttft": (first or end) - t0, "tokens": tokens}


def _load(url: str, requests: list[dict], clients: int, compilations: _Compilations | None = None) -> dict:
    """All `requests` through `clients` concurrent openai clients; the figures of this pass."""
    import openai

    pending = list(reversed(requests))
    lock = threading.Lock()
    results: list[dict] = []

    def client_loop():
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=3600)
        while True:
            with lock:
                if not pending:
                    return
                request = pending.pop()
            out = _one(client, request)
            with lock:
                results.append(out)

    compiled = compilations.count if compilations else 0
    t0 = time.perf_counter()
    with futures.ThreadPoolExecutor(clients) as pool:
        for f in [pool.submit(client_loop) for _ in range(clients)]:
            f.result()
    wall = time.perf_counter() - t0
    compiled = (compilations.count if compilations else 0) - compiled
    ok = [r for r in results if "error" not in r]
    lat = np.asarray([r["latency"] for r in ok]) if ok else np.zeros(1)
    ttft = np.asarray([r["ttft"] for r in ok]) if ok else np.zeros(1)
    return {
        "wall_s": wall,
        "requests": len(results),
        "failed": len(results) - len(ok),
        "errors": sorted({r["error"] for r in results if "error" in r})[:3],
        "requests_s": len(ok) / wall,
        "tokens_s": sum(r["tokens"] for r in ok) / wall,
        "latency_p50_s": float(np.percentile(lat, 50)),
        "latency_p99_s": float(np.percentile(lat, 99)),
        "ttft_p50_s": float(np.percentile(ttft, 50)),
        "ttft_p99_s": float(np.percentile(ttft, 99)),
        "compilations": compiled,
    }


def _median(passes: list[dict]) -> dict:
    keys = [k for k, v in passes[0].items() if isinstance(v, float)]
    out = {k: statistics.median(p[k] for p in passes) for k in keys}
    out["requests"] = sum(p["requests"] for p in passes)
    out["failed"] = sum(p["failed"] for p in passes)
    out["compilations"] = sum(p["compilations"] for p in passes)
    out["errors"] = sorted({e for p in passes for e in p["errors"]})[:3]
    return out


def main(argv: list[str]) -> int:
    from llava_jax.inference.openai_protocol import Limits
    from llava_jax.inference.server import ServerConfig, create_app

    args = _parse_args(argv)
    chat = _chat_model(args)
    requests = _requests(args)
    budgets = [r["max_tokens"] for r in requests]
    limits = Limits(max_prompt_tokens=args.max_prompt_tokens, max_output_tokens=args.max_tokens[1])
    apps = {
        name: create_app(
            chat,
            ServerConfig(
                model_name="bench",
                max_batch=args.max_batch,
                chunk_size=args.chunk_size,
                scheduler=name,
                warmup=True,
                limits=limits,
            ),
        )
        for name in SCHEDULERS
    }
    compilations = _Compilations()
    passes: dict[str, list[dict]] = {name: [] for name in SCHEDULERS}
    start_up: dict[str, float] = {}
    with contextlib.ExitStack() as stack:
        urls = {}
        for name, app in apps.items():  # each server warms up before it serves (`ServerConfig.warmup`)
            urls[name] = stack.enter_context(_server(app))
            start_up[name] = app.state.warm_up_s
            print(f"{name:10s} start-up warm-up: {start_up[name]:.1f} s", flush=True)
        # Unmeasured passes: the continuous scheduler has compiled every shape at start-up; the batch
        # one compiles the batch shapes (sizes, prompt and cache lengths) that a pass meets.
        for i in range(args.warmup):
            for name in SCHEDULERS:
                warm = _load(urls[name], requests, args.clients, compilations)
                print(
                    f"{name:10s} warm-up pass {i + 1}: {warm['wall_s']:.1f} s, {warm['failed']} failed,"
                    f" {warm['compilations']} compilations",
                    flush=True,
                )
        for _ in range(args.repeats):
            for name in SCHEDULERS:
                scheduler = apps[name].state.scheduler
                before = collections.Counter(getattr(scheduler, "seconds", {}))
                figures = _load(urls[name], requests, args.clients, compilations)
                spent = collections.Counter(getattr(scheduler, "seconds", {}))
                spent.subtract(before)
                figures["worker_s"] = {k: round(v, 2) for k, v in spent.items()}
                passes[name].append(figures)
    result = {
        "device": decode_bench._header(chat.model.cfg, args)["device"],
        "llm": decode_bench._header(chat.model.cfg, args)["llm"],
        "image_tokens": chat.model.cfg.num_image_tokens,
        "clients": args.clients,
        "requests": args.requests,
        "max_batch": args.max_batch,
        "chunk_size": args.chunk_size,
        "max_tokens": args.max_tokens,
        "words": args.words,
        "lengths": args.lengths,
        "start_up_s": start_up,
        "ideal": ideal(budgets, args.clients, args.max_batch),
        "ideal_at_chunk": ideal(budgets, args.clients, args.max_batch, args.chunk_size),
        "figures": {name: _median(p) for name, p in passes.items()},
        "passes": passes,
    }
    b, c = result["figures"]["batch"], result["figures"]["continuous"]
    result["ratios"] = {
        "requests_s": c["requests_s"] / b["requests_s"] if b["requests_s"] else float("nan"),
        "tokens_s": c["tokens_s"] / b["tokens_s"] if b["tokens_s"] else float("nan"),
        "latency_p50": c["latency_p50_s"] / b["latency_p50_s"] if b["latency_p50_s"] else float("nan"),
        "ttft_p50": c["ttft_p50_s"] / b["ttft_p50_s"] if b["ttft_p50_s"] else float("nan"),
    }
    for name in SCHEDULERS:
        f = result["figures"][name]
        print(
            f"{name:10s} {f['requests_s']:7.2f} req/s  {f['tokens_s']:8.1f} tok/s  latency p50 {f['latency_p50_s']:6.2f} s"
            f" p99 {f['latency_p99_s']:6.2f} s  ttft p50 {f['ttft_p50_s']:6.2f} s p99 {f['ttft_p99_s']:6.2f} s"
            f"  failed {f['failed']}/{f['requests']}  compilations {f['compilations']}",
            flush=True,
        )
    for p in passes["continuous"]:
        print(f"continuous worker seconds in a {p['wall_s']:.1f} s pass: {p['worker_s']} (the rest waiting)")
    r = result["ratios"]
    print(
        f"continuous / batch: requests/s x{r['requests_s']:.2f}, tokens/s x{r['tokens_s']:.2f},"
        f" latency p50 x{r['latency_p50']:.2f}, ttft p50 x{r['ttft_p50']:.2f}"
    )
    for key, label in (("ideal", "joins every step"), ("ideal_at_chunk", f"joins every {args.chunk_size} steps")):
        i = result[key]
        print(f"ideal ({label}, prefill free): requests/s x{i['requests_s']:.2f}, latency p50 x{i['latency_p50']:.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 1 if any(result["figures"][n]["failed"] for n in SCHEDULERS) else 0


def _parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m llava_jax.bench serve", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny", help="model shape (random weights); default tiny")
    ap.add_argument("--hidden", type=int, default=0, help="override the LLM width")
    ap.add_argument("--layers", type=int, default=0, help="override the LLM depth")
    ap.add_argument("--heads", type=int, default=0, help="override the LLM attention heads")
    ap.add_argument("--kv-heads", type=int, default=0, help="override the LLM KV heads (default: --heads)")
    ap.add_argument("--intermediate", type=int, default=0, help="override the LLM MLP width")
    ap.add_argument("--image-size", type=int, default=0, help="override the vision tower's image size (pixels)")
    ap.add_argument("--patch-size", type=int, default=0, help="override the vision tower's patch size (pixels)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--clients", type=int, default=32, help="concurrent clients")
    ap.add_argument("--requests", type=int, default=128, help="requests per pass (closed loop: many more than clients)")
    ap.add_argument("--max-tokens", type=int, nargs=2, default=[8, 96], metavar=("MIN", "MAX"))
    ap.add_argument(
        "--lengths",
        default="uniform",
        choices=["uniform", "loguniform"],
        help="how max_tokens is drawn in [MIN, MAX]: uniform, or log-uniform (closer to real chat/VQA traffic)",
    )
    ap.add_argument(
        "--max-prompt-tokens", type=int, default=384, help="the servers' prompt limit (warm-up compiles up to it)"
    )
    ap.add_argument("--words", type=int, nargs=2, default=[2, 40], metavar=("MIN", "MAX"), help="prompt text words")
    ap.add_argument("--max-batch", type=int, default=8, help="the schedulers' max_batch (slots)")
    ap.add_argument("--chunk-size", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=1, help="unmeasured passes per scheduler (after start-up)")
    ap.add_argument("--repeats", type=int, default=1, help="measured passes per scheduler (median)")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    args.prompt_tokens, args.new_tokens = 0, 0  # read by the shared header
    return args
