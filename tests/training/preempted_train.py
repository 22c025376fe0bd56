"""`python -m llava_jax.train`, killed like a preempted host right after the checkpoint of one step.

    python tests/training/preempted_train.py STEP --workdir=DIR [--config.key=value ...]

The loop's step hooks (`training.loop.StepHook`) are called after each step's checkpoint is saved;
the hook installed here waits for that checkpoint to be written and then SIGKILLs this process.
"""

import os
import signal
import sys

from absl import app

from llava_jax import train
from llava_jax.training import loop


def kill_after(step: int) -> loop.StepHook:
    def hook(done: int, checkpointer) -> None:
        if done == step:
            checkpointer.wait()
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


if __name__ == "__main__":
    kill = kill_after(int(sys.argv.pop(1)))
    train_stage = loop.train_stage

    def train_stage_with_kill(*args, hooks=(), **kwargs):
        return train_stage(*args, hooks=(*hooks, kill), **kwargs)

    loop.train_stage = train_stage_with_kill
    app.run(train.main)
