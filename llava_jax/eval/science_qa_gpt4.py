"""The paper's GPT-4 ensembles on ScienceQA: ``python -m llava_jax.eval.science_qa_gpt4``.

    # complement: GPT-4's answer, LLaVA's where GPT-4 gives none (eval_science_qa_gpt4.py)
    python -m llava_jax.eval.science_qa_gpt4 --mode complement --base-dir ScienceQA/data/scienceqa \\
        --gpt4-result gpt4_result.json --our-result answers/sqa.jsonl --output-result ensemble.json
    # judge: where GPT-4 and LLaVA disagree, ask the judge again with both answers
    # (eval_science_qa_gpt4_requery.py); the re-query answers are kept in --requery-result
    python -m llava_jax.eval.science_qa_gpt4 --mode judge ... --requery-result requery.jsonl --judge-model gpt-4-0314

Inputs in the original's formats: ``--gpt4-result`` a JSON object whose ``outputs`` maps pid -> GPT-4's
answer text (what `science_qa --output-result` writes), ``--our-result`` an answers JSONL,
``--requery-result`` a JSONL of ``question_id, text``. Answers are parsed with
`science_qa.parse_answer`; a missing answer counts as unparsed.

* complement: final = GPT-4's choice when its answer parses, else LLaVA's.
* judge: where the two parsed answers differ (an unparsed one differs from everything), the judge
  is asked once more with the question, GPT-4's answer and LLaVA's, and must end with
  ``The answer is X.``; final = the re-query's choice when it parses, else LLaVA's (as the original).
  Re-queries already in ``--requery-result`` are not asked again; new ones are appended to it.

Writes ``--output-result`` in `science_qa`'s format (acc, correct, count, results, outputs) and
prints the accuracy of LLaVA, GPT-4, the ensemble and the upper bound (either right), and the
paper's table for the ensemble.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random
import sys
from collections.abc import Mapping, Sequence

from llava_jax.eval.science_qa import (
    FAILED,
    OPTIONS,
    choice_index,
    format_table,
    load_split,
    parse_answer,
    read_predictions,
    table,
    write_json,
)

REQUERY_TEMPLATE = (
    "{question}\n\n"
    "Two answers were proposed for this question.\n\n"
    "Answer 1:\n{first}\n\n"
    "Answer 2:\n{second}\n\n"
    "Weigh the question and both answers, then give your own final answer. "
    'End with "The answer is X." where X is the letter of the option you choose.'
)


def requery_prompt(question: str, gpt4_text: str, our_text: str) -> str:
    """The re-query message: the question (without the image marker), GPT-4's answer, then LLaVA's."""
    return REQUERY_TEMPLATE.format(
        question=question.replace("<image>\n", "").replace("<image>", "").strip(), first=gpt4_text, second=our_text
    )


def disagreements(split: Mapping[str, Mapping], ours: Mapping[str, Mapping], gpt4: Mapping[str, str]) -> list[str]:
    """pids whose parsed answers (LLaVA's, GPT-4's) differ."""
    out = []
    for pid in split:
        mine = parse_answer(ours[pid]["text"]) if pid in ours else FAILED
        theirs = parse_answer(gpt4[pid]) if pid in gpt4 else FAILED
        if mine != theirs:
            out.append(pid)
    return out


def ensemble(
    split: Mapping[str, Mapping],
    ours: Mapping[str, Mapping],
    gpt4: Mapping[str, str],
    mode: str,
    requery: Mapping[str, Mapping] | None = None,
    *,
    failed: str = "wrong",
    seed: int = 0,
) -> tuple[dict, dict, dict]:
    """Returns (counts, output_result, table) for `mode` ``complement`` or ``judge``."""
    rng = random.Random(seed) if failed == "random" else None
    counts = dict.fromkeys(
        (
            "total",
            "our_correct",
            "gpt4_correct",
            "gpt4_failed",
            "requeried",
            "requery_failed",
            "correct",
            "correct_upperbound",
        ),
        0,
    )
    result = {"acc": None, "correct": None, "count": None, "results": {}, "outputs": {}}
    correct = {}
    for pid, prob in split.items():
        n, answer = len(prob["choices"]), prob["answer"]
        our_text = ours[pid]["text"] if pid in ours else FAILED
        gpt4_text = gpt4.get(pid, FAILED)
        our_letter, gpt4_letter = parse_answer(our_text), parse_answer(gpt4_text)
        our_idx = choice_index(our_letter, n, OPTIONS, rng)
        gpt4_idx = choice_index(gpt4_letter, n)
        counts["total"] += 1
        counts["our_correct"] += our_idx == answer
        counts["gpt4_correct"] += gpt4_idx == answer
        counts["gpt4_failed"] += gpt4_letter == FAILED
        counts["correct_upperbound"] += answer in (our_idx, gpt4_idx)
        if mode == "complement":
            final, text = (our_idx, our_text) if gpt4_letter == FAILED else (gpt4_idx, gpt4_text)
        elif our_letter == gpt4_letter:
            final, text = our_idx, our_text
        else:
            counts["requeried"] += 1
            re_text = (requery or {}).get(pid, {}).get("text", FAILED)
            re_letter = parse_answer(re_text)
            if re_letter == FAILED:
                counts["requery_failed"] += 1
                final, text = our_idx, our_text
            else:
                final, text = choice_index(re_letter, n), re_text
        result["results"][pid] = final
        result["outputs"][pid] = text
        correct[pid] = final == answer
        counts["correct"] += final == answer
    total = counts["total"]
    result.update(acc=100.0 * counts["correct"] / total if total else 0.0, correct=counts["correct"], count=total)
    return counts, result, table(split, correct)


def run_requeries(split, ours, gpt4, path, client, *, max_tokens: int) -> dict[str, dict]:
    """Ask the judge about every disagreement not yet in `path` (JSONL); returns all re-queries by pid."""
    path = pathlib.Path(path)
    done = read_predictions(path) if path.exists() else {}
    todo = [pid for pid in disagreements(split, ours, gpt4) if pid not in done]
    prompts = [
        requery_prompt(
            ours[pid]["prompt"] if pid in ours else split[pid].get("question", ""),
            gpt4.get(pid, FAILED),
            ours[pid]["text"] if pid in ours else FAILED,
        )
        for pid in todo
    ]
    replies = client.complete_many(
        [{"messages": [{"role": "user", "content": p}], "temperature": 0.2, "max_tokens": max_tokens} for p in prompts]
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for pid, prompt, reply in zip(todo, prompts, replies, strict=True):
            ok = not isinstance(reply, Exception)
            rec = {
                "question_id": pid,
                "prompt": prompt,
                "text": reply.content if ok else f"{FAILED}: {reply}",
                "judge_model": client.model,
                "judge_model_version": reply.model if ok else None,
            }
            f.write(json.dumps(rec) + "\n")
            done[pid] = rec
    return done


def report(counts: Mapping[str, int], mode: str) -> str:
    total = counts["total"] or 1

    def line(name, k):
        return f"Total: {counts['total']}, {name}: {counts[k]}, Accuracy: {100.0 * counts[k] / total:.2f}%"

    lines = [
        line("Our-Correct", "our_correct"),
        line("GPT-4-Correct", "gpt4_correct"),
        (
            f"Total: {counts['total']}, GPT-4 NO-ANS: {counts['gpt4_failed']}, "
            f"Percentage: {100.0 * counts['gpt4_failed'] / total:.2f}%"
        ),
    ]
    if mode == "judge":
        lines.append(f"Re-queried: {counts['requeried']} ({counts['requery_failed']} without a parsable answer)")
    lines += [line(f"Ensemble ({mode})-Correct", "correct"), line("Correct upper", "correct_upperbound")]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m llava_jax.eval.science_qa_gpt4", description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=("complement", "judge"), required=True)
    p.add_argument("--base-dir", required=True)
    p.add_argument("--gpt4-result", required=True, help="JSON with outputs: {pid: GPT-4 answer text}")
    p.add_argument("--our-result", required=True, help="the model's answers JSONL")
    p.add_argument("--requery-result", default=None, help="judge mode: re-query answers JSONL (read and appended)")
    p.add_argument("--output-result", default=None)
    p.add_argument("--split", default="test")
    p.add_argument("--failed", choices=("wrong", "random"), default="wrong", help="LLaVA's unparsed answers")
    p.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("judge (mode judge)")
    g.add_argument("--judge-model", default=None, help="default: $LLAVA_JUDGE_MODEL")
    g.add_argument("--base-url", default=None, help="default: $OPENAI_BASE_URL or the OpenAI API")
    g.add_argument("--concurrency", type=int, default=8)
    g.add_argument("--rpm", type=float, default=None)
    g.add_argument("--retries", type=int, default=6)
    g.add_argument("--timeout", type=float, default=120.0)
    g.add_argument("--max-tokens", type=int, default=1024)
    g.add_argument("--cache", default=None, help="reply cache JSONL (default: <requery-result>.cache.jsonl)")
    args = p.parse_args(argv)
    if args.mode == "judge" and not args.requery_result:
        p.error("--mode judge needs --requery-result (where the re-query answers are kept)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    split = load_split(args.base_dir, args.split)
    ours = read_predictions(args.our_result)
    gpt4_file = json.loads(pathlib.Path(args.gpt4_result).read_text())
    if not isinstance(gpt4_file, dict) or not isinstance(gpt4_file.get("outputs"), dict):
        raise TypeError(f"{args.gpt4_result}: expected a JSON object with 'outputs': {{pid: answer text}}")
    gpt4 = {str(k): v for k, v in gpt4_file["outputs"].items()}
    requery = None
    if args.mode == "judge":
        from llava_jax.eval.judge_client import JudgeClient

        client = JudgeClient.from_env(
            model=args.judge_model,
            base_url=args.base_url,
            concurrency=args.concurrency,
            rpm=args.rpm,
            retries=args.retries,
            timeout=args.timeout,
            cache_path=args.cache or args.requery_result + ".cache.jsonl",
        )
        try:
            requery = run_requeries(split, ours, gpt4, args.requery_result, client, max_tokens=args.max_tokens)
        finally:
            client.close()
    counts, result, rows = ensemble(split, ours, gpt4, args.mode, requery, failed=args.failed, seed=args.seed)
    print(report(counts, args.mode))
    print(format_table(rows))
    if args.output_result:
        write_json(args.output_result, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
