"""Answer a question file with a model: ``python -m llava_jax.eval.model_vqa``.

Flags follow the original ``model_vqa.py`` / ``model_vqa_science.py``; the answers file is the
original's JSONL (see `answers`), so either code base can score it.

    python -m llava_jax.eval.model_vqa --model-path runs/ft7b --question-file qa90_questions.jsonl \\
        --image-folder coco/val2014 --answers-file answers/llava.jsonl --temperature 0 --batch-size 16
    python -m llava_jax.eval.model_vqa --science --model-path runs/sqa --question-file llava_test_CQM-A.json \\
        --image-folder scienceqa/test --answers-file answers/sqa.jsonl --single-pred-prompt --temperature 0

How it runs:

* Batched and batch-invariant. Every batch is compiled for the same shapes: prompts are left-padded
  to the bucket of the longest prompt of the whole file, the batch always has the same row count
  (the last one is padded with inactive rows), every row carries an image slot when any question
  has an image, and `max_new_tokens` is fitted to the context once for the file. So a question's
  greedy answer does not depend on its batch-mates or the batch size.
* Every local device generates: the rows of a batch are split over a mesh of this process's
  devices (parameters replicated). With several processes (``jax.distributed``, e.g.
  ``launch/local_multiprocess.sh``) each answers a contiguous share of the file into its own part
  file; process 0 then merges the parts into the answers file in question order.
* Resumable: questions whose id already has a line (in the answers file or a part file) are
  skipped, and each line is fsynced when written.
* A missing or unreadable image (or a prompt longer than the context) is recorded for that
  question (``text`` "", ``metadata.error``) and counted, not a crash.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import pathlib
import sys
import time
from collections.abc import Sequence

import numpy as np

from llava_jax.eval.answers import (
    AnswerWriter,
    answer_record,
    read_answers,
    write_ordered,
)
from llava_jax.eval.questions import Question, read_questions

log = logging.getLogger(__name__)


def model_name(path) -> str:
    """The `model_id` written with each answer: the directory name, with its parent for stage and
    ``checkpoint-N`` directories (as the original names ``.../llava-7b/checkpoint-500``)."""
    path = pathlib.Path(path).resolve()
    if path.name.startswith("checkpoint-") or path.name in ("stage1", "stage2"):
        return f"{path.parent.name}_{path.name}"
    return path.name


def part_path(answers_file: pathlib.Path, process: int, count: int) -> pathlib.Path:
    return answers_file.with_name(f"{answers_file.name}.part-{process}-of-{count}")


def shares(n: int, count: int) -> list[range]:
    """Contiguous shares of n items for `count` processes (as the original's --num-chunks)."""
    size = math.ceil(n / count) if n else 0
    return [range(min(k * size, n), min((k + 1) * size, n)) for k in range(count)]


class Answerer:
    """Generates answers for batches of questions with fixed compiled shapes.

    chat: a `ChatModel`; batch_size: questions per batch; prompts: token ids of every question of
    the file (to fix the prompt width); any_image: whether any question has an image.
    """

    def __init__(
        self,
        chat,
        *,
        batch_size: int,
        max_new_tokens: int,
        sampling,
        seed: int = 0,
        prompt_lengths: Sequence[int] = (),
        any_image: bool = True,
        devices=None,
    ):
        import jax
        from flax import nnx

        self.chat, self.sampling, self.seed = chat, sampling, seed
        self.batch_size = batch_size
        devices = list(devices or jax.local_devices())
        self.rows = -(-batch_size // len(devices)) * len(devices)
        self.width = max(prompt_lengths, default=1)
        context = chat.context_length
        self.max_new_tokens = max(1, min(max_new_tokens, context - self.width))
        if self.max_new_tokens < max_new_tokens:
            log.warning(
                "max_new_tokens %d -> %d: the longest prompt of the file has %d tokens and the context is %d",
                max_new_tokens,
                self.max_new_tokens,
                self.width,
                context,
            )
        self.any_image = any_image
        self.place = None
        if len(devices) > 1:
            mesh = jax.sharding.Mesh(np.array(devices), ("data",))
            rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
            replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
            state = nnx.state(chat.model)
            nnx.update(chat.model, jax.device_put(state, replicated))
            self.place = lambda x: jax.device_put(np.asarray(x), rows)
        self.devices = len(devices)

    def generate(self, prompts: list[np.ndarray], images: list[np.ndarray | None]) -> list[str]:
        """prompts: token ids per question; images: uint8 [S, S, 3] or None per question. Returns texts."""
        from llava_jax.inference.generate import generate

        s = self.chat.image_size
        pixels = None
        if self.any_image:
            pixels = np.zeros((len(prompts), 1, s, s, 3), np.uint8)
            for b, img in enumerate(images):
                if img is not None:
                    pixels[b, 0] = img
        stops = self.chat.stop_strings()
        tok = self.chat.tokenizer
        done: set[int] = set()
        so_far: list[list[int]] = [[] for _ in prompts]

        def stream(chunk):
            if not stops:
                return None
            hits = []
            for b, new in enumerate(chunk.tokens):
                so_far[b].extend(new)
                if b not in done and new and any(st in tok.decode(so_far[b], skip_special_tokens=True) for st in stops):
                    done.add(b)
                    hits.append(b)
            return hits

        out = generate(
            self.chat.model,
            [p.tolist() for p in prompts],
            pixels,
            max_new_tokens=self.max_new_tokens,
            sampling=self.sampling,
            eos_ids=self.chat.eos_ids,
            seed=self.seed,
            stream=stream,
            min_prompt_length=self.width,
            rows=self.rows,
            place=self.place,
        )
        texts = []
        for ids in out:
            text = tok.decode(ids, skip_special_tokens=True)
            for st in stops:
                text = text.split(st, 1)[0]
            texts.append(text.strip())
        return texts


def _prompt_ids(chat, q: Question) -> np.ndarray:
    return chat.prompt_ids([q.text], image=q.image is not None)


def run(args) -> dict:
    """Answer the questions of `args` not yet answered; returns counts."""
    import jax

    from llava_jax.inference.chat_model import ChatModel
    from llava_jax.inference.sampling import Sampling

    process, count = jax.process_index(), jax.process_count()
    answers_file = pathlib.Path(args.answers_file)
    questions = read_questions(args.question_file, science=args.science, single_pred_prompt=args.single_pred_prompt)
    chat = ChatModel.from_checkpoint(args.model_path, template=args.conv_mode)
    model_id = model_name(args.model_path)
    prompts, errors = _prepare_prompts(chat, questions)
    own, todo = _own_todo(questions, answers_file, process, count)
    answerer = Answerer(
        chat,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        sampling=Sampling(args.temperature, args.top_p),
        seed=args.seed,
        prompt_lengths=[len(p) for p in prompts.values()],
        any_image=any(q.image for q in questions),
        devices=_devices(args.devices),
    )
    out_file = answers_file if count == 1 else part_path(answers_file, process, count)
    counts = {"answered": 0, "errors": 0, "skipped": len(own) - len(todo)}
    from tqdm import tqdm

    bar = tqdm(total=len(todo), unit="q", desc="answering", disable=process != 0 or not todo, dynamic_ncols=True)
    start = time.perf_counter()
    with AnswerWriter(out_file) as writer:
        for lo in range(0, len(todo), args.batch_size):
            batch = todo[lo : lo + args.batch_size]
            records, answered = _answer_batch(
                batch,
                chat,
                answerer,
                prompts,
                errors,
                image_folder=args.image_folder,
                model_id=model_id,
            )
            writer.write(records[q.question_id] for q in batch)
            counts["answered"] += answered
            counts["errors"] += len(batch) - answered
            bar.update(len(batch))
    bar.close()
    elapsed = time.perf_counter() - start
    counts["questions_per_s"] = counts["answered"] / elapsed if elapsed > 0 and counts["answered"] else 0.0
    _merge_parts(answers_file, questions, counts, process, count)
    return counts


def _prepare_prompts(chat, questions: list[Question]) -> tuple[dict, dict[object, str]]:
    """({question_id: prompt token ids}, {question_id: error}) for every question: a prompt that cannot be built
    or does not leave room in the model context becomes an error recorded in place of an answer."""
    from llava_jax.data.errors import BadSample

    prompts, errors = {}, {}
    for q in questions:
        try:
            prompts[q.question_id] = _prompt_ids(chat, q)
        except BadSample as err:
            errors[q.question_id] = f"prompt: {err}"
    too_long = {qid for qid, p in prompts.items() if len(p) >= chat.context_length}
    for qid in too_long:
        errors[qid] = f"prompt: {len(prompts.pop(qid))} tokens, the model context is {chat.context_length}"
    return prompts, errors


def _own_todo(
    questions: list[Question], answers_file: pathlib.Path, process: int, count: int
) -> tuple[list[Question], list[Question]]:
    """(this process's share of `questions`, those of them not answered in the answers file or any part file)."""
    own = [questions[i] for i in shares(len(questions), count)[process]]
    files = [answers_file] + [part_path(answers_file, p, count) for p in range(count)]
    done = {json.dumps(r["question_id"]) for f in files for r in read_answers(f)}
    todo = [q for q in own if json.dumps(q.question_id) not in done]
    if process == 0:
        print(
            f"{len(questions)} questions, {len(done)} already answered; this process: {len(todo)} of {len(own)} "
            f"(process {process} of {count})",
            flush=True,
        )
    return own, todo


def _answer_batch(
    batch: list[Question], chat, answerer, prompts: dict, errors: dict, *, image_folder, model_id: str
) -> tuple[dict, int]:
    """({question_id: answer record} for every question of `batch`, number answered by the model); a prompt error
    or an image that cannot be loaded is recorded as an error."""
    from llava_jax.data.errors import BadSample

    records, ready = {}, []
    for q in batch:
        if q.question_id in errors:
            records[q.question_id] = answer_record(
                q.question_id, q.prompt, "", model_id, {"error": errors[q.question_id]}
            )
            continue
        image = None
        if q.image is not None:
            try:
                image = chat.load_image(str(pathlib.Path(image_folder) / q.image))
            except (BadSample, OSError) as err:
                records[q.question_id] = answer_record(
                    q.question_id, q.prompt, "", model_id, {"error": f"image {q.image!r}: {err}"}
                )
                continue
        ready.append((q, image))
    if ready:
        texts = answerer.generate([prompts[q.question_id] for q, _ in ready], [img for _, img in ready])
        for (q, _), text in zip(ready, texts, strict=True):
            records[q.question_id] = answer_record(q.question_id, q.prompt, text, model_id)
    return records, len(ready)


def _merge_parts(answers_file: pathlib.Path, questions: list[Question], counts: dict, process: int, count: int):
    """After every process wrote its part: process 0 merges them into `answers_file` and prints the counts."""
    if count > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("llava_jax.eval.model_vqa: parts written")
    if process == 0:
        merge(answers_file, questions, count)
        all_errors = sum(1 for r in read_answers(answers_file) if r.get("metadata", {}).get("error"))
        print(
            f"answered {counts['answered']} questions ({counts['questions_per_s']:.2f} questions/s), "
            f"{counts['errors']} recorded as errors this run ({all_errors} in the file), "
            f"{counts['skipped']} already done -> {answers_file}",
            flush=True,
        )
    if count > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("llava_jax.eval.model_vqa: merged")


def merge(answers_file: pathlib.Path, questions: list[Question], count: int) -> None:
    """Fold part files into the answers file, in question order; remove the parts."""
    records = {}
    parts = [part_path(answers_file, p, c) for c in {1, count} for p in range(c)]
    parts = [p for p in parts if p.exists()]
    for f in [answers_file] + parts:
        for r in read_answers(f):
            records.setdefault(json.dumps(r["question_id"]), r)
    extra = [json.loads(k) for k in records if k not in {json.dumps(q.question_id) for q in questions}]
    write_ordered(answers_file, records, [q.question_id for q in questions] + extra)
    for p in parts:
        p.unlink()


def _devices(n: int | None):
    import jax

    devices = jax.local_devices()
    if n is None:
        return devices
    if not 1 <= n <= len(devices):
        raise ValueError(f"--devices {n}: this process has {len(devices)} devices")
    return devices[:n]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m llava_jax.eval.model_vqa", description=__doc__.split("\n")[0])
    p.add_argument("--model-path", required=True, help="run directory, stage directory or llava-hf directory")
    p.add_argument(
        "--model-base", default=None, help="accepted for compatibility; not used (the model path holds the whole model)"
    )
    p.add_argument("--question-file", required=True)
    p.add_argument("--image-folder", default="")
    p.add_argument("--answers-file", required=True)
    p.add_argument("--conv-mode", default=None, help="conversation template (default: the model's own)")
    p.add_argument("--science", action="store_true", help="the question file is ScienceQA converted JSON")
    p.add_argument("--single-pred-prompt", action="store_true")
    p.add_argument("--temperature", type=float, default=0.2, help="0 = greedy (the original's default is 0.2)")
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--num_beams", type=int, default=1, help="only 1 (beam search is not implemented)")
    p.add_argument("--max_new_tokens", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0, help="sampling seed (temperature > 0)")
    p.add_argument("--devices", type=int, default=None, help="use the first N local devices (default: all)")
    args = p.parse_args(argv)
    if args.num_beams != 1:
        p.error("--num_beams must be 1: beam search is not implemented")
    if args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    if args.max_new_tokens < 1:
        p.error("--max_new_tokens must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from llava_jax.parallel.distributed import initialize

    initialize()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
