"""LLaVA-Bench judging: ``python -m llava_jax.eval.gpt_review``, the protocol of the original
``eval_gpt_review_visual.py`` (COCO) and ``eval_gpt_review_bench.py`` (In-the-Wild).

    OPENAI_API_KEY=... python -m llava_jax.eval.gpt_review -q qa90_questions.jsonl \\
        -c caps_boxes_coco2014_val_80.jsonl -a qa90_gpt4_answer.jsonl answers/llava.jsonl \\
        -r rule.json -o reviews/llava.jsonl --judge-model gpt-4-0314
    python -m llava_jax.eval.summarize_review -f reviews/llava.jsonl

For each question the judge gets a system message ("You are a helpful and precise assistant for
checking the quality of the answer.") and one user message::

    [Context]
    <captions, one per line>

    <category: [x1, y1, x2, y2] lines>         (COCO only)

    [Question]
    <question>

    [<role> 1]
    <reference answer>

    [End of <role> 1]

    [<role> 2]
    <model answer>

    [End of <role> 2]

    [System]
    <rule prompt>

with role and prompt from ``rule.json`` under the question's category (``conv``/``detail``/
``complex`` for COCO, ``llava_bench_<category>`` for In-the-Wild), temperature 0.2, `--max-tokens`
1024. The two scores are read from the reply's first line as the original reads them (commas become
spaces, then exactly two space-separated numbers).

Reviews JSONL, the original's fields plus the judge's identity: ``id`` (1-based position in the
question file), ``question_id``, ``answer1_id``, ``answer2_id``, ``category``, ``content``, ``tuple``
([reference score, model score]), ``judge_model`` (requested), ``judge_model_version`` (what the
endpoint reported). A reply whose scores do not parse is asked again (`--parse-retries` times);
still unparsed, or a request that failed for good, is recorded with ``tuple`` [-1, -1] and
``failed`` true, and left out of the means by `summarize_review` (which prints how many).
A rerun skips questions already reviewed; with the reply cache (``--cache``, default next to the
output) repeated requests cost nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import threading
from collections.abc import Mapping, Sequence

from llava_jax.eval.judge_client import JudgeClient, JudgeError, Reply

SYSTEM_PROMPT = "You are a helpful and precise assistant for checking the quality of the answer."
FAILED_TUPLE = [-1, -1]


def parse_score(review: str) -> list[float] | None:
    """First line -> [score1, score2], or None when it is not exactly two numbers (after commas become spaces)."""
    parts = review.split("\n")[0].replace(",", " ").split(" ")
    if len(parts) != 2:
        return None
    try:
        return [float(parts[0]), float(parts[1])]
    except ValueError:
        return None


def context_text(entry: Mapping, bench: str) -> str:
    """The [Context] body: captions (and for COCO the boxes) of the question's image."""
    if bench == "coco":
        captions = "\n".join(entry["captions"])
        boxes = "\n".join(f"{inst['category']}: {inst['bbox']}" for inst in entry["instances"])
        return f"{captions}\n\n{boxes}"
    caption = entry["caption"]
    return "\n".join(caption) if isinstance(caption, list) else caption


def review_prompt(context: str, question: str, answer1: str, answer2: str, rule: Mapping) -> str:
    role, prompt = rule["role"], rule["prompt"]
    return (
        f"[Context]\n{context}\n\n"
        f"[Question]\n{question}\n\n"
        f"[{role} 1]\n{answer1}\n\n[End of {role} 1]\n\n"
        f"[{role} 2]\n{answer2}\n\n[End of {role} 2]\n\n"
        f"[System]\n{prompt}\n\n"
    )


