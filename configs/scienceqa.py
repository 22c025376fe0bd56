"""ScienceQA fine-tuning (the paper's science-QA result): stage 2 on QCM -> LEA prompts.

    python -m llava_jax.data.scienceqa --problems problems.json --splits pid_splits.json --split train \
        --format QCM-LEA --out data/scienceqa/llava_train_QCM-LEA.json
    python -m llava_jax.train --config configs/scienceqa.py:vicuna-13b --workdir runs/sqa \
        --config.init.vision=... --config.init.llm=... --config.init.stage1=runs/pretrain_13b/stage1 \
        --config.stage2.data.json_path=data/scienceqa/llava_train_QCM-LEA.json \
        --config.stage2.data.image_folder=data/scienceqa/images/train

Defaults from the original's finetune_sqa.sh: lr 2e-5, batch 128, 12 epochs, `v1` template.
"""

from llava_jax.training.config_schema import base_config


def get_config(arg: str = "vicuna-13b"):
    c = base_config()
    c.model = c.arg = arg or "vicuna-13b"
    c.stages = "stage2"
    c.remat = "full"
    c.stage2.update(batch_size=128, epochs=12, micro_batches=4, checkpoint_every=500)
    c.stage2.optim.lr = 2e-5
    c.stage2.data.update(template="v1", max_length=2048, worker_count=8)
    c.mesh.ici = (1, -1, 1)
    return c
