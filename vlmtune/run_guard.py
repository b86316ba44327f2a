"""What stops a training run early, and how: signals, divergence, and bad data met mid-run.

- SIGINT (Ctrl-C) or SIGTERM: the current step finishes, a complete checkpoint is saved, and the
  run ends with exit code 130 or 143 and the command that resumes it. A second signal aborts at
  once; a checkpoint being written then is discarded whole (see `VLMTrainer._save_checkpoint`).
- A non-finite loss or gradient norm: the run stops before the optimizer applies it, with the
  step, the last good checkpoint and what to try; nothing is written to `final/`.
- A sample that cannot be read or encoded any more (an image deleted or corrupted after the
  pre-flight check) follows `data.on_bad_sample`: `skip` lists it in `rejected_train.jsonl` and
  trains on the next one, `error` saves a checkpoint and stops with `FILE:INDEX`.
"""

from __future__ import annotations

import json
import math
import os
import signal
from collections import deque
from pathlib import Path
from statistics import median

import torch
from transformers import TrainerCallback

from vlmtune.errors import BadSampleError, DataError, Diverged

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class GracefulStop(TrainerCallback):
    """The first SIGINT/SIGTERM asks the Trainer to save and stop after the current step; the
    second aborts. Under several processes the ranks agree at each step end (one all-reduce), so
    they all stop at the same step and save one checkpoint together."""

    def __init__(self, log=print):
        self.signum: int | None = None
        self.log = log
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        for signum in EXIT_CODES:
            self._previous[signum] = signal.signal(signum, self._handle)

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
            self.log(f"\n{signal.Signals(signum).name}: stopping after this step and saving a checkpoint "
                     "(Ctrl-C again to abort at once, without saving)")
            return
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(EXIT_CODES[signum])

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signum, 130)

    def _agreed(self) -> bool:
        stop = self.signum is not None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
            flag = torch.tensor([1.0 if stop else 0.0], device=device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            stop = bool(flag.item())
            if stop and self.signum is None:
                self.signum = signal.SIGTERM
        return stop

    def on_step_end(self, args, state, control, **kwargs):
        if self._agreed():
            control.should_save = True
            control.should_training_stop = True


class DivergenceGuard:
    """Checks each loss and each gradient norm; raises `Diverged` on a non-finite one.

    Under fp16 loss scaling an overflowing gradient is expected now and then (the scaler skips that
    step and lowers its scale), so up to `fp16_patience` overflowing steps in a row are let through.
    `max_loss_spike` warns when a loss exceeds that many times the median of the recent ones.
    """

    def __init__(self, max_loss_spike: float | None, fp16_scaling: bool, log=print, fp16_patience: int = 20):
        self.max_loss_spike = max_loss_spike
        self.fp16_scaling = fp16_scaling
        self.fp16_patience = fp16_patience
        self.log = log
        self.recent: deque[float] = deque(maxlen=50)
        self.overflows = 0

    def loss(self, value: float, step: int) -> None:
        if not math.isfinite(value):
            raise Diverged(f"training diverged at step {step}: the loss is {value}")
        if self.max_loss_spike and len(self.recent) >= 5:
            typical = median(self.recent)
            if typical > 0 and value > self.max_loss_spike * typical:
                self.log(f"warning: step {step}: loss {value:.4g} is {value / typical:.1f}x the median of the "
                         f"last {len(self.recent)} ({typical:.4g}), above train.max_loss_spike={self.max_loss_spike}")
        self.recent.append(value)

    def grad_norm(self, value: float, step: int) -> None:
        if math.isfinite(value):
            self.overflows = 0
            return
        self.overflows += 1
        if self.fp16_scaling and self.overflows <= self.fp16_patience:
            return
        extra = f" for {self.overflows} steps in a row, after fp16 loss scaling backed off" if self.fp16_scaling else ""
        raise Diverged(f"training diverged at step {step}: the gradient norm is {value}{extra}")


def divergence_advice(config, last_checkpoint: str | None) -> str:
    t = config.train
    where = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was saved before it"
    return (f"; {where}. Nothing was written to final/. Try a lower train.learning_rate (now {t.learning_rate:g}), "
            f"gradient clipping with train.max_grad_norm (now {t.max_grad_norm:g}; 1.0 is usual)"
            + (", or bf16 instead of fp16" if config.model.dtype == "fp16" else "")
            + ", then start again (or resume from that checkpoint with train.resume=PATH).")


class GuardedSamples(torch.utils.data.Dataset):
    """Wraps a training dataset so that a sample failing to load follows `data.on_bad_sample`.

    `skip`: the failure is appended to `rejected` as one JSON line (source, reason) and the next
    sample in the file is returned instead, or None with `substitute=False` (packs leave it out).
    `error`: `BadSampleError` naming FILE:INDEX.
    """

    CAUGHT = (OSError, ValueError, SyntaxError, DataError)  # PIL reports broken files with all of these

    def __init__(self, dataset, samples, policy: str, rejected: Path, substitute: bool = True):
        self.dataset = dataset
        self.substitute = substitute
        self.samples = samples
        self.policy = policy
        self.rejected = Path(rejected)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name):  # the wrapped dataset's extras (e.g. packing's lengths)
        if name in ("dataset", "samples", "policy", "rejected", "substitute"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, i: int):
        for attempt in range(len(self.dataset)):
            j = (i + attempt) % len(self.dataset)
            try:
                return self.dataset[j]
            except self.CAUGHT as e:
                reason = f"{type(e).__name__}: {e}"
                source = self._source(j)
                if self.policy != "skip":
                    raise BadSampleError(f"{source}: cannot be loaded during training ({reason})") from None
                self._reject(source, reason)
                if not self.substitute:
                    return None
        raise BadSampleError(f"no training sample can be loaded any more; see {self.rejected}")

    def _source(self, j: int) -> str:
        sample = self.samples[j] if self.samples is not None and j < len(self.samples) else None
        return getattr(sample, "source", "") or f"training sample {j}"

    def _reject(self, source: str, reason: str) -> None:
        print(f"skipping {source}: {reason} (listed in {self.rejected})", flush=True)
        line = json.dumps({"source": source, "problems": [reason], "during": "training"}, ensure_ascii=False)
        fd = os.open(self.rejected, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (line + "\n").encode("utf-8"))
        finally:
            os.close(fd)
