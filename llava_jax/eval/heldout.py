"""Held-out Q&A accuracy by greedy generation: the answer must come out exactly (case and a final
period aside). Used by the demo on the synthetic shapes data; works on any LLaVA JSON whose records
carry an `answer` field (the question is the first human turn)."""

from __future__ import annotations

import collections
import json
from typing import Any

import numpy as np
from tqdm import tqdm

from llava_jax.data.conversation_tokens import tokenize_prompt
from llava_jax.data.image import load_image
from llava_jax.inference import generate
from llava_jax.paths import Path, as_path


def _norm(text: str) -> str:
    return text.strip().lower().rstrip(".").strip()


def qa_accuracy(
    model,
    json_path: str | Path,
    *,
    tokenizer,
    template: str,
    image_folder: str | None = None,
    max_examples: int = 200,
    batch_size: int = 32,
    max_new_tokens: int = 8,
    aspect_ratio: str = "square",
) -> dict[str, Any]:
    """Exact-match accuracy overall and per `category`; `chance` from the records' `choices`."""
    json_path = as_path(json_path)
    folder = as_path(image_folder) if image_folder else json_path.parent
    records = json.loads(json_path.read_text())[:max_examples]
    if not records:
        raise ValueError(f"{json_path}: no evaluation records")
    cfg = model.cfg
    hits: dict[str, list[bool]] = collections.defaultdict(list)
    chance = []
    examples = []
    for start in tqdm(range(0, len(records), batch_size), desc="eval", unit="batch", leave=False):
        chunk = records[start : start + batch_size]
        prompts = [
            tokenize_prompt([r["conversations"][0]["value"]], template, tokenizer, cfg.num_image_tokens) for r in chunk
        ]
        images = np.stack(
            [
                load_image(str(folder / r["image"]), cfg.vision.image_size, aspect_ratio, record_id=r.get("id"))
                if r.get("image")
                else np.zeros((cfg.vision.image_size,) * 2 + (3,), np.uint8)
                for r in chunk
            ]
        )[:, None]
        outs = generate(
            model,
            [p.tolist() for p in prompts],
            images,
            max_new_tokens=max_new_tokens,
            eos_ids=(tokenizer.eos_token_id,),
        )
        for r, out in zip(chunk, outs, strict=True):
            text = tokenizer.decode(out, skip_special_tokens=True)
            ok = _norm(text) == _norm(r["answer"])
            hits[r.get("category", "all")].append(ok)
            if r.get("choices"):
                chance.append(1.0 / len(r["choices"]))
            if len(examples) < 5:
                examples.append({"question": r["conversations"][0]["value"], "answer": r["answer"], "output": text})
    flat = [h for v in hits.values() for h in v]
    return {
        "accuracy": float(np.mean(flat)),
        "n": len(flat),
        "per_category": {k: float(np.mean(v)) for k, v in sorted(hits.items())},
        "chance": float(np.mean(chance)) if chance else None,
        "examples": examples,
    }
