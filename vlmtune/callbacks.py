"""Trainer callbacks: a metrics JSONL file, and complete checkpoints (config + processor inside)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from transformers import TrainerCallback

from vlmtune.config import RunConfig, save_config


class JsonlMetrics(TrainerCallback):
    """Appends every logged dict (loss, learning rate, grad norm, eval metrics) to `metrics.jsonl`.

    Only the main process writes. Lines carry `step`, `epoch` and wall time, so a report can be
    drawn from this file alone, whatever tracker was used.
    """

    def __init__(self, path: Path):
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "epoch": state.epoch, "time": time.time(), **logs}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


class CompleteCheckpoints(TrainerCallback):
    """Writes the resolved config and the processor (tokenizer, chat template) into every
    `checkpoint-N` folder, so each checkpoint is usable on its own by eval, chat and merge."""

    def __init__(self, config: RunConfig, processor):
        self.config = config
        self.processor = processor

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            save_config(self.config, folder)
            self.processor.save_pretrained(folder)