def _jsonl(path) -> list[dict]:
    rows = []
    for n, line in enumerate(pathlib.Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: not valid JSON ({err.msg})") from None
    return rows


def detect_bench(contexts: Sequence[Mapping]) -> str:
    """``coco`` when contexts carry ``captions`` + ``instances``, ``wild`` when they carry ``caption``."""
    first = contexts[0] if contexts else {}
    if "instances" in first and "captions" in first:
        return "coco"
    if "caption" in first:
        return "wild"
    raise ValueError(
        f"context entries have neither captions+instances (COCO) nor caption (In-the-Wild): keys {sorted(first)}"
    )


def build_jobs(questions, contexts, answers1, answers2, rules, bench: str) -> list[dict]:
    """One job per question: the review record without content/tuple, and the prompt."""
    by_image = {c["image"]: c for c in contexts}
    a1 = {json.dumps(a["question_id"]): a for a in answers1}
    a2 = {json.dumps(a["question_id"]): a for a in answers2}
    jobs = []
    for idx, q in enumerate(questions):
        key = json.dumps(q["question_id"])
        for name, table in (("reference (first -a file)", a1), ("model (second -a file)", a2)):
            if key not in table:
                raise ValueError(f"question_id {q['question_id']!r} has no answer in the {name}")
        if q["image"] not in by_image:
            raise ValueError(f"question_id {q['question_id']!r}: image {q['image']!r} has no entry in the context file")
        category = q["category"] if bench == "coco" else "llava_bench_" + q["category"]
        if category not in rules:
            raise ValueError(
                f"category {category!r} (question_id {q['question_id']!r}) is not in the rule file "
                f"(has {sorted(rules)})"
            )
        ans1, ans2 = a1[key], a2[key]
        record = {
            "id": idx + 1,
            "question_id": q["question_id"],
            "answer1_id": ans1.get("answer_id", ans1["question_id"]),
            "answer2_id": ans2.get("answer_id", ans2["question_id"]),
            "category": category,
        }
        prompt = review_prompt(
            context_text(by_image[q["image"]], bench), q["text"], ans1["text"], ans2["text"], rules[category]
        )
        jobs.append({"record": record, "prompt": prompt})
    return jobs


def judge_one(client: JudgeClient, prompt: str, *, max_tokens: int, parse_retries: int) -> dict:
    """Ask the judge (again while the scores do not parse). Returns content, tuple, failed, judge fields."""
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}]
    reply: Reply | None = None
    for variant in range(parse_retries + 1):
        try:
            reply = client.complete(messages, temperature=0.2, max_tokens=max_tokens, variant=variant)
        except JudgeError as err:
            return {
                "content": f"JUDGE REQUEST FAILED: {err}",
                "tuple": FAILED_TUPLE,
                "failed": True,
                "judge_model": client.model,
                "judge_model_version": None,
            }
        scores = parse_score(reply.content)
        if scores is not None:
            return {
                "content": reply.content,
                "tuple": scores,
                "judge_model": client.model,
                "judge_model_version": reply.model,
            }
    return {
        "content": reply.content,
        "tuple": FAILED_TUPLE,
        "failed": True,
        "judge_model": client.model,
        "judge_model_version": reply.model,
    }


def review(
    questions,
    contexts,
    answers1,
    answers2,
    rules,
    output,
    client: JudgeClient,
    *,
    bench: str = "auto",
    max_tokens: int = 1024,
    parse_retries: int = 2,
) -> dict:
    """Review every question not yet in `output`; returns counts. Lines are written as reviews finish,
    and the file is rewritten in question order at the end."""
    bench = detect_bench(contexts) if bench == "auto" else bench
    jobs = build_jobs(questions, contexts, answers1, answers2, rules, bench)
    output = pathlib.Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    existing = {}
    if output.exists():
        for r in _jsonl_tolerant(output):
            existing[json.dumps(r["question_id"])] = r
    todo = [j for j in jobs if json.dumps(j["record"]["question_id"]) not in existing]
    lock = threading.Lock()
    counts = {"reviewed": 0, "failed": 0, "skipped": len(jobs) - len(todo)}
    with open(output, "a", encoding="utf-8") as f:

        def one(job):
            result = judge_one(client, job["prompt"], max_tokens=max_tokens, parse_retries=parse_retries)
            record = {**job["record"], **result}
            with lock:
                f.write(json.dumps(record) + "\n")
                f.flush()
                os.fsync(f.fileno())
                existing[json.dumps(record["question_id"])] = record
                counts["reviewed"] += 1
                counts["failed"] += int(bool(record.get("failed")))
                print(f"reviewed {counts['reviewed']}/{len(todo)}", end="\r", flush=True)

        if todo:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(client.concurrency) as pool:
                list(pool.map(one, todo))
    ordered = [
        existing[json.dumps(j["record"]["question_id"])]
        for j in jobs
        if json.dumps(j["record"]["question_id"]) in existing
    ]
    tmp = output.with_name(output.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in ordered), encoding="utf-8")
    os.replace(tmp, output)
    return counts


