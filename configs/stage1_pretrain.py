"""Stage 1, feature alignment: only the projector trains (vision tower and LLM frozen).

    python -m llava_jax.train --config configs/stage1_pretrain.py:vicuna-7b --workdir runs/pretrain_7b \
        --config.init.vision=/ckpt/clip-vit-large-patch14 --config.init.llm=/ckpt/vicuna-7b-v1.3 \
        --config.stage1.data.json_path=/data/LLaVA-CC3M-Pretrain-595K/chat.json \
        --config.stage1.data.image_folder=/data/LLaVA-CC3M-Pretrain-595K/images

Argument: the model preset (vicuna-7b, vicuna-13b, llava-v1.5-7b, llava-v1.5-13b). Defaults are the
original's scripts: paper/v1 presets lr 2e-3, batch 128 (pretrain.sh); v1.5 presets lr 1e-3, batch 256
(v1_5/pretrain.sh); 1 epoch, `plain` template, max length 2048, AdamW wd 0, warmup 3 %, cosine.
"""

from llava_jax.training.config_schema import base_config


def get_config(arg: str = "vicuna-7b"):
    c = base_config()
    c.model = c.arg = arg or "vicuna-7b"
    v15 = c.model.startswith("llava-v1.5")
    c.stages = "stage1"
    c.remat = "full"
    # keeps 7B and 13B under 80 GB per device on 8 devices (see --aot in the README)
    c.stage1.update(
        batch_size=256 if v15 else 128,
        epochs=1,
        micro_batches=8 if v15 else 4,
        targets_per_row=256,
        checkpoint_every=1000,
    )
    c.stage1.optim.lr = 1e-3 if v15 else 2e-3
    c.stage1.data.update(template="plain", max_length=2048, worker_count=8)
    c.mesh.ici = (1, -1, 1)  # FSDP over every device
    return c
