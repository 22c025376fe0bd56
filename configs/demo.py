"""The demo: a tiny LLaVA learns the synthetic shapes data on a CPU in a few minutes.

    python -m llava_jax.train                       # this file is the default config
    python -m llava_jax.train --config configs/demo.py --config.stage2.num_steps=50
    python -m llava_jax.train --config configs/demo.py:lora   # stage 0, then stage 2 trains LoRA adapters + projector

Generates images of coloured shapes with captions (stages 0 and 1) and Q&A (stage 2), then:
  stage 0  (opt-in: --config.stages=stage0,stage1,stage2) pretrains the random vision tower and LLM
           on the captions (image-caption InfoNCE + caption LM, training/contrastive.py): they stand
           in for the paper's pretrained CLIP and Vicuna;
  stage 1  trains the projector only, towers frozen (the paper's feature alignment);
  stage 2  trains projector + LLM on multi-turn Q&A, tower frozen (the paper's instruction tuning);
and answers held-out questions about unseen images by greedy generation. No downloads. The towers
are tiny and young, so the learning rates are higher than the paper's; the structure (what trains
when, templates, losses) is the paper's.
"""

from llava_jax.training.config_schema import base_config


def get_config(arg: str = ""):
    c = base_config()
    c.model = "tiny"
    c.dtype = "float32"  # CPU matmuls are fastest in fp32
    c.frozen_dtype = "float32"
    c.synthetic.enabled = True
    # Every instruct image is asked all four questions (colour, shape, count, position; random order).
    c.synthetic.update(image_size=64, num_pretrain=3000, num_instruct=3000, num_eval=300, questions=(4, 4))

    # Stage 0 (opt-in: --config.stages=stage0,stage1,stage2): the tower and the LLM start random;
    # pretrain them on the captions (image-caption InfoNCE + caption LM, training/contrastive.py), then
    # freeze them as the paper's pretrained ones. Measured in the README: not yet better at this budget.
    c.stage0.data.json_path = "{workdir}/data/pretrain.json"
    c.stage0.update(batch_size=32, epochs=1, targets_per_row=16, checkpoint_every=50)
    c.stage0.optim.update(lr=2e-3, warmup_ratio=0.05)
    c.stage0.data.max_length = 128

    c.stage1.data.json_path = "{workdir}/data/pretrain.json"
    c.stage1.update(batch_size=32, epochs=1, targets_per_row=16, checkpoint_every=50)  # captions: <= 12 targets
    c.stage1.optim.lr = 2e-3
    c.stage1.data.max_length = 128

    c.stage2.data.json_path = "{workdir}/data/instruct.json"
    # 16 rows per step: twice the optimizer steps of 32 for the same compute; the tiny LLM learns far more
    # per minute from more, smaller steps (README: 56 % at 32 rows x 282 steps, 94 % at 16 x 564).
    c.stage2.update(batch_size=16, epochs=3, targets_per_row=16, checkpoint_every=200)  # answers: <= 12 targets
    c.stage2.optim.update(lr=1e-3, warmup_ratio=0.05)
    c.stage2.data.max_length = 192  # the longest synthetic conversation is 189 tokens
    c.stage2.data.packing = False  # rows of 192 hold one sample of this data: packing saves little here

    c.eval.update(json_path="{workdir}/data/eval.json", max_examples=300, max_new_tokens=6)
    c.log_every = 10
    for stage in (c.stage0, c.stage1, c.stage2):
        stage.eager_fallback = False  # no demo row exceeds targets_per_row: skip compiling the fall-back
    if arg == "lora":
        _lora(c)
    return c


def _lora(c):
    """Stage 2 as the original's LoRA recipe: adapters on every LLM block linear + the projector,
    the projector at its own learning rate; the LLM base stays frozen. LoRA adapts a pretrained LLM,
    so this variant first runs stage 0 (a random frozen base cannot learn: 21 % held-out, below
    chance); the adapters start at B = 0 and train in stage 2 only. Stage 0 reads the captions in the
    chat (v1) template, so the frozen base learns to end an answer with </s>, as Vicuna does; LoRA
    leaves lm_head frozen and cannot teach it that."""
    c.arg = "lora"
    c.stages = "stage0,stage1,stage2"
    c.stage0.data.template = "v1"
    c.stage0.data.max_length = 192  # the v1 system prompt + 64 image tokens + caption
    c.synthetic.questions = (2, 4)  # the data and batch this variant was measured with (README)
    c.stage2.batch_size = 32
    c.lora.update(rank=32, alpha=64.0, dropout=0.05)
    c.stage2.trainable = "projector,lora"
    c.stage2.optim.update(lr=5e-3, mm_projector_lr=1e-3)
