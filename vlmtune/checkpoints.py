"""Checkpoints that are complete or absent, and exact restores from them.

A checkpoint is written under a temporary name, closed with `checkpoint.json` (the step and the
size of every file in it), and only then renamed to `checkpoint-N`. A folder without that file,
or whose files differ from it in size, is incomplete: resume skips it and says so.

Restoring is strict. Every tensor the live model trains (all of them for full training, the
adapter and `modules_to_save` for LoRA) must come from the checkpoint, and every tensor in the
checkpoint must land somewhere; anything else is an error, never a warning.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from vlmtune.errors import VlmtuneError

MARKER = "checkpoint.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class Checkpoint:
    path: Path
    step: int
    problem: str | None = None  # why it is incomplete; None when complete

    @property
    def complete(self) -> bool:
        return self.problem is None


def file_sizes(folder: Path) -> dict[str, int]:
    """Size of every file under `folder` (relative names), the marker excluded."""
    sizes = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = Path(root) / name
            rel = path.relative_to(folder).as_posix()
            if rel != MARKER:
                sizes[rel] = path.stat().st_size
    return dict(sorted(sizes.items()))


def mark_complete(folder: Path, step: int) -> None:
    """Write the marker (after syncing every file to disk), then sync the marker itself."""
    for root, _, files in os.walk(folder):
        for name in files:
            with open(Path(root) / name, "rb") as f:
                os.fsync(f.fileno())
    marker = folder / MARKER
    with marker.open("w", encoding="utf-8") as f:
        json.dump({"step": step, "files": file_sizes(folder)}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def inspect(path: Path) -> Checkpoint:
    """A checkpoint folder and, if it is incomplete, why."""
    match = _NAME.match(path.name)
    step = int(match.group(1)) if match else -1
    marker = path / MARKER
    if not marker.is_file():
        return Checkpoint(path, step, f"no {MARKER} (its save did not finish)")
    try:
        recorded = json.loads(marker.read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError, TypeError):
        return Checkpoint(path, step, f"{MARKER} is unreadable")
    actual = file_sizes(path)
    for name, size in recorded.items():
        if name not in actual:
            return Checkpoint(path, step, f"{name} is missing")
        if actual[name] != size:
            return Checkpoint(path, step, f"{name} is {actual[name]} bytes, {size} were written")
    return Checkpoint(path, step)


def checkpoints(run_dir: Path) -> list[Checkpoint]:
    """Every `checkpoint-N` folder of a run, oldest first."""
    if not run_dir.is_dir():
        return []
    found = [inspect(p) for p in run_dir.iterdir() if p.is_dir() and _NAME.match(p.name)]
    return sorted(found, key=lambda c: c.step)


def newest_complete(run_dir: Path) -> tuple[Checkpoint | None, list[Checkpoint]]:
    """The newest complete checkpoint, and the incomplete ones newer than it (skipped)."""
    skipped = []
    for ckpt in reversed(checkpoints(run_dir)):
        if ckpt.complete:
            return ckpt, skipped
        skipped.append(ckpt)
    return None, skipped


def require_complete(folder: Path) -> Path:
    """`folder`, unless it is a `checkpoint-N` whose save did not finish (then an error)."""
    if _NAME.match(folder.name):
        ckpt = inspect(folder)
        if not ckpt.complete:
            raise VlmtuneError(f"{folder}: incomplete checkpoint ({ckpt.problem}); use another one, or the "
                               "run folder for its final/ or newest complete checkpoint")
    return folder


def resolve_weights(folder: Path, unfinished: bool = True, log=print) -> Path:
    """The one rule by which every command turns a folder into weights to load: a weights folder
    (holding `vlmtune.yaml` and an adapter or a model config) is itself; a run folder gives its
    `final/`, else (with `unfinished`; merge asks for a checkpoint by name instead) its newest
    complete checkpoint, naming incomplete ones it passed over. An incomplete `checkpoint-N` is
    refused.

    Raises:
        VlmtuneError: no such folder, nothing loadable in it, or an incomplete checkpoint.
    """
    from vlmtune.config import CONFIG_NAME

    folder = Path(folder)
    if not folder.is_dir():
        raise VlmtuneError(f"{folder}: no such run or checkpoint folder")
    holds_weights = (folder / CONFIG_NAME).is_file() and any(
        (folder / name).is_file() for name in ("adapter_config.json", "config.json"))
    if holds_weights:
        return require_complete(folder)
    if (folder / "final").is_dir():
        return folder / "final"
    last, skipped = newest_complete(folder)
    if not unfinished:
        found = ", ".join(c.path.name + ("" if c.complete else " (incomplete)") for c in checkpoints(folder))
        raise VlmtuneError(f"{folder}: holds neither an adapter (adapter_config.json) nor a final/ folder (did "
                           "training finish?)" + (f"; it has {found}: pass one of those" if found else ""))
    for ckpt in skipped:
        log(f"skipping {ckpt.path}: incomplete ({ckpt.problem})")
    if last is None:
        raise VlmtuneError(f"{folder}: holds neither final/ nor a complete checkpoint-N/ nor a {CONFIG_NAME} "
                           "with weights; pass a run folder, one of its checkpoints, or --model")
    log(f"{folder} has no final/ (training did not finish): using its newest complete checkpoint, {last.path.name}")
    return last.path


def trainer_state(folder: Path) -> dict:
    path = folder / "trainer_state.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


# -- exact restore ----------------------------------------------------------------------------

def _read_tensors(folder: Path, single: str, index: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if (folder / single).is_file():
        return load_file(folder / single, device="cpu")
    if (folder / index).is_file():
        shards = sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
        tensors = {}
        for shard in shards:
            tensors.update(load_file(folder / shard, device="cpu"))
        return tensors
    raise VlmtuneError(f"{folder}: holds neither {single} nor {index}; it is not a checkpoint of this run")


def saved_view(model) -> tuple[dict[str, torch.Tensor], str, str]:
    """The tensors a checkpoint of `model` holds, under their saved names, as views of the live
    parameters (so copying into them restores the model); plus the file names they are saved in.

    Full models are saved by `save_pretrained`, which renames some weights (transformers' checkpoint
    conversion: e.g. Qwen2-VL's `model.language_model.*` is saved as `model.*`); the same renaming is
    applied here. LoRA checkpoints hold peft's adapter state dict.
    """
    from peft import PeftModel

    if isinstance(model, PeftModel):
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(model), "adapter_model.safetensors", "adapter_model.safetensors.index.json"
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, model.state_dict()), "model.safetensors", "model.safetensors.index.json"


def restore_exact(model, folder: Path) -> int:
    """Copy the checkpoint in `folder` into `model`; every tensor must match by name and shape.

    Returns the number of tensors restored. Raises VlmtuneError on any missing, unexpected or
    mis-shaped tensor, with the first few names.
    """
    expected, single, index = saved_view(model)
    saved = _read_tensors(folder, single, index)
    own = {t.data_ptr() for t in (*model.parameters(), *model.buffers())}
    copies = [n for n, t in expected.items() if t.numel() and t.data_ptr() not in own]
    if copies:
        raise VlmtuneError(f"{folder}: cannot restore this model exactly: its saved tensors ({copies[0]}, ...) "
                           "are converted copies, not views of the weights; resume is not supported for it")
    missing = sorted(set(expected) - set(saved))
    # tied weights (lm_head = embed_tokens) are saved once; the other name shares its storage
    restored_ptrs = {expected[n].data_ptr() for n in expected if n in saved}
    missing = [n for n in missing if expected[n].data_ptr() not in restored_ptrs]
    unexpected = sorted(set(saved) - set(expected))
    shapes = [n for n in expected if n in saved and saved[n].shape != expected[n].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensor(s) of the model are not in it ({', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} tensor(s) in it match nothing in the model ({', '.join(unexpected[:3])})")
        if shapes:
            n = shapes[0]
            parts.append(f"{len(shapes)} shape mismatch(es) ({n}: {tuple(saved[n].shape)} saved, "
                         f"{tuple(expected[n].shape)} in the model)")
        raise VlmtuneError(f"{folder}: checkpoint does not match the model being trained: {'; '.join(parts)}. "
                           "Resume with the config the run was started with (RUN/vlmtune.yaml).")
    with torch.no_grad():
        for name, tensor in saved.items():
            expected[name].copy_(tensor)
    return len(saved)


# -- metrics.jsonl on resume ------------------------------------------------------------------

def trim_metrics(path: Path, step: int) -> int:
    """Drop the records of steps after `step` (logged by a run that died after its last
    checkpoint, and logged again by the resumed run). Returns how many were dropped."""
    if not path.is_file():
        return 0
    from vlmtune.fileio import atomic_write_text

    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            record_step = json.loads(line).get("step", 0)
        except ValueError:  # a line cut short by a kill
            dropped += 1
            continue
        if record_step > step:
            dropped += 1
        else:
            kept.append(line)
    if dropped:
        atomic_write_text(path, "".join(line + "\n" for line in kept))
    return dropped
