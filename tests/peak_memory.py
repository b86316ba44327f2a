"""Measure the peak tensor memory of one training step, on any device, CPU included.

    from peak_memory import measure_training_peak    # tests/ on sys.path, as in the tests
    peak = measure_training_peak(load_config("configs/demo.yaml", ["train.max_steps=3"]), step=2)

`vlmtune plan` estimates the peak accelerator memory of a training step; this is what its estimate
is checked against (tests/test_plan.py, bench/plan_validation.py). On a CUDA device the figure
would be `torch.cuda.max_memory_allocated()`. The CPU has no such counter, and the usual stand-in,
the process's peak resident set size, measures something else: it includes the Python interpreter
and every imported library (about a gigabyte with torch and transformers), pages that glibc's
allocator keeps after tensors are freed, and mmapped files; and it misses nothing it should catch,
but it cannot say which part is tensors. So the measurement here counts tensor bytes, as the CUDA
counter does:

- The step runs under `torch.profiler` with `profile_memory=True`. Then c10's CPU allocator
  reports every allocation and free to the profiler with its running total of the bytes it
  allocated since profiling began (`total_allocated` of each allocation event): the timeline of
  tensor memory, temporaries inside ops included (what a kernel allocates through ATen).
- That total starts at zero when profiling starts, so what already lives when the measured step
  begins (weights, optimizer state, the batch) is added as a baseline: the bytes of every distinct
  tensor storage alive at that moment, found through the garbage collector (each storage once,
  however many views share it), except those that lived before training began (whatever else
  the process holds, e.g. a test session's fixtures). Weights loaded from safetensors by mmap are
  counted there too.
- peak = baseline + the highest running total inside the step, minus the total at its start.

The profiler runs only around the measured optimizer step (`step`, counted from 1; the default 2 is
the first step in which AdamW's state already exists, i.e. a steady-state step), so its overhead
is small. A memory block allocated before the step and freed inside it is not reported by the
profiler (it warns about it); the figure is then an upper bound, by at most the size of such
blocks (in practice: none; the previous step's gradients are freed before the next step begins).
"""

from __future__ import annotations

import gc
from dataclasses import dataclass

import torch

STEP_MARK = "vlmtune_measured_step"


@dataclass
class PeakMeasurement:
    peak_bytes: int  # tensor bytes at the highest point of the measured step
    baseline_bytes: int  # tensor bytes alive when the step began (weights, optimizer state, batch)
    step: int  # the optimizer step measured (1-based)
    parameter_bytes: int  # bytes of the model's parameters (each storage once)
    optimizer_bytes: int  # bytes of the optimizer's state when the step began
    batch_shape: tuple[int, int]  # (samples, padded length) of the measured step's batch
    padded: bool  # whether that batch holds padding (samples of different lengths)

    @property
    def step_bytes(self) -> int:
        """What the step added on top of the baseline at its highest point."""
        return self.peak_bytes - self.baseline_bytes


def live_storages(device: str = "cpu") -> dict[tuple[int, int], int]:
    """(address, size) -> bytes of every distinct tensor storage on `device` that Python can reach."""
    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        try:
            # issubclass(type(...)): isinstance would call __class__ on lazy module proxies, which warn
            if not issubclass(type(obj), torch.Tensor) or obj.device.type != device:
                continue
            storage = obj.untyped_storage()
        except Exception:  # noqa: BLE001 - some tensor subclasses (fake, sparse) have no plain storage
            continue
        seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
    return {(ptr, n): n for ptr, n in seen.items()}


def _storage_bytes(tensors) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def _optimizer_tensors(optimizer):
    if optimizer is None:
        return []
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
    return [v for state in inner.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


def step_marker(step: int, exclude: set | None = None):
    """A TrainerCallback that profiles optimizer step `step` and marks it in the profile.

    It starts `torch.profiler` (CPU activity, memory on) when the step begins and stops it when the
    step ends (after `optimizer.step()` and `zero_grad()`), recording the baseline in between.

    Args:
        exclude: storages (`live_storages` keys) that lived before training began, e.g. other
            models in a test process: not part of this run's baseline.
    """
    from torch.profiler import ProfilerActivity, profile, record_function
    from transformers import TrainerCallback

    class StepMarker(TrainerCallback):
        def __init__(self):
            self.profiler = None
            self.range = None
            self.baseline = self.parameter_bytes = self.optimizer_bytes = 0
            self.batch_shape, self.padded = (0, 0), False

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            model.register_forward_pre_hook(self._see_batch, with_kwargs=True)

        def _see_batch(self, module, args, kwargs):
            if self.range is not None and module.training and "input_ids" in kwargs:
                mask = kwargs.get("attention_mask")
                self.batch_shape = tuple(kwargs["input_ids"].shape)
                self.padded = mask is not None and not bool(mask.all())

        def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            if state.global_step + 1 != step:
                return
            gc.collect()
            self.baseline = sum(n for key, n in live_storages("cpu").items() if key not in (exclude or ()))
            self.parameter_bytes = _storage_bytes(model.parameters()) if model is not None else 0
            self.optimizer_bytes = _storage_bytes(_optimizer_tensors(optimizer))
            self.profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self.profiler.__enter__()
            self.range = record_function(STEP_MARK)
            self.range.__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            if self.range is not None:
                self.range.__exit__(None, None, None)
                self.profiler.__exit__(None, None, None)
                self.range = None

    return StepMarker()


def _walk(nodes):
    stack = list(nodes)
    while stack:
        node = stack.pop()
        yield node
        stack.extend(node.children)


def step_peak_from_profile(profiler) -> int:
    """The highest running total of allocated bytes inside the marked step, minus the total at its start."""
    from torch._C._profiler import _EventType

    events = list(_walk(profiler.profiler.kineto_results.experimental_event_tree()))
    marks = [e for e in events if e.tag == _EventType.TorchOp and e.name == STEP_MARK]
    if not marks:
        raise RuntimeError("the measured step left no mark in the profile; did training reach that step?")
    start, end = marks[0].start_time_ns, marks[0].end_time_ns
    allocations = sorted((e.start_time_ns, e.extra_fields.total_allocated) for e in events
                         if e.tag == _EventType.Allocation and e.extra_fields.device.type == torch.device("cpu").type)
    before = [total for t, total in allocations if t < start]
    inside = [total for t, total in allocations if start <= t <= end]
    at_start = before[-1] if before else 0
    return max([at_start, *inside]) - at_start


def measure_training_peak(config, step: int = 2) -> PeakMeasurement:
    """Run `vlmtune.train.train(config)` and measure optimizer step `step` (config.train.max_steps >= step).

    Args:
        config: a `RunConfig` that trains on the CPU (grad_accum 1: one forward/backward per step).
        step: the optimizer step to measure, 1-based; 2 is the first with the optimizer state in place.
    """
    from vlmtune.train import train

    if config.train.max_steps < step:
        raise ValueError(f"train.max_steps={config.train.max_steps} never reaches the measured step {step}")
    gc.collect()
    marker = step_marker(step, exclude=set(live_storages("cpu")))
    train(config, callbacks=[marker])
    if marker.profiler is None:
        raise RuntimeError(f"training ended before optimizer step {step}")
    step_bytes = step_peak_from_profile(marker.profiler)
    return PeakMeasurement(peak_bytes=marker.baseline + step_bytes, baseline_bytes=marker.baseline, step=step,
                           parameter_bytes=marker.parameter_bytes, optimizer_bytes=marker.optimizer_bytes,
                           batch_shape=marker.batch_shape, padded=marker.padded)
