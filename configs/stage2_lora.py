"""Stage 2 with LoRA: projector and LoRA adapters on every LLM linear train; the LLM base and the
vision tower stay frozen (the original's `scripts/v1_5/finetune_lora.sh`).

    python -m llava_jax.train --config configs/stage2_lora.py:llava-v1.5-7b --workdir runs/lora_7b \
        --config.init.vision=/ckpt/clip-vit-large-patch14-336 --config.init.llm=/ckpt/vicuna-7b-v1.5 \
        --config.init.stage1=/ckpt/llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5/mm_projector.bin \
        --config.stage2.data.json_path=/data/llava_v1_5_mix665k.json --config.stage2.data.image_folder=/data
    # QLoRA-style, on one GPU: the frozen base in int8 (per-output-channel, weight-only) or 4-bit NF4
    # (QLoRA's NormalFloat, blocks of 64, as bitsandbytes)
    ... --config.lora.quantized_base=int8 --config.stage2.micro_batches=32
    ... --config.lora.quantized_base=nf4 --config.stage2.batch_size=16 --config.stage2.micro_batches=16

Argument: the model preset, as configs/stage2_finetune.py (batch sizes, epochs, template and aspect
mode as there). The recipe: LoRA rank 128, alpha 256 (scaling 2), dropout 0.05 on q/k/v/o/gate/up/down
of every block (not lm_head, not the vision tower or projector), lr 2e-4 for the adapters and
`mm_projector_lr` 2e-5 for the projector, AdamW wd 0, warmup 3 %, cosine, full remat.
"""

from llava_jax.training.config_schema import base_config


def get_config(arg: str = "vicuna-7b"):
    c = base_config()
    c.model = c.arg = arg or "vicuna-7b"
    v15 = c.model.startswith("llava-v1.5")
    c.stages = "stage2"
    c.remat = "full"
    c.lora.update(rank=128, alpha=256.0, dropout=0.05, quantized_base="none")
    c.stage2.update(
        trainable="projector,lora",
        batch_size=128 if v15 else 32,
        epochs=1 if v15 else 3,
        micro_batches=4 if v15 else 1,
        targets_per_row=0,
        checkpoint_every=500,
    )
    c.stage2.optim.update(lr=2e-4, mm_projector_lr=2e-5, weight_decay=0.0, warmup_ratio=0.03)
    c.stage2.data.update(template="v1", max_length=2048, worker_count=8, image_aspect_ratio="pad" if v15 else "square")
    c.mesh.ici = (1, -1, 1)
    return c
