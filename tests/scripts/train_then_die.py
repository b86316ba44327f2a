"""`python train_then_die.py STEP key=value ...`: `vlmtune train` with dotted overrides that kills
itself with SIGKILL right after step STEP is logged, as a lost machine or the OOM killer would.

The tests use it to stop a real training process at a known point (after a checkpoint, with
some steps logged beyond it), which polling from outside cannot do reliably on a fast tiny model.
"""

import os
import signal
import sys

from transformers import TrainerCallback

from vlmtune.config import load_config
from vlmtune.train import train


class DieAfterStep(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.global_step >= self.step and logs and "loss" in logs:
            os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    train(load_config(None, sys.argv[2:]), callbacks=[DieAfterStep(int(sys.argv[1]))])
