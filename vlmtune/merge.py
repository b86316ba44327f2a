"""Merge a LoRA checkpoint into its base model, and prove the merged model computes the same logits.

    vlmtune merge runs/latex --out merged/latex               # a run folder: its final/ is merged
    vlmtune merge runs/latex/checkpoint-300 --out merged/latex --dtype bf16

Reads straight down: checkpoint folder -> vlmtune.yaml (names the base model) -> base in fp32 +
adapter -> reference logits on a small batch -> merge_and_unload -> save (safetensors, processor,
chat template, generation config) into a temporary folder beside `out` -> reload that folder
with plain transformers -> compare logits -> move it to `out`. A merge that does not reproduce
the adapter's logits within the tolerance raises and leaves nothing at `out`. A merge killed
mid-write leaves its temporary folder (named after its host and PID); the next merge beside `out`
removes it.

The comparison is done in fp32, where merging is exact up to rounding. With `--dtype bf16/fp16`
the verified fp32 weights are then cast and written again, and the written file is checked to
hold exactly the cast of the verified weights; how far the rounding moves the logits is
measured and reported, but it is not held to the tolerance (it is the cost of the dtype, not a
merge error).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Literal

import torch
from PIL import Image, ImageDraw

from vlmtune.checkpoints import require_complete, resolve_weights
from vlmtune.config import CONFIG_NAME, load_config, saved_remote_code
from vlmtune.errors import VlmtuneError
from vlmtune.fileio import clean_stale_temps, disk_full_error, remove, temp_sibling
from vlmtune.models.load import load_model, load_processor
from vlmtune.parts import RunParts, run_parts

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
FULL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
RECORD_NAME = "merge.json"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BATCH_SIZE = 2  # samples in the verification batch: enough to cover padding, cheap on CPU


def log(message: str) -> None:
    print(message, flush=True)


def find_checkpoint(path: str | Path) -> Path:
    """The folder holding the adapter: `path` itself, or for a run folder its final/ (else its newest
    complete checkpoint, `checkpoints.resolve_weights`).

    Raises:
        VlmtuneError: no such folder, a full-weights folder (nothing to merge), or a missing file.
    """
    path = Path(path)
    is_checkpoint = any((path / name).exists() for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, *FULL_WEIGHTS))
    # the rule eval, predict and chat follow, except that an unfinished run's checkpoint is named, not guessed
    path = require_complete(path) if is_checkpoint else resolve_weights(path, unfinished=False)
    if not (path / ADAPTER_CONFIG).is_file():
        full = [name for name in FULL_WEIGHTS if (path / name).exists()]
        if full:
            raise VlmtuneError(f"nothing to merge: {path} holds full weights ({full[0]}) and no adapter; "
                               "use it directly (it loads with AutoModelForImageTextToText.from_pretrained)")
        raise VlmtuneError(f"{path}: missing {ADAPTER_CONFIG}; a LoRA checkpoint holds {ADAPTER_CONFIG} and "
                           f"{ADAPTER_WEIGHTS} (written by vlmtune train)")
    if not (path / ADAPTER_WEIGHTS).is_file():
        pickled = " (it has adapter_model.bin, a pickle, which vlmtune does not load)" \
            if (path / "adapter_model.bin").exists() else ""
        raise VlmtuneError(f"{path}: missing {ADAPTER_WEIGHTS}{pickled}; the adapter weights are not there")
    if not (path / CONFIG_NAME).is_file():
        raise VlmtuneError(f"{path}: missing {CONFIG_NAME}, the run config that names the base model; "
                           "vlmtune train writes it into every checkpoint")
    return path


def check_out(out: Path) -> None:
    """`out` must not exist, or be an empty folder: a merge never overwrites anything."""
    if out.is_dir() and any(out.iterdir()):
        raise VlmtuneError(f"{out}: exists and is not empty; choose a new --out or remove that folder first")
    if out.exists() and not out.is_dir():
        raise VlmtuneError(f"{out}: exists and is not a folder; choose a new --out")


# -- the verification batch ------------------------------------------------------------------

def data_batch(parts: RunParts) -> tuple[dict, str] | None:
    """The first samples of the run's validation (or training) file, encoded as in training;
    None when the file or its images are gone."""
    from vlmtune.data.collate import Collator
    from vlmtune.data.formats import load_samples
    from vlmtune.errors import DataError

    config, encoder = parts.config, parts.encoder
    for name in ("val", "train"):
        path = getattr(config.data, name)
        if not path or not os.path.isfile(path):
            continue
        try:
            samples = load_samples(path, config.data.format)[:BATCH_SIZE]
            if not samples or not all(os.path.isfile(p) for s in samples for p in s.images):
                continue
            encoded = [encoder.encode(s) for s in samples]
        except DataError as e:  # the data changed since training; any batch verifies a merge
            log(f"not using data.{name} for the check ({e})")
            continue
        batch = Collator(parts.pad_id, concat_dims=parts.family.concat_dims)(encoded)
        batch.pop("labels")
        return batch, f"first {len(samples)} sample(s) of data.{name} ({path})"
    return None


def synthetic_batch(processor) -> tuple[dict, str]:
    """A drawn image and a short prompt through the processor's own chat template."""
    image = Image.new("RGB", (224, 224), "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse((30, 30, 130, 130), fill=(220, 30, 30))
    draw.rectangle((110, 100, 200, 200), fill=(30, 60, 220))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "a red circle and a blue square"}]}]
    text = processor.apply_chat_template(messages, tokenize=False)
    batch = dict(processor(text=[text], images=[image], return_tensors="pt"))
    return batch, "a synthetic image and prompt (the run's data files are gone)"