def _jsonl_tolerant(path) -> list[dict]:
    """Complete JSON lines of a file a killed run may have left with a torn last line."""
    out = []
    for line in pathlib.Path(path).read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m llava_jax.eval.gpt_review", description=__doc__.split("\n")[0])
    p.add_argument("-q", "--question", required=True, help="questions JSONL (question_id, image, text, category)")
    p.add_argument("-c", "--context", required=True, help="context JSONL: COCO captions+boxes or In-the-Wild captions")
    p.add_argument(
        "-a",
        "--answer-list",
        nargs=2,
        required=True,
        metavar=("REFERENCE", "MODEL"),
        help="the reference (GPT-4) answers, then the model's",
    )
    p.add_argument("-r", "--rule", required=True, help="rule.json (role and prompt per category)")
    p.add_argument("-o", "--output", required=True, help="reviews JSONL")
    p.add_argument("--max-tokens", type=int, default=1024, help="maximum number of tokens produced in the output")
    p.add_argument(
        "--bench",
        choices=("auto", "coco", "wild"),
        default="auto",
        help="COCO (captions + boxes, categories as is) or In-the-Wild (caption, llava_bench_ categories)",
    )
    g = p.add_argument_group("judge")
    g.add_argument("--judge-model", default=None, help="default: $LLAVA_JUDGE_MODEL")
    g.add_argument("--base-url", default=None, help="default: $OPENAI_BASE_URL or the OpenAI API")
    g.add_argument("--concurrency", type=int, default=8)
    g.add_argument("--rpm", type=float, default=None, help="request starts per minute (default: no limit)")
    g.add_argument("--retries", type=int, default=6, help="retries per request on 429 / 5xx / timeouts")
    g.add_argument("--timeout", type=float, default=120.0, help="seconds per request attempt")
    g.add_argument("--parse-retries", type=int, default=2, help="asks again when the scores do not parse")
    g.add_argument("--cache", default=None, help="reply cache JSONL (default: <output>.cache.jsonl; 'none' = off)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cache = None if args.cache == "none" else (args.cache or args.output + ".cache.jsonl")
    client = JudgeClient.from_env(
        model=args.judge_model,
        base_url=args.base_url,
        concurrency=args.concurrency,
        rpm=args.rpm,
        retries=args.retries,
        timeout=args.timeout,
        cache_path=cache,
    )
    rules = json.loads(pathlib.Path(args.rule).read_text())
    questions = _jsonl(args.question)
    try:
        counts = review(
            questions,
            _jsonl(args.context),
            _jsonl(args.answer_list[0]),
            _jsonl(args.answer_list[1]),
            rules,
            args.output,
            client,
            bench=args.bench,
            max_tokens=args.max_tokens,
            parse_retries=args.parse_retries,
        )
    finally:
        client.close()
    u = client.usage
    print(
        f"\nreviewed {counts['reviewed']} ({counts['failed']} failed to give scores), {counts['skipped']} already "
        f"done; judge {client.model}: {u['requests']} requests, {u['retries']} retries, {u['cache_hits']} from cache, "
        f"{u['prompt_tokens']} prompt + {u['completion_tokens']} completion tokens -> {args.output}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
