"""Exact resume for every family and method: a training process is killed with SIGKILL after its
checkpoint at step 2 (step 3 already logged), resumed with `train.resume=true`, and compared with
a run that was never interrupted: the same loss at every step, each step logged once, and the
same final weights, bit for bit (fp32 on CPU, one thread, deterministic)."""

from __future__ import annotations

import signal
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import base_overrides, read_jsonl, start_cli
from vlmtune.config import load_config
from vlmtune.train import train

KILLER = "fault_scripts.train_then_die:main"
FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "minicpmv2", "minicpmv2_6", "minicpmv4_6")
METHODS = {
    "lora": ["train.method=lora"],
    "full": ["train.method=full"],
    "lora-vision-modules_to_save": ["train.method=lora", "train.freeze_vision=false",
                                    "lora.modules_to_save=[embed_tokens]"],
}


def overrides(model: Path, data: str, out: Path, method: str, *extra: str) -> list[str]:
    return base_overrides(model, data, out, "train.max_steps=4", "train.save_steps=2", "train.lr_scheduler=linear",
                          "train.learning_rate=0.01", *METHODS[method], *extra)


@contextmanager
def one_thread():
    """The killed subprocess runs with OMP_NUM_THREADS=1; matching it keeps every sum in the same order."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def losses(run: Path) -> dict[int, float]:
    records = [r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), f"a step is logged twice: {steps}"
    return {r["step"]: r["loss"] for r in records}


def final_tensors(run: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted((run / "final").glob("*.safetensors")):
        tensors.update(load_file(file))
    assert tensors, f"no weights in {run / 'final'}"
    return tensors


def kill_after_step(step: int, args: list[str]) -> None:
    """Train in a separate process that SIGKILLs itself once `step` is logged."""
    child = start_cli([str(step), *args], target=KILLER)
    _, err = child.communicate(timeout=300)
    assert child.returncode == -signal.SIGKILL, err[-3000:]


@pytest.mark.long
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("family", FAMILIES)
def test_killed_run_resumes_exactly(tiny_model_dir, caption_data, tmp_path, capsys, family, method):
    model, data = tiny_model_dir(family), caption_data["train"]
    killed, straight = tmp_path / "killed", tmp_path / "straight"

    kill_after_step(3, overrides(model, data, killed, method))
    assert (killed / "checkpoint-2" / "checkpoint.json").is_file()
    assert not (killed / "checkpoint-4").exists() and not (killed / "final").exists()
    assert sorted(losses(killed)) == [1, 2, 3]

    with one_thread():
        train(load_config(None, overrides(model, data, killed, method, "train.resume=true")))
        assert f"resuming from {killed / 'checkpoint-2'} (step 2)" in capsys.readouterr().out
        train(load_config(None, overrides(model, data, straight, method)))

    resumed, reference = losses(killed), losses(straight)
    assert sorted(resumed) == [1, 2, 3, 4]
    assert resumed == reference  # exact: steps 1-2 from the killed process, 3-4 after the resume
    a, b = final_tensors(killed), final_tensors(straight)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"final weights differ from the uninterrupted run: {different[:5]}"