@torch.inference_mode()
def logits_of(model, batch: dict) -> torch.Tensor:
    """fp32 logits of the attended positions (padding is not compared)."""
    inputs = {k: v.to(model.device) for k, v in batch.items()}
    logits = model(**inputs, use_cache=False).logits.float()
    return logits[inputs["attention_mask"].bool()].cpu()


# -- merge -----------------------------------------------------------------------------------

def save_merged(model, processor, folder: Path) -> None:
    """The merged model as plain transformers files: safetensors weights, config, generation
    config, processor (tokenizer, image processor, chat template)."""
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)


def _remove_weights(folder: Path) -> None:
    for path in folder.glob("model*.safetensors*"):
        path.unlink()


def _reload(folder: Path, dtype: torch.dtype, trust_remote_code: bool, device: str):
    # what a user's plain from_pretrained gives (vlmtune's own class for the families it implements itself)
    return load_model(folder, dtype, trust_remote_code=trust_remote_code).to(device).eval()


def _copy_remote_code(base: Path, folder: Path) -> list[str]:
    """The base folder's Python files (the model's remote code, which vlmtune never runs), copied so the
    merged folder loads wherever the original does: the official code with trust_remote_code, vLLM."""
    copied = []
    for path in sorted(base.glob("*.py")):
        if not (folder / path.name).exists():
            shutil.copy2(path, folder / path.name)
            copied.append(path.name)
    return copied


def clean_killed_merges(out: Path) -> None:
    """Remove what merges killed mid-write left beside `out` (model-sized temporary folders of dead
    processes), saying what went."""
    for path in clean_stale_temps(out.parent):
        log(f"removed {path}: left by a process that no longer runs (a killed merge or save)")


