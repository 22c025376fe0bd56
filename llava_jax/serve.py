"""Serve a trained LLaVA over an OpenAI-compatible HTTP API, with a web chat page at ``/``.

    pip install -e ".[serve]"
    python -m llava_jax.serve --checkpoint runs/demo [--host 127.0.0.1 --port 8000]

Then, from any OpenAI client::

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.chat.completions.create(model="demo", messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}},
        {"type": "text", "text": "What is in the image?"}]}])

Images must be sent inline as base64 ``data:`` URIs. Concurrent requests are batched (`--max-batch`);
requests beyond `--max-queue` waiting ones are refused with 503. The server listens on 127.0.0.1
unless told otherwise and has no authentication: put it behind a proxy that has, before exposing it.
"""

from __future__ import annotations

import argparse
import logging
import sys

import jax.numpy as jnp

from llava_jax.data.errors import BadSample
from llava_jax.data.templates import TEMPLATES


def parse_args(argv):
    from llava_jax.inference.openai_protocol import Limits

    d = Limits()
    p = argparse.ArgumentParser(prog="python -m llava_jax.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="run / stage directory, or a llava-hf directory")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", help="model id in the API (default: the checkpoint directory's name)")
    p.add_argument("--template", choices=sorted(TEMPLATES), help="conversation template (default: the model's)")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the checkpoint's, else the vendored LLaMA one)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    g = p.add_argument_group("batching")
    g.add_argument("--max-batch", type=int, default=8, help="most requests generated together (default 8)")
    g.add_argument("--max-queue", type=int, default=64, help="most requests waiting; more get 503 (default 64)")
    g.add_argument("--batch-wait-ms", type=float, default=10.0, help="how long a request waits for company")
    g.add_argument("--chunk-size", type=int, default=8, help="decode steps per device call (streaming granularity)")
    g.add_argument(
        "--scheduler",
        choices=("continuous", "batch"),
        default="continuous",
        help="continuous: requests join the running decode batch between chunks and leave when done (default);"
        " batch: one batch at a time, newcomers wait for it to end",
    )
    g.add_argument(
        "--warmup",
        action="store_true",
        help="compile before serving: the continuous scheduler every shape that requests within the limits"
        " (--max-prompt-tokens, --max-output-tokens) can need, so serving compiles nothing (tighter limits"
        " start faster); the batch scheduler batches of 1..max-batch image questions",
    )
    g = p.add_argument_group("limits per request")
    g.add_argument("--max-request-bytes", type=int, default=d.max_request_bytes)
    g.add_argument("--max-image-bytes", type=int, default=d.max_image_bytes)
    g.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels)
    g.add_argument(
        "--max-image-aspect-ratio", type=float, default=d.max_image_aspect_ratio, help="longest / shortest image side"
    )
    g.add_argument(
        "--max-image-work-pixels",
        type=int,
        default=d.max_image_work_pixels,
        help="largest preprocessing intermediate (the pad square, the resize before the crop)",
    )
    g.add_argument("--max-prompt-tokens", type=int, default=None, help="default: the context length - 1")
    g.add_argument("--max-tokens", type=int, default=d.max_output_tokens, help="largest max_tokens a request may ask")
    g.add_argument("--default-max-tokens", type=int, default=d.default_max_tokens)
    g.add_argument("--temperature", type=float, default=d.default_temperature, help="when a request sets none")
    g.add_argument("--top-p", type=float, default=d.default_top_p, help="when a request sets none")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        import uvicorn
    except ImportError:
        print('error: serving needs the serve extra: pip install -e ".[serve]"', file=sys.stderr)
        return 2
    from llava_jax.inference.chat_model import ChatModel
    from llava_jax.inference.openai_protocol import Limits
    from llava_jax.inference.server import ServerConfig, create_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    limits = Limits(
        max_request_bytes=args.max_request_bytes,
        max_image_bytes=args.max_image_bytes,
        max_image_pixels=args.max_image_pixels,
        max_image_aspect_ratio=args.max_image_aspect_ratio,
        max_image_work_pixels=args.max_image_work_pixels,
        max_prompt_tokens=args.max_prompt_tokens,
        max_output_tokens=args.max_tokens,
        default_max_tokens=args.default_max_tokens,
        default_temperature=args.temperature,
        default_top_p=args.top_p,
    )
    config = ServerConfig(
        model_name=args.model_name,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        batch_wait_ms=args.batch_wait_ms,
        chunk_size=args.chunk_size,
        warmup=args.warmup,
        scheduler=args.scheduler,
        limits=limits,
    )
    try:
        chat = ChatModel.from_checkpoint(
            args.checkpoint, template=args.template, tokenizer_dir=args.tokenizer, dtype=jnp.dtype(args.dtype)
        )
    except (ValueError, FileNotFoundError, BadSample) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    app = create_app(chat, config)
    print(
        f"serving {app.state.model_name!r} (template {chat.template.name}, context {chat.context_length}) on "
        f"http://{args.host}:{args.port}  (API: /v1, web chat: /)",
        flush=True,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


if __name__ == "__main__":
    sys.exit(main())
