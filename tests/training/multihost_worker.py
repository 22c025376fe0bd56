"""One process of the multi-host test: 3 train steps on a global mesh, losses printed as JSON
(full stage 2, or with LORA=1 in the environment a LoRA stage 2 on an int8 base).

Each process feeds only its own rows of the global batch (`make_array_from_process_local_data`);
run alone it feeds all of them.
"""

import json
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from llava_jax.parallel.distributed import initialize  # noqa: E402

initialize()

import jax  # noqa: E402
from train_fixtures import SMALL, build, random_batch  # noqa: E402

ROWS = 8
if os.environ.get("LORA") == "1":  # stage 2 as LoRA: adapters (dropout on) over an int8 base
    cfg = SMALL.with_lora(lora_rank=4, lora_alpha=8.0, lora_dropout=0.1, quantized_base="int8")
    setup = build((2, 2, 1), jax.devices(), trainable="projector,lora", cfg=cfg)
else:
    setup = build((2, 2, 1), jax.devices())
n, i = jax.process_count(), jax.process_index()
state = setup.state
losses = []
with jax.set_mesh(setup.mesh):
    for seed in range(3):
        full = random_batch(ROWS, seed=seed)
        local = {k: v[i * ROWS // n : (i + 1) * ROWS // n] for k, v in full.items()}
        state, m = setup.step(state, setup.put(local))
        losses.append(float(m["loss"]))
from llava_jax.parallel.mesh import make_mesh  # noqa: E402

# A DCN factor: the data axis across processes (slices / nodes), fsdp inside each.
hybrid = make_mesh((1, jax.local_device_count(), 1), (n, 1, 1))
owners = [[d.process_index for d in row] for row in hybrid.devices[:, :, 0]]
print(
    "LOSSES "
    + json.dumps({"process": i, "of": n, "devices": jax.device_count(), "losses": losses, "dcn_owners": owners}),
    flush=True,
)
