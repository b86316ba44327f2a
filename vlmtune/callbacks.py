"""Trainer callback: the metrics JSONL file."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from transformers import TrainerCallback


class JsonlMetrics(TrainerCallback):
    """Appends every logged dict (loss, learning rate, grad norm, eval metrics) to `metrics.jsonl`.

    Only the main process writes. Lines carry `step`, `epoch` and wall time, so a report can be
    drawn from this file alone, whatever tracker was used. A non-finite value is written as null
    with its text under `nonfinite` ({"loss": null, "nonfinite": {"loss": "nan"}}), never as 0.
    """

    def __init__(self, path: Path):
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "epoch": state.epoch, "time": time.time(), **logs}
        # NaN and infinity are not JSON: they are written as null and named under "nonfinite"
        bad = [k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            record["nonfinite"] = {k: str(record[k]) for k in bad}
            record.update(dict.fromkeys(bad))
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
