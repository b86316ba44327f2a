"""`train_then_die.main([STEP, key=value, ...])`: `vlmtune train` with dotted overrides that kills
its own process with SIGKILL right after step STEP is logged, as a lost machine or the OOM killer
would. Tests run it in a child process (`conftest.start_cli(..., target=...)`) to stop a real
training process at a known point (after a checkpoint, with some steps logged beyond it), which
polling from outside cannot do reliably on a fast tiny model."""

import os
import signal

from transformers import TrainerCallback

from vlmtune.config import load_config
from vlmtune.train import train


class DieAfterStep(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.global_step >= self.step and logs and "loss" in logs:
            os.kill(os.getpid(), signal.SIGKILL)


def main(args: list[str]) -> int:
    train(load_config(None, args[1:]), callbacks=[DieAfterStep(int(args[0]))])
    return 0
