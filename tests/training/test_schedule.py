"""The learning-rate schedule equals HF Trainer's (the original's): warmup length rounded up by
`TrainingArguments.get_warmup_steps`, then `get_cosine_schedule_with_warmup`, step by step."""

import dataclasses

import numpy as np
import pytest

from llava_jax.training import optimizer
from llava_jax.training.config_schema import optim_config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _hf_warmup(ratio: float, total: int, tmp_path) -> int:
    fields = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
    kw = {"warmup_ratio": ratio} if "warmup_ratio" in fields else {"warmup_steps": ratio}
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], **kw)
    return args.get_warmup_steps(total)


def _hf_lrs(lr: float, warmup: int, total: int) -> np.ndarray:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = transformers.get_cosine_schedule_with_warmup(opt, warmup, total)
    out = []
    for _ in range(total):  # the lr each optimizer step uses, then the scheduler steps (Trainer order)
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return np.array(out)


def _optim(ratio: float):
    o = optim_config(2e-5)
    o.warmup_ratio = ratio
    return o


@pytest.mark.parametrize("ratio,total", [(0.03, 10), (0.03, 2181), (0.03, 5197), (0.1, 25), (0.0, 7)])
def test_warmup_and_cosine_equal_hf_trainer(ratio, total, tmp_path):
    warmup = _hf_warmup(ratio, total, tmp_path)
    assert optimizer.warmup_steps(ratio, total) == warmup
    ours = optimizer.schedule(_optim(ratio), total)
    got = np.asarray(ours(np.arange(total)))
    np.testing.assert_allclose(got, _hf_lrs(2e-5, warmup, total), rtol=1e-5, atol=1e-12)
