"""Terminal chat with a trained LLaVA about one image.

    python -m llava_jax.chat --checkpoint runs/demo --image photo.jpg
    python -m llava_jax.chat --checkpoint DIR --image https://example.com/cat.png --temperature 0 --max-new-tokens 256

`--checkpoint`: a training run directory (its last finished stage), a stage directory, or a llava-hf
directory. `--image`: a local file or an http(s) URL (downloaded, at most 20 MiB); leave it out to
chat without an image. Defaults follow the original LLaVA CLI: temperature 0.2, 512 new tokens, the
template the model was trained with.

Type a message and press Enter; the reply streams as it is generated. An empty line, ``exit`` or
Ctrl-D quits, ``/reset`` starts the conversation over, Ctrl-C stops a reply.
"""

from __future__ import annotations

import argparse
import sys

import jax.numpy as jnp

from llava_jax.data.errors import BadSample
from llava_jax.data.templates import TEMPLATES


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m llava_jax.chat", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="run / stage directory, or a llava-hf directory")
    p.add_argument("--image", help="image file or http(s) URL (the first message is about it)")
    p.add_argument("--template", choices=sorted(TEMPLATES), help="conversation template (default: the model's)")
    p.add_argument("--temperature", type=float, default=0.2, help="0 = greedy (default 0.2)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (default off)")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens (default off)")
    p.add_argument("--max-new-tokens", type=int, default=512, help="reply length limit per turn (default 512)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", help="tokenizer folder (default: the checkpoint's, else the vendored LLaMA one)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    p.add_argument("--chunk-size", type=int, default=1, help="tokens per device call (1 = stream every token)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from llava_jax.inference.chat_model import ChatModel
    from llava_jax.inference.sampling import Sampling
    from llava_jax.inference.terminal_chat import ChatSession, fetch_image, run_terminal

    try:
        sampling = Sampling(args.temperature, args.top_p, args.top_k)
        chat = ChatModel.from_checkpoint(
            args.checkpoint, template=args.template, tokenizer_dir=args.tokenizer, dtype=jnp.dtype(args.dtype)
        )
        image = chat.load_image(fetch_image(args.image)) if args.image else None
        session = ChatSession(
            chat,
            image,
            sampling=sampling,
            max_new_tokens=args.max_new_tokens,
            seed=args.seed,
            chunk_size=args.chunk_size,
        )
    except (ValueError, FileNotFoundError, BadSample) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"[{chat.name}: template {chat.template.name}, context {chat.context_length} tokens"
        f"{', image ' + args.image if args.image else ', no image'}; empty line or 'exit' quits]",
        flush=True,
    )
    return run_terminal(session)


if __name__ == "__main__":
    sys.exit(main())
