"""`python train_slow_save.py train CONFIG key=value ...`: the `vlmtune` command, except that
writing a checkpoint pauses for VLMTUNE_TEST_SAVE_SLEEP seconds (default 60) after its RNG state,
so that a test can kill or interrupt the process while a checkpoint is half written."""

import os
import sys
import time

from vlmtune.cli import main
from vlmtune.trainer import VLMTrainer

_real = VLMTrainer._save_rng_state


def _slow(self, output_dir):
    _real(self, output_dir)
    time.sleep(float(os.environ.get("VLMTUNE_TEST_SAVE_SLEEP", "60")))


VLMTrainer._save_rng_state = _slow

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
