"""Evaluation as the paper does it, in the original's file formats.

Command-line modules (``python -m llava_jax.eval.<name>``):

- `model_vqa`: answer a question file (JSONL, or ScienceQA JSON with ``--science``), batched,
  batch-invariant, sharded over devices and processes, resumable.
- `science_qa`: score ScienceQA answers (the original's parsing and files, the paper's table).
- `science_qa_gpt4`: the GPT-4 ensembles (complement, judge re-query).
- `gpt_review`: LLaVA-Bench (COCO, In-the-Wild) reviews by a judge model.
- `summarize_review`: per-category relative scores of review files.

Pieces: `questions` (question files), `answers` (answers files), `judge_client` (the
OpenAI-compatible client behind every judge call).
"""
