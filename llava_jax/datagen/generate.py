"""Generate LLaVA-Instruct-style responses from image annotations with an OpenAI-compatible model.

    export OPENAI_API_KEY=...
    python -m llava_jax.datagen.generate --captions captions_train2017.json \\
        --instances instances_train2017.json --kinds conversation,detail,complex \\
        --out gen/ --model gpt-4o --concurrency 16 --rpm 500 --tpm 300000 --limit 100

For every image (first `--limit` images of the input) and kind, one request: the kind's system
message and few-shot pairs (`llava_jax.datagen.prompts`), then the image's symbolic context
(`llava_jax.datagen.context`). Responses go to ``<out>/raw.jsonl`` as they arrive
(`llava_jax.datagen.rawlog`); rerun the same command to send only what is missing. Requests that
fail for good go to ``<out>/errors.jsonl`` (a rerun tries them again). Each run appends its totals
(requests, tokens, retries, failures, estimated cost) to ``<out>/usage.jsonl``.
Turn the raw log into LLaVA JSON with ``python -m llava_jax.datagen.build``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time

from tqdm import tqdm

from llava_jax.datagen.client import (
    ChatClient,
    ChatError,
    ClientConfig,
    estimate_tokens,
)
from llava_jax.datagen.context import (
    Annotation,
    format_context,
    load_coco,
    load_jsonl,
    unique_images,
)
from llava_jax.datagen.prompts import KINDS, PromptSet, load_prompt_set
from llava_jax.datagen.rawlog import RawLog

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.openai.com/v1"


def parse_kinds(text: str) -> list[str]:
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ValueError(f"--kinds: unknown {bad or text!r}; choose from {','.join(KINDS)}")
    return list(dict.fromkeys(kinds))


def pending_requests(annotations: list[Annotation], kinds: list[str], done: set) -> list[tuple[Annotation, str]]:
    """(annotation, kind) pairs not yet in the raw log, kind-major in input order."""
    return [(a, k) for k in kinds for a in annotations if (a.image, k) not in done]


async def run(
    annotations: list[Annotation],
    prompt_sets: dict[str, PromptSet],
    raw: RawLog,
    config: ClientConfig,
    params: dict,
    *,
    progress: bool = True,
    client: ChatClient | None = None,
) -> dict:
    """Send every pending request, appending each response to `raw` as it arrives.

    Returns the run's totals (`Usage.snapshot()` plus ``pending``, ``written``, ``errors``).
    """
    todo = pending_requests(annotations, list(prompt_sets), raw.done)
    own_client = client is None
    client = client or ChatClient(config)
    queue: asyncio.Queue = asyncio.Queue()
    for item in todo:
        queue.put_nowait(item)
    bar = tqdm(total=len(todo), unit="req", disable=not progress, dynamic_ncols=True)
    counts = {"pending": len(todo), "written": 0, "errors": 0}

    async def worker() -> None:
        while True:
            try:
                annotation, kind = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            await _request(client, raw, prompt_sets[kind], annotation, kind, config, params, counts)
            bar.update(1)
            u = client.usage
            bar.set_postfix(
                tok_in=u.prompt_tokens,
                tok_out=u.completion_tokens,
                retries=u.retries,
                errors=counts["errors"],
                usd=f"{u.cost:.4f}",
                refresh=False,
            )

    try:
        await asyncio.gather(*(worker() for _ in range(min(config.concurrency, max(1, len(todo))))))
    finally:
        bar.close()
        if own_client:
            await client.aclose()
    return {**client.usage.snapshot(), **counts}


async def _request(
    client: ChatClient,
    raw: RawLog,
    ps: PromptSet,
    annotation: Annotation,
    kind: str,
    config: ClientConfig,
    params: dict,
    counts: dict,
) -> None:
    """Send the one request for (`annotation`, `kind`); append the response (or the failure) to `raw` and count it."""
    query = format_context(annotation, kind)
    try:
        result = await client.complete(ps.messages(query), **params)
    except ChatError as e:
        counts["errors"] += 1
        raw.append_error(
            {
                "image": annotation.image,
                "kind": kind,
                "error": str(e),
                "status": e.status,
                "attempts": e.attempts,
                "time": time.time(),
            }
        )
        return
    raw.append(
        {
            "image": annotation.image,
            "kind": kind,
            "model": result.response.get("model", config.model),
            "request": {
                "model": config.model,
                "prompt_set": ps.fingerprint,
                "query": query,
                "params": params,
            },
            "content": result.content,
            "finish_reason": result.finish_reason,
            "usage": result.usage,
            "attempts": result.attempts,
            "response_id": result.response.get("id"),
            "time": time.time(),
        }
    )
    counts["written"] += 1


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m llava_jax.datagen.generate",
        description=__doc__.split("\n\n")[0],
    )
    _add_input_args(p)
    _add_job_args(p)
    _add_client_args(p)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if bool(args.input) == bool(args.captions):
        p.error("give either --captions (+ --instances) or --input")
    if args.instances and not args.captions:
        p.error("--instances goes with --captions")
    try:
        args.kinds = parse_kinds(args.kinds)
    except ValueError as e:
        p.error(str(e))
    if args.limit is not None and args.limit < 0:
        p.error("--limit must be >= 0")
    return args


def _add_input_args(p: argparse.ArgumentParser) -> None:
    """--captions / --instances / --input: where the image annotations come from."""
    src = p.add_argument_group("input (COCO files or JSON Lines)")
    src.add_argument("--captions", help="COCO captions JSON (captions_*.json)")
    src.add_argument(
        "--instances",
        help="COCO instances JSON (instances_*.json), for the boxes of detail/complex",
    )
    src.add_argument(
        "--input",
        help="JSON Lines: {image, captions: [...], boxes: [{category, bbox: [x1,y1,x2,y2] in 0-1]}}",
    )


def _add_job_args(p: argparse.ArgumentParser) -> None:
    """--kinds, --out, --prompts, --limit: what to generate and where it goes."""
    p.add_argument(
        "--kinds",
        default="conversation,detail,complex",
        help="comma-separated: conversation, detail, complex",
    )
    p.add_argument(
        "--out",
        required=True,
        help="output folder for raw.jsonl, errors.jsonl, usage.jsonl",
    )
    p.add_argument(
        "--prompts",
        help="prompt root with conversation/, detail_description/, complex_reasoning/ "
        "(default: the vendored LLaVA prompts)",
    )
    p.add_argument("--limit", type=int, help="use only the first N images of the input")


def _add_client_args(p: argparse.ArgumentParser) -> None:
    """The API endpoint, rate limits, retries, sampling and prices (`ClientConfig`), and --dry-run."""
    p.add_argument(
        "--base-url",
        default=os.environ.get("OPENAI_BASE_URL", DEFAULT_BASE_URL),
        help="API root (default $OPENAI_BASE_URL or %(default)s)",
    )
    p.add_argument(
        "--model",
        default=os.environ.get("OPENAI_MODEL", "gpt-4o"),
        help="default $OPENAI_MODEL or %(default)s",
    )
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    p.add_argument("--rpm", type=float, help="requests per minute limit")
    p.add_argument("--tpm", type=float, help="tokens per minute limit")
    p.add_argument("--max-retries", type=int, default=8)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per attempt")
    p.add_argument(
        "--backoff-base",
        type=float,
        default=1.0,
        help="seconds; doubled per retry, with full jitter",
    )
    p.add_argument("--max-tokens", type=int, default=1024, help="completion budget per request")
    p.add_argument("--temperature", type=float, help="sampling temperature (default: the server's)")
    p.add_argument(
        "--price-input",
        type=float,
        help="USD per 1M prompt tokens (default: a table by model name)",
    )
    p.add_argument("--price-output", type=float, help="USD per 1M completion tokens")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="count the pending requests, estimate tokens and cost, send nothing",
    )


def load_annotations(args) -> list[Annotation]:
    annotations = load_jsonl(args.input) if args.input else load_coco(args.captions, args.instances)
    unique = unique_images(annotations)
    if len(unique) < len(annotations):
        log.warning(
            "%d repeated images in the input: the first record of each is used",
            len(annotations) - len(unique),
        )
    if any(k != "conversation" for k in args.kinds) and not any(a.boxes for a in unique) and args.captions:
        log.warning("no boxes in the input: detail/complex contexts will hold captions only (pass --instances)")
    return unique[: args.limit] if args.limit is not None else unique


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(sys.argv[1:] if argv is None else argv)
    annotations = load_annotations(args)
    prompt_sets = {k: load_prompt_set(args.prompts, k) for k in args.kinds}
    params = {"max_tokens": args.max_tokens}
    if args.temperature is not None:
        params["temperature"] = args.temperature
    api_key = os.environ.get("OPENAI_API_KEY")
    config = _client_config(args, api_key)
    with RawLog(args.out) as raw:
        todo = _report_pending(annotations, args.kinds, raw)
        if args.dry_run:
            _print_estimate(todo, prompt_sets, config, args.max_tokens)
            return 0
        if todo and not api_key and args.base_url == DEFAULT_BASE_URL:
            print(
                "OPENAI_API_KEY is not set: export it (or point --base-url at a server that needs no key)",
                file=sys.stderr,
            )
            return 2
        sent = _run_interruptible(
            run(
                annotations,
                prompt_sets,
                raw,
                config,
                params,
                progress=not args.no_progress,
            )
        )
        if sent is None:
            return 130
        totals, t0 = sent
        totals.update(
            model=args.model,
            base_url=args.base_url,
            seconds=round(time.time() - t0, 1),
            time=time.time(),
        )
        with open(os.path.join(args.out, "usage.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps(totals) + "\n")
    print(
        f"wrote {totals['written']} responses, {totals['errors']} failed requests (see errors.jsonl; rerun to retry); "
        f"tokens in {totals['prompt_tokens']} out {totals['completion_tokens']}, retries {totals['retries']}, "
        f"estimated cost {totals['cost_usd']:.4f} USD",
        flush=True,
    )
    return 0 if totals["errors"] == 0 else 1


def _client_config(args, api_key: str | None) -> ClientConfig:
    return ClientConfig(
        base_url=args.base_url,
        model=args.model,
        api_key=api_key,
        concurrency=args.concurrency,
        rpm=args.rpm,
        tpm=args.tpm,
        max_retries=args.max_retries,
        timeout=args.timeout,
        backoff_base=args.backoff_base,
        price_input=args.price_input,
        price_output=args.price_output,
    )


def _report_pending(annotations: list[Annotation], kinds: list[str], raw: RawLog) -> list[tuple[Annotation, str]]:
    """The pending (annotation, kind) requests, printed as counts (a warning for repeated keys in the raw log)."""
    if raw.duplicates:
        log.warning(
            "%s holds %d repeated (image, kind) keys; build keeps the last of each",
            raw.path,
            raw.duplicates,
        )
    todo = pending_requests(annotations, kinds, raw.done)
    print(
        f"{len(annotations)} images x {len(kinds)} kinds: {len(todo)} requests to send, "
        f"{len(annotations) * len(kinds) - len(todo)} already in {raw.path}",
        flush=True,
    )
    return todo


def _print_estimate(todo, prompt_sets: dict[str, PromptSet], config: ClientConfig, max_tokens: int) -> None:
    """--dry-run: the estimated prompt tokens of `todo`, the completion budget and their cost."""
    est = sum(estimate_tokens(prompt_sets[k].messages(format_context(a, k)), None) - 1024 for a, k in todo)
    pin, pout = config.prices()
    print(
        f"estimated prompt tokens {est} (~{est * pin / 1e6:.2f} USD) + completions up to "
        f"{len(todo) * max_tokens} tokens (<= {len(todo) * max_tokens * pout / 1e6:.2f} USD) "
        f"at {pin}/{pout} USD per 1M tokens"
    )


def _run_interruptible(coro) -> tuple[dict, float] | None:
    """Run `coro` (`run(...)`) on a new event loop that SIGINT / SIGTERM cancel; returns (its totals, the start
    time), or None when interrupted (after saying so on stderr)."""
    loop = asyncio.new_event_loop()
    task = loop.create_task(coro)
    loop.add_signal_handler(signal.SIGINT, task.cancel)
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    t0 = time.time()
    try:
        return loop.run_until_complete(task), t0
    except asyncio.CancelledError:
        print(
            "interrupted: responses received so far are saved; rerun the same command to continue",
            file=sys.stderr,
        )
        return None
    finally:
        loop.close()


if __name__ == "__main__":
    sys.exit(main())
