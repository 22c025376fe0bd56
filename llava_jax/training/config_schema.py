"""The config schema: every key a run may set, with its type and default.

Config files in `configs/` start from `base_config()` and change what their experiment needs; the
dicts are locked, so a misspelt key (in a file or on the command line, `--config.stage2.optim.lr=1e-5`)
fails at start with the key named, and a value of the wrong type is refused by ml_collections.
"""

from __future__ import annotations

import ml_collections as mlc

from llava_jax.data.settings import DataSettings
from llava_jax.models.lora import DEFAULT_TARGETS


def optim_config(lr: float) -> mlc.ConfigDict:
    """AdamW with HF Trainer defaults (the original's optimizer), warmup 3 % then cosine."""
    return mlc.ConfigDict(
        dict(
            lr=lr,
            schedule="cosine",
            warmup_ratio=0.03,
            end_lr_ratio=0.0,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            weight_decay=0.0,
            clip_norm=1.0,
            mm_projector_lr=0.0,  # >0: the projector's own peak lr (the original's --mm_projector_lr); 0: lr
        )
    )


def data_config(json_path: str = "", template: str = "v1") -> mlc.ConfigDict:
    """A stage's data section: the config fields of `llava_jax.data.settings.DataSettings`, with its
    defaults (image size and tokens per image come from the model, batch size and seed from the run)."""
    return mlc.ConfigDict(DataSettings.config_defaults(json_path=json_path, template=template))


def stage_config(
    *,
    trainable: str,
    lr: float,
    batch_size: int,
    epochs: float,
    template: str,
    json_path: str = "",
    objective: str = "lm",
) -> mlc.ConfigDict:
    return mlc.ConfigDict(
        dict(
            # parts that learn: 'projector' (stage 1), 'projector,llm' (stage 2), 'projector,lora'
            # (stage 2 with LoRA adapters, see the lora section) or 'vision,llm' (stage 0)
            trainable=trainable,
            # 'lm': next-token loss on the conversation (stages 1, 2). 'clip_lm': stage 0, pretraining the
            # vision tower and LLM from scratch on captions (training/contrastive.py).
            objective=objective,
            batch_size=batch_size,  # global rows per optimizer step
            micro_batches=1,  # gradient accumulation: batch_size is split into this many passes
            # >0: compute logits only at up to this many target tokens per row (most LLaVA positions
            # are image tokens or prompt and have none); a row with more targets stops the run. 0: all.
            targets_per_row=0,
            # with targets_per_row: compile the full-logits fall-back step before the first step (its
            # memory shows at start) or only if a batch needs it (saves a compile when none will)
            eager_fallback=True,
            # 'global_token_mean': sum of target NLL / target tokens of the global batch. 'original': the
            # original's HF Trainer + DeepSpeed reduction, the mean over (micro-batch, device) groups of each
            # group's token mean (see llava_jax/training/loss.py).
            loss_reduction="global_token_mean",
            loss_devices=0,  # with 'original': data-parallel devices to reproduce; 0 = this mesh's data*fsdp
            epochs=epochs,
            num_steps=-1,  # -1: derived from epochs and the dataset size
            optim=optim_config(lr),
            data=data_config(json_path, template),
            checkpoint_every=500,
            keep_checkpoints=3,
        )
    )


def base_config() -> mlc.ConfigDict:
    c = mlc.ConfigDict()
    c.model = "tiny"  # preset name, see llava_jax.models.presets
    c.dtype = "bfloat16"  # compute dtype
    c.frozen_dtype = "bfloat16"  # storage of frozen weights; trainable ones keep float32 masters
    c.attention = "auto"  # xla | cudnn | auto
    c.remat = "none"  # none | full | dots | qkv_proj | qkv_mlp
    c.seed = 0
    c.stages = "stage1,stage2"  # which of the stage dicts below run, in order
    # Stage 0 (not the paper's; for towers trained from scratch, as in the demo): vision tower + LLM on
    # the captions, image-caption InfoNCE + caption LM. Later stages start from the parts it trained.
    c.stage0 = stage_config(
        trainable="vision,llm", lr=1e-3, batch_size=32, epochs=1, template="plain", objective="clip_lm"
    )
    # >0: this fraction of stage 0's rows hold their caption's tokens in the image slots (the LLM
    # learns to read what stands there; training/contrastive.py)
    c.stage0.caption_prefix = 0.0
    c.stage1 = stage_config(trainable="projector", lr=2e-3, batch_size=128, epochs=1, template="plain")
    c.stage2 = stage_config(trainable="projector,llm", lr=2e-5, batch_size=32, epochs=3, template="v1")
    # Instruction data varies in length (LLaVA-Instruct-158K: ~100 to 1000+ tokens with the image):
    # padded to 2048 most of each row is padding; packed, most is real tokens (`bench train --packing`).
    c.stage2.data.packing = True
    c.init = mlc.ConfigDict(
        dict(
            vision="",  # HF CLIP directory (e.g. openai/clip-vit-large-patch14); '' = random init
            llm="",  # HF LLaMA/Vicuna directory; '' = random init
            llava="",  # a complete llava-hf / original LLaVA directory (instead of vision + llm)
            stage1="",  # stage 2's projector: a stage-1 dir (or its final_params) or an mm_projector.bin/.safetensors
        )
    )
    # LoRA adapters on the LLM's block linears and the storage of its base (llava_jax/models/lora.py).
    # The original's defaults; its LoRA recipe (configs/stage2_lora.py) sets rank 128, alpha 256.
    c.lora = mlc.ConfigDict(
        dict(
            rank=0,  # 0: no adapters
            alpha=16.0,  # scaling alpha / rank
            dropout=0.05,  # on the adapter's input, training only
            targets=DEFAULT_TARGETS,  # regex fully matching block linear names; lm_head never
            # 'none' (frozen_dtype), 'int8' (per-output-channel, weight-only) or 'nf4' (QLoRA's 4-bit
            # NormalFloat, blocks of 64, absmax float32, no double quantisation)
            quantized_base="none",
        )
    )
    c.mesh = mlc.ConfigDict(dict(ici=(1, -1, 1), dcn=(1, 1, 1)))  # (data, fsdp, tensor); -1 = fill
    c.log_every = 10
    c.eval = mlc.ConfigDict(
        dict(
            json_path="",  # held-out Q&A with exact answers; '' = no evaluation
            max_examples=200,
            max_new_tokens=8,
            batch_size=32,
        )
    )
    c.synthetic = mlc.ConfigDict(
        dict(  # generate the synthetic shapes data before training (demo)
            enabled=False,
            out="{workdir}/data",
            image_size=64,
            num_pretrain=2000,
            num_instruct=2000,
            num_eval=400,
            questions=(2, 4),  # (min, max) questions per instruct image
            seed=0,
        )
    )
    c.arg = ""  # the config file's argument (e.g. the model preset), kept for naming runs
    c.distributed = mlc.ConfigDict(
        dict(
            coordinator_address="",
            num_processes=-1,
            process_id=-1,  # '' / -1: detect (TPU, SLURM) or single process
        )
    )
    c.lock()
    return c