def state_bytes(model) -> int:
    """Bytes of the model's weights as saved: what the merged folder needs on disk."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def merge(checkpoint: str | Path, out: str | Path, tolerance: float = 1e-4, dtype: str = "fp32",
          trust_remote_code: bool = False) -> dict:
    """Merge the LoRA adapter (and modules_to_save) of `checkpoint` into its base model, write a
    plain transformers model folder to `out`, and verify it by reloading it from disk.

    Args:
        checkpoint: a run folder (its final/ is used) or a checkpoint-N / final folder.
        out: folder to write; it must not exist or be empty.
        tolerance: largest accepted max |logit difference| between base+adapter and the reloaded
            merged model, both in fp32.
        dtype: dtype of the written weights (fp32, bf16, fp16); verification is always in fp32.
        trust_remote_code: the command's --trust-remote-code; the checkpoint's saved value is ignored.

    Returns:
        The verification record, also written to `out/merge.json`.

    Raises:
        VlmtuneError: a bad checkpoint folder, an existing non-empty `out`, a merged model whose
            logits differ from the adapter's by more than `tolerance`, or a full disk.
    """
    from peft import PeftModel

    if dtype not in DTYPES:
        raise VlmtuneError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    started = time.time()
    ckpt = find_checkpoint(checkpoint).resolve()
    out = Path(out)
    check_out(out)
    clean_killed_merges(out)
    config = saved_remote_code(load_config(ckpt / CONFIG_NAME), trust_remote_code, ckpt / CONFIG_NAME)
    m = config.model
    # the processor with the run's image settings (pixel budget, max_slice_nums), as training had it
    parts = run_parts(config)
    processor, family, base_path = parts.processor, parts.family, parts.model_path
    found = data_batch(parts)
    batch, batch_source = found if found is not None else synthetic_batch(processor)
    n_tokens = int(batch["attention_mask"].sum())
    device = "cuda" if torch.cuda.is_available() else "cpu"

    log(f"loading base model {m.name_or_path} in fp32 and the adapter from {ckpt} ...")
    # transformers' default attention on both sides (not model.attn_implementation): the reload
    # below is what a plain from_pretrained gives, and the two must run the same kernels
    base = parts.load_model(dtype=torch.float32).to(device)
    model = PeftModel.from_pretrained(base, ckpt, is_trainable=False).eval()
    log(f"computing reference logits on {n_tokens} tokens: {batch_source} ...")
    reference = logits_of(model, batch)
    with model.disable_adapter():
        adapter_effect = (logits_of(model, batch) - reference).abs().max().item()
    if adapter_effect == 0:
        log("note: the adapter does not change the logits on this batch (an untrained checkpoint?); "
            "the merged model will equal the base model")

    log("merging the adapter into the base weights ...")
    try:
        merged = model.merge_and_unload(safe_merge=True)
    except ValueError as e:  # safe_merge found NaN/inf in the merged weights
        raise VlmtuneError(f"{ckpt}: merging gives broken weights ({e}); the adapter itself may hold NaN/inf") from None
    del model, base

    out.parent.mkdir(parents=True, exist_ok=True)
    # written beside `out` so the final os.replace is a rename on the same file system; its name
    # carries host and PID, so if this process is killed the next merge can tell it is dead and remove it
    tmp = temp_sibling(out)
    remove(tmp)
    needed = state_bytes(merged)
    try:
        tmp.mkdir()  # not mkdtemp: that makes a private (0700) folder, and this one becomes `out`
        log(f"saving the merged model (fp32) to {tmp} ...")
        save_merged(merged, processor, tmp)
        copied = _copy_remote_code(base_path, tmp) if "auto_map" in json.loads((tmp / "config.json").read_text()) else []
        del merged
        log("reloading it as a user would (plain transformers; vlmtune's own classes for MiniCPM-V 2.x) and "
            "comparing logits ...")
        reloaded = _reload(tmp, torch.float32, m.trust_remote_code, device)
        load_processor(tmp, family, trust_remote_code=m.trust_remote_code)  # the folder's processor loads too
        diff = (logits_of(reloaded, batch) - reference).abs().max().item()
        scale = reference.abs().max().item()
        if not diff <= tolerance:  # `not <=` also catches NaN
            raise VlmtuneError(
                f"merge check failed: the merged model's logits differ from base+adapter by up to {diff:.3g} "
                f"(tolerance {tolerance:g}, fp32, {n_tokens} tokens, largest |logit| {scale:.3g}); nothing was "
                f"written to {out}. A difference far below the logit scale can be fp32 rounding over many "
                "layers: rerun with a larger --tolerance. A large one means the merge is wrong.")
        log(f"max |logit difference| {diff:.3g} <= tolerance {tolerance:g} (fp32, {n_tokens} tokens; "
            f"the adapter moves the logits by up to {adapter_effect:.3g})")
        record = {
            "checkpoint": str(ckpt), "adapter": str(ckpt / ADAPTER_WEIGHTS),
            "base": m.name_or_path, "base_path": str(base_path.resolve()), "base_revision": m.revision,
            "max_abs_logit_diff": diff, "tolerance": tolerance, "verify_dtype": "fp32", "n_tokens": n_tokens,
            "batch": batch_source, "max_abs_logit": scale, "adapter_effect": adapter_effect, "dtype": dtype,
            "remote_code_copied": copied,
        }
        if dtype != "fp32":
            record.update(_write_cast(reloaded, tmp, DTYPES[dtype], batch, reference, m.trust_remote_code, device))
            log(f"wrote {dtype} weights (exactly the cast of the verified fp32 weights); the rounding moves the "
                f"logits by up to {record['cast_logit_diff']:.3g} (not held to the tolerance)")
        del reloaded
        record["seconds"] = round(time.time() - started, 1)
        (tmp / RECORD_NAME).write_text(json.dumps(record, indent=2) + "\n")
        text = (ckpt / CONFIG_NAME).read_text()
        (tmp / CONFIG_NAME).write_text(f"# merged by `vlmtune merge` from {ckpt} (adapter folded into "
                                       f"{m.name_or_path}); verification in {RECORD_NAME}\n{text}")
        check_out(out)  # again: another process may have written there meanwhile
        try:
            os.replace(tmp, out)
        except OSError as e:
            raise VlmtuneError(f"{out}: cannot move the merged model there ({e}); choose a new --out") from None
    except BaseException as e:
        remove(tmp)
        full = disk_full_error(e, out, needed, what="the merged model") if isinstance(e, Exception) else None
        if full is not None:
            raise full from None
        raise
    record["out"] = str(out)
    if family.own_implementation:
        log(f"merged model: {out} (official weight names and config: loads with vlmtune, and with the model's own "
            "code where that runs)")
    else:
        log(f"merged model: {out} (loads with AutoModelForImageTextToText.from_pretrained and "
            "AutoProcessor.from_pretrained)")
    return record


def _write_cast(model, folder: Path, dtype: torch.dtype, batch: dict, reference: torch.Tensor,
                trust_remote_code: bool, device: str) -> dict:
    """Replace the verified fp32 weights in `folder` with their cast to `dtype`, and check that
    the file holds exactly that cast."""
    log(f"casting the weights to {str(dtype).removeprefix('torch.')} and saving ...")
    model = model.to(dtype)
    _remove_weights(folder)  # a different dtype can shard differently: no stale files
    model.save_pretrained(folder, safe_serialization=True)
    written = _reload(folder, dtype, trust_remote_code, device)
    expected, got = model.state_dict(), written.state_dict()
    bad = [k for k in expected if k not in got or not torch.equal(expected[k], got[k])]
    if bad:
        raise VlmtuneError(f"{folder}: the written {dtype} weights differ from the cast of the verified weights "
                           f"({len(bad)} tensors, e.g. {bad[0]}); disk or save problem, nothing was written")
    return {"cast_logit_diff": (logits_of(written, batch) - reference).abs().max().item()}


def merge_command(checkpoint: str, *, out: str, tolerance: float = 1e-4,
                  dtype: Literal["fp32", "bf16", "fp16"] = "fp32", trust_remote_code: bool = False) -> int:
    """Merge a LoRA checkpoint into its base model, verify it, and write a plain transformers model.

    The base model is the one named in the checkpoint's vlmtune.yaml. The merged folder loads with
    AutoModelForImageTextToText.from_pretrained and AutoProcessor.from_pretrained, without vlmtune.
    Verification: logits of base+adapter and of the merged model reloaded from disk, both in fp32,
    on the first samples of the run's data (or a synthetic sample), must agree within --tolerance.

    Args:
        checkpoint: Run folder (its final/ is merged) or a checkpoint-N / final folder.
        out: Folder to write the merged model to; must not exist or be empty.
        tolerance: Largest accepted max |logit difference| (fp32) between base+adapter and merged.
        dtype: Dtype of the written weights; bf16/fp16 are cast after the fp32 check.
        trust_remote_code: Run the Python files of the base model folder (read them first); the run's
            config never enables it.
    """
    merge(checkpoint, out, tolerance=tolerance, dtype=dtype, trust_remote_code=trust_remote_code)
    return 0
