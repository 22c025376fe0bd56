"""Run metrics: JSONL in the workdir (always), TensorBoard when tensorboardX is installed, a tqdm
progress bar, and a model-FLOPs utilisation estimate. Only process 0 writes."""

from __future__ import annotations

import json
import time
from typing import Any

import jax
import numpy as np

from llava_jax.paths import PathLike, as_path, open_append

# Dense bf16 peak FLOP/s per device, by device_kind substring (vendor datasheets).
PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L4": 121e12,
    "A10G": 125e12,
    "TPU v6": 918e12,
    "TPU v5p": 459e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v4": 275e12,
}


def peak_flops(device=None) -> float | None:
    kind = (device or jax.devices()[0]).device_kind
    for key, value in PEAK_FLOPS.items():
        if key.lower() in kind.lower():
            return value
    return None


def step_flops(cfg, *, tokens: int, images: int, llm_trainable: bool, seq_len: int) -> float:
    """Model FLOPs of one training step (matmuls; causal attention counted once per pair).

    LLM: forward 2N per token, backward 2N for activation gradients, +2N for weight gradients when
    the LLM trains. Vision tower: forward only (frozen, under stop_gradient).
    """
    llm, vis = cfg.llm, cfg.vision
    d, f, layers = llm.hidden_size, llm.intermediate_size, llm.num_layers
    kv = llm.num_kv_heads * llm.head_dim
    n_llm = layers * (2 * d * d + 2 * d * kv + 3 * d * f) + d * llm.vocab_size
    attn = layers * 2 * seq_len * d  # per token: QK^T and AV, causal half of 2 * 2 * L * d
    passes = 3 if llm_trainable else 2
    llm_flops = passes * tokens * (2 * n_llm + 2 * attn)
    n_vis = vis.layers_needed() * (4 * vis.hidden_size**2 + 2 * vis.hidden_size * vis.intermediate_size)
    p = vis.num_positions
    vis_flops = images * (2 * n_vis * p + vis.layers_needed() * 4 * p * p * vis.hidden_size)
    proj = 2 * vis.hidden_size * d + (2 * d * d if cfg.projector == "mlp2x_gelu" else 0)
    return float(llm_flops + vis_flops + 3 * images * vis.num_image_tokens * proj)


class MetricWriter:
    def __init__(self, workdir: PathLike, *, total_steps: int, desc: str, initial: int = 0):
        self.enabled = jax.process_index() == 0
        self.file = None
        self.tb = None
        self.bar = None
        if not self.enabled:
            return
        workdir = as_path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        self.file = open_append(workdir / "metrics.jsonl")
        try:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(workdir / "tensorboard"))
        except ImportError:
            pass
        from tqdm import tqdm

        self.bar = tqdm(total=total_steps, initial=initial, desc=desc, unit="step", dynamic_ncols=True)

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), "time": time.time()}
        row.update({k: _scalar(v) for k, v in metrics.items()})
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k not in ("step", "time"):
                    self.tb.add_scalar(k, v, step)
        if self.bar is not None and "loss" in row:
            self.bar.set_postfix(
                {k: f"{row[k]:.4g}" for k in ("loss", "lr", "effective_tokens_per_s", "padding_fraction") if k in row}
            )

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def _scalar(v):
    if isinstance(v, (int, float, str)) or v is None:
        return v
    a = np.asarray(v)
    return a.item() if a.size == 1 else a.tolist()
