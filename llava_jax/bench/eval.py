"""Question-answering throughput: `model_vqa`'s batched answering beside the original's loop.

    python -m llava_jax.bench eval                       # tiny preset, 64 questions, batch 16
    python -m llava_jax.bench eval --questions 128 --batch-size 32 --new-tokens 32

The original ``model_vqa.py`` answers one question at a time with transformers ``generate``. Here
both sides answer the same questions (a prompt built with the v1 template from varied question
texts, one random image each) with the same random weights (the conversion tables give
transformers llava_jax's parameters), greedily, stopping at EOS or `--new-tokens`:

* llava_jax: `model_vqa.Answerer` in batches of `--batch-size` (fixed shapes, all local devices);
* transformers: a loop, one question per ``generate`` call.

Both get decoded pixels (image decoding is not timed on either side); torch runs with the faster of
its default thread count and 1 (measured). Printed: questions/s of each
(after a warm-up that compiles), their ratio, and how many answers agree word for word.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

QUESTIONS = (
    "What is shown in the image?",
    "Describe the picture in detail.",
    "What colour is the main object?",
    "How many objects are there, and where are they?",
    "Is there anything unusual in this image?",
    "What might happen next in this scene?",
)


def main(argv: list[str]) -> int:
    args = _parse_args(argv)
    chat, images, prompts, answerer = _setup(args)
    answerer.generate(prompts[: args.batch_size], images[: args.batch_size])  # compile
    t0 = time.perf_counter()
    ours = []
    for lo in range(0, args.questions, args.batch_size):
        ours += answerer.generate(prompts[lo : lo + args.batch_size], images[lo : lo + args.batch_size])
    ours_s = time.perf_counter() - t0
    figures = {
        "preset": args.preset,
        "questions": args.questions,
        "batch_size": args.batch_size,
        "new_tokens": args.new_tokens,
        "devices": answerer.devices,
        "llava_jax_questions_per_s": args.questions / ours_s,
    }
    print(
        f"llava_jax model_vqa (batch {args.batch_size}, {answerer.devices} device(s)): "
        f"{figures['llava_jax_questions_per_s']:.2f} questions/s"
    )
    if args.reference == "transformers":
        _transformers_loop(args, chat, prompts, images, ours, ours_s, figures)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(figures, f, indent=2)
    return 0


def _parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m llava_jax.bench eval", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny", help="model shape (random weights); default tiny")
    ap.add_argument("--questions", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--reference", default="transformers", choices=["transformers", "none"])
    ap.add_argument("--out", default="", help="also write the figures as JSON here")
    return ap.parse_args(argv)


def _setup(args):
    """(ChatModel with random weights, uint8 [s, s, 3] images, prompt token ids, `Answerer`), one image and
    prompt per question."""
    import jax.numpy as jnp

    from llava_jax.bench.decode import random_model
    from llava_jax.data.templates import get_template
    from llava_jax.data.tokenizer import load_tokenizer
    from llava_jax.eval.model_vqa import Answerer
    from llava_jax.inference.chat_model import ChatModel
    from llava_jax.inference.sampling import GREEDY
    from llava_jax.models.presets import get_preset

    cfg = get_preset(args.preset, dtype=jnp.float32, param_dtype=jnp.float32, remat="none")
    chat = ChatModel(random_model(cfg), load_tokenizer(None), get_template("v1"), "pad", "bench")
    rng = np.random.default_rng(0)
    s = cfg.vision.image_size
    images = [rng.integers(0, 256, (s, s, 3), dtype=np.uint8) for _ in range(args.questions)]
    prompts = [chat.prompt_ids([QUESTIONS[i % len(QUESTIONS)]], image=True) for i in range(args.questions)]
    answerer = Answerer(
        chat,
        batch_size=args.batch_size,
        max_new_tokens=args.new_tokens,
        sampling=GREEDY,
        prompt_lengths=[len(p) for p in prompts],
    )
    return chat, images, prompts, answerer


def _transformers_loop(args, chat, prompts, images, ours: list[str], ours_s: float, figures: dict) -> None:
    """Answer the same questions with transformers, one ``generate`` call each; adds its figures to `figures`."""
    import torch

    from llava_jax.bench.decode import to_transformers
    from llava_jax.data.image import CLIP_MEAN, CLIP_STD

    hf = to_transformers(chat.model)
    hf.generation_config.eos_token_id = chat.eos_ids[0]
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)

    def one(ids, img):
        pixels = (torch.from_numpy(img[None]).permute(0, 3, 1, 2).float() / 255 - mean) / std
        input_ids = torch.from_numpy(np.asarray(ids)[None]).long()
        with torch.inference_mode():
            out = hf.generate(
                input_ids=input_ids,
                pixel_values=pixels,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=args.new_tokens,
                do_sample=False,
            )
        return chat.tokenizer.decode(out[0, input_ids.shape[1] :].tolist(), skip_special_tokens=True).strip()

    one(prompts[0], images[0])  # warm-up
    timings = {}
    for threads in dict.fromkeys((torch.get_num_threads(), 1)):  # keep the faster of torch's default and 1
        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        one(prompts[0], images[0])
        timings[threads] = time.perf_counter() - t0
    torch.set_num_threads(min(timings, key=timings.get))
    figures["torch_threads"] = torch.get_num_threads()
    t0 = time.perf_counter()
    theirs = [one(p, img) for p, img in zip(prompts, images, strict=True)]
    theirs_s = time.perf_counter() - t0
    figures["transformers_loop_questions_per_s"] = args.questions / theirs_s
    figures["speedup"] = theirs_s / ours_s
    figures["answers_equal"] = sum(a == b for a, b in zip(ours, theirs, strict=True))
    print(
        f"transformers, one question per generate call: {figures['transformers_loop_questions_per_s']:.2f} questions/s"
    )
    print(f"ratio {figures['speedup']:.2f}x; identical answers: {figures['answers_equal']}/{args.questions}")
