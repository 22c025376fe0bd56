"""Benchmarks: `python -m llava_jax.bench <name> [flags]`.

Each benchmark is a module `llava_jax.bench.<name>` with a `main(argv)` function. Benchmarks report
speed as ratios against a reference run in the same process (e.g. transformers on the same inputs),
never as pass/fail timings.
"""
