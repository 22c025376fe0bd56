"""Command line: checkpoint export and import.

    python -m llava_jax.convert export --checkpoint RUN_OR_STAGE_OR_HF_DIR --out HF_DIR
        [--dtype bfloat16|float16|float32] [--max-shard-size 5GB] [--llm-only] [--tokenizer DIR]
        [--template NAME] [--overwrite] [--merge-lora | --lora-format peft]
    python -m llava_jax.convert import --from DIR --out STAGE_DIR [--vision CLIP_DIR]
        [--projector MM_PROJECTOR] [--select-layer N] [--template NAME] [--image-aspect-ratio square|pad]
        [--dtype float32|bfloat16] [--overwrite]
    python -m llava_jax.convert import --from LORA_DIR --base VICUNA_DIR --vision CLIP_DIR --out STAGE_DIR
        [--lora merge|keep]

`export` writes a llava-hf directory (or, with --llm-only, a LlamaForCausalLM directory); `import`
writes a stage directory (model.json + final_params) from an original LLaVA, llava-hf, or LLaMA +
CLIP + stage-1 projector checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m llava_jax.convert", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("export", help="llava_jax run/stage (or llava-hf dir) -> Hugging Face directory")
    e.add_argument("--checkpoint", required=True, help="training run dir, stage dir, or llava-hf dir")
    e.add_argument("--out", required=True, help="output directory (new or empty)")
    e.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    e.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB, 500MB")
    e.add_argument("--llm-only", action="store_true", help="export only the language model (LlamaForCausalLM)")
    e.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the vendored LLaMA tokenizer)")
    e.add_argument(
        "--template", default=None, help="conversation template for the chat template (default: the checkpoint's)"
    )
    e.add_argument("--overwrite", action="store_true", help="replace weights already in --out")
    e.add_argument("--merge-lora", action="store_true", help="fold LoRA adapters into the weights (W + A B alpha/r)")
    e.add_argument(
        "--lora-format",
        default=None,
        choices=("peft",),
        help="keep LoRA adapters: the base weights in --out, a PEFT adapter in --out/adapter",
    )

    i = sub.add_parser("import", help="original LLaVA / llava-hf / LLaMA+CLIP+projector -> stage directory")
    i.add_argument("--from", dest="source", required=True, help="checkpoint directory")
    i.add_argument("--out", required=True, help="stage directory to write (model.json + final_params)")
    i.add_argument("--vision", default=None, help="CLIP directory (the original's mm_vision_tower)")
    i.add_argument("--projector", default=None, help="stage-1 mm_projector.bin/.safetensors (with a LLaMA --from)")
    i.add_argument("--select-layer", type=int, default=None, help="vision layer for a LLaMA+CLIP+projector import")
    i.add_argument("--base", default=None, help="base LLaMA / Vicuna directory of a LoRA checkpoint (--from LORA_DIR)")
    i.add_argument(
        "--lora",
        default="merge",
        choices=("merge", "keep"),
        help="LoRA checkpoint: fold the adapters into the weights (merge) or keep them as adapters (keep)",
    )
    i.add_argument("--template", default=None, help="conversation template recorded in model.json")
    i.add_argument("--image-aspect-ratio", default=None, choices=("square", "pad"))
    i.add_argument(
        "--dtype", default=None, choices=("float32", "bfloat16"), help="storage dtype of final_params (default float32)"
    )
    i.add_argument("--overwrite", action="store_true")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.command == "export":
        from llava_jax.convert.export import export_checkpoint

        out = export_checkpoint(
            args.checkpoint,
            args.out,
            dtype=args.dtype,
            max_shard_size=args.max_shard_size,
            llm_only=args.llm_only,
            tokenizer_path=args.tokenizer,
            template=args.template,
            overwrite=args.overwrite,
            merge_lora=args.merge_lora,
            lora_format=args.lora_format,
        )
    else:
        from llava_jax.convert.stage import import_checkpoint

        out = import_checkpoint(
            args.source,
            args.out,
            vision=args.vision,
            projector=args.projector,
            select_layer=args.select_layer,
            base=args.base,
            lora=args.lora,
            template=args.template,
            image_aspect_ratio=args.image_aspect_ratio,
            dtype=args.dtype,
            overwrite=args.overwrite,
        )
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
