"""Stage 2, visual instruction tuning: projector and LLM train, the vision tower stays frozen.

    python -m llava_jax.train --config configs/stage2_finetune.py:vicuna-13b --workdir runs/finetune_13b \
        --config.init.vision=/ckpt/clip-vit-large-patch14 --config.init.llm=/ckpt/vicuna-13b-v1.3 \
        --config.init.stage1=runs/pretrain_13b/stage1 \
        --config.stage2.data.json_path=/data/llava_instruct_158k.json --config.stage2.data.image_folder=/data/coco/train2017

Argument: the model preset. Paper presets (vicuna-7b/13b): LLaVA-Instruct-158K, batch 32, 3 epochs
(the paper's run); v1.5 presets: mix665k, batch 128, 1 epoch, `pad` aspect ratio. lr 2e-5, AdamW wd 0,
warmup 3 %, cosine, `v1` template, max length 2048 with sequence packing, full remat, gradient
accumulation to fit memory.
"""

from llava_jax.training.config_schema import base_config


def get_config(arg: str = "vicuna-7b"):
    c = base_config()
    c.model = c.arg = arg or "vicuna-7b"
    v15 = c.model.startswith("llava-v1.5")
    c.stages = "stage2"
    c.remat = "full"
    c.stage2.update(
        batch_size=128 if v15 else 32,
        epochs=1 if v15 else 3,
        micro_batches=4 if v15 else 1,
        targets_per_row=0,
        checkpoint_every=500,
    )
    c.stage2.optim.lr = 2e-5
    c.stage2.data.update(
        template="v1",
        max_length=2048,
        packing=True,  # several samples per row; the step count of the epochs is counted before the run
        worker_count=8,
        image_aspect_ratio="pad" if v15 else "square",
    )
    c.mesh.ici = (1, -1, 1)
    return c
