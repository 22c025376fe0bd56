"""`loss_reduction='original'` reproduces the original's loss exactly: HF Trainer + DeepSpeed take
LlamaForCausalLM's token mean (torch CrossEntropyLoss over the shifted labels) of each device's
micro-batch, divide it by the number of accumulation steps, and average the gradients over the
data-parallel devices. The reference below does exactly that in torch.

Layout of a global batch of B rows (llava_jax.training.step): micro-batch m holds rows m, m+n, m+2n, ...
(n micro-batches), and within a micro-batch device d holds the d-th consecutive block of its rows.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from train_fixtures import build, random_batch

from llava_jax.data.tokenizer import IGNORE_INDEX
from llava_jax.training.loss import group_mean_sums, reduce_sums, shifted_targets
from llava_jax.training.step import _micro_batches

torch = pytest.importorskip("torch")


def _device_groups(rows: int, n: int, devices: int) -> list[list[list[int]]]:
    """groups[m][d] = global row indices of micro-batch m on device d."""
    per = rows // (n * devices)
    return [[list(range(m, rows, n))[d * per : (d + 1) * per] for d in range(devices)] for m in range(n)]


def torch_original(logits: np.ndarray, labels: np.ndarray, n: int, devices: int) -> tuple[float, np.ndarray]:
    """The original's logged loss and d(loss)/d(logits), computed the HF Trainer + DeepSpeed way."""
    grads, logged = [], []
    for d in range(devices):
        leaf = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
        total = 0.0
        for m in range(n):
            rows = _device_groups(len(labels), n, devices)[m][d]
            lg, lb = leaf[rows], torch.tensor(labels[rows], dtype=torch.long)
            shift_logits = lg[..., :-1, :].contiguous().view(-1, lg.shape[-1])
            shift_labels = lb[..., 1:].contiguous().view(-1)
            loss = torch.nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)(shift_logits, shift_labels)
            (loss / n).backward()  # gradient accumulation: DeepSpeed scales each micro-step by 1/n
            total += float(loss.detach()) / n
        grads.append(leaf.grad.numpy())
        logged.append(total)
    return float(np.mean(logged)), np.mean(grads, axis=0)  # data parallel: mean over devices


def ours(logits, labels, n: int, devices: int) -> jax.Array:
    """The loss the train step builds from the same logits: sums per micro-batch, one division."""
    mbs = _micro_batches({"logits": logits, "labels": labels}, n)
    num = den = 0.0
    for m in range(n):
        a, b, _ = reduce_sums(mbs["logits"][m], shifted_targets(mbs["labels"][m]), "original", devices)
        num, den = num + a, den + b
    return num / den


def _labels(rng, rows: int, length: int, vocab: int) -> np.ndarray:
    """Targets on a random span of each row, of very different lengths (1 to length - 1)."""
    labels = np.full((rows, length), IGNORE_INDEX, np.int64)
    for r in range(rows):
        k = int(rng.integers(2, length + 1))
        labels[r, length - k :] = rng.integers(0, vocab, k)
    return labels


@pytest.mark.parametrize("n,devices", [(1, 4), (4, 2)])
def test_original_reduction_equals_torch(n, devices):
    rng = np.random.default_rng(n * 10 + devices)
    rows, length, vocab = 16, 9, 11
    logits = rng.normal(size=(rows, length, vocab)).astype(np.float32) * 3
    labels = _labels(rng, rows, length, vocab)
    ref_loss, ref_grad = torch_original(logits.astype(np.float64), labels, n, devices)
    loss_and_grad = jax.jit(jax.value_and_grad(ours), static_argnums=(2, 3))
    got, grad = loss_and_grad(jnp.asarray(logits), jnp.asarray(labels, jnp.int32), n, devices)
    np.testing.assert_allclose(float(got), ref_loss, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), ref_grad, rtol=1e-4, atol=1e-7)
    # ... and it is not the global token mean on such data
    valid = shifted_targets(jnp.asarray(labels, jnp.int32)) != IGNORE_INDEX
    if devices * n > 1:
        a, b, _ = reduce_sums(jnp.asarray(logits), shifted_targets(jnp.asarray(labels, jnp.int32)))
        assert abs(float(a / b) - ref_loss) > 1e-3 and int(valid.sum()) == int(b)


def test_group_without_targets_adds_zero_but_counts():
    row_nll = jnp.array([2.0, 4.0, 0.0, 0.0, 9.0, 3.0])
    row_count = jnp.array([1.0, 3.0, 0.0, 0.0, 2.0, 1.0])
    total, groups = group_mean_sums(row_nll, row_count, 3)
    assert float(groups) == 3
    np.testing.assert_allclose(float(total), 6.0 / 4 + 0.0 + 12.0 / 3)


def _varied_batch(rows: int, seed: int) -> dict:
    """random_batch with 1..11 targets per row instead of the same count everywhere."""
    b = random_batch(rows, seed)
    rng = np.random.default_rng(seed)
    for r in range(rows):
        idx = np.flatnonzero(b["labels"][r] != IGNORE_INDEX)
        b["labels"][r, idx[: int(rng.integers(0, len(idx) - 1))]] = IGNORE_INDEX
    return b


@pytest.mark.slow
def test_train_step_uses_the_original_reduction():
    """The step's loss and gradient norm equal torch's reduction applied to the model's own logits
    (gradient through the model: jax.vjp with torch's d(loss)/d(logits))."""
    n, devices = 2, 2
    batch = _varied_batch(8, seed=3)
    setups = [
        build((1, 2, 1), micro_batches=n, loss_reduction="original", loss_groups=devices),
        build((1, 1, 1), micro_batches=n, loss_reduction="original", loss_groups=devices),
    ]
    ref = setups[1]
    params = ref.state.params

    def logits_of(p):
        model = nnx.merge(ref.spec.graphdef, p)
        emb = model.embed(jnp.asarray(batch["input_ids"]), jnp.asarray(batch["images"]))
        hidden, _ = model.language_model.hidden(
            emb, positions=jnp.asarray(batch["positions"]), segment_ids=jnp.asarray(batch["segment_ids"])
        )
        return model.language_model.logits(hidden)

    with jax.set_mesh(ref.mesh):
        logits, vjp = jax.vjp(logits_of, params)
    ref_loss, dlogits = torch_original(np.asarray(logits, np.float64), batch["labels"].astype(np.int64), n, devices)
    (dparams,) = vjp(jnp.asarray(dlogits, jnp.float32))
    ref_norm = np.sqrt(
        sum(
            float(jnp.sum(jnp.square(g)))
            for g, t in zip(jax.tree.leaves(dparams), jax.tree.leaves(ref.mask), strict=True)
            if t
        )
    )
    for s in setups:
        with jax.set_mesh(s.mesh):
            _, m = s.step(s.state, s.put(batch))
        np.testing.assert_allclose(float(m["loss"]), ref_loss, rtol=1e-5)
        np.testing.assert_allclose(float(m["grad_norm"]), ref_norm, rtol=1e-4)
