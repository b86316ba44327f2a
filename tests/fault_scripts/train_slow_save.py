"""`train_slow_save.main(ARGS)`: the `vlmtune` command, except that writing a checkpoint pauses
for VLMTUNE_TEST_SAVE_SLEEP seconds (default 60) after its RNG state, so that a test can kill or
interrupt the process while a checkpoint is half written."""

import os
import time

from vlmtune.cli import main as cli_main
from vlmtune.trainer import VLMTrainer


def main(args: list[str]) -> int:
    real = VLMTrainer._save_rng_state

    def slow(self, output_dir):
        real(self, output_dir)
        time.sleep(float(os.environ.get("VLMTUNE_TEST_SAVE_SLEEP", "60")))

    VLMTrainer._save_rng_state = slow
    return cli_main(args)
