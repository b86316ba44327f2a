"""Evaluate a run, a checkpoint or any model on a dataset with task metrics.

    vlmtune eval runs/latex --compare-base                 # final weights vs the untuned base
    vlmtune eval runs/latex/checkpoint-100 --data val.json --task latex
    vlmtune eval --model Qwen/Qwen2-VL-2B-Instruct --adapter runs/latex/final --data val.json

Generation is batched (prompts padded on the left, greedy by default) and `max_new_tokens` is
derived from the references, not the seeds' 8192. Results: `metrics.json` (corpus metrics) and
`predictions.jsonl` (image, prompt, reference, prediction and scores per sample) under
`RUN/eval/NAME/`, and with --compare-base a before/after table in `RUN/eval/compare.json`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from vlmtune.config import CONFIG_NAME, RunConfig, load_config
from vlmtune.data.collate import Collator, EncodedDataset
from vlmtune.data.encode import Encoder
from vlmtune.data.sample import IMAGE, Sample
from vlmtune.errors import VlmtuneError
from vlmtune.metrics import compute_metrics, lower_is_better, primary_metric, sample_scores


def derive_max_new_tokens(tokenizer, samples: list[Sample]) -> int:
    """Room for the longest reference and then some: 1.5x its token count plus 8."""
    longest = max((len(tokenizer(s.answer(), add_special_tokens=False)["input_ids"]) for s in samples), default=32)
    return int(math.ceil(longest * 1.5)) + 8


@torch.no_grad()
def generate(model, encoder: Encoder, samples: list[Sample], batch_size: int = 8, max_new_tokens: int | None = None,
             progress: bool = True, desc: str = "generating", streamer=None) -> list[str]:
    """Greedy answers to the prompt turns of `samples`, in order, `batch_size` at a time.

    `streamer` (a transformers `TextStreamer`, batch_size 1 only) receives tokens as they come.
    """
    tokenizer = encoder.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    max_new_tokens = max_new_tokens or derive_max_new_tokens(tokenizer, samples)
    dataset = EncodedDataset(samples, encoder, prompt_only=True)
    collate = Collator(pad_id, padding_side="left", concat_dims=encoder.family.concat_dims)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    answers: list[str] = []
    bar = tqdm(total=len(samples), desc=desc, unit="sample", disable=not progress, leave=False)
    for start in range(0, len(samples), batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(samples)))])
        batch = {k: v.to(device) for k, v in batch.items()}
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id,
                             streamer=streamer)
        new_tokens = out[:, batch["input_ids"].shape[1]:]
        answers += [a.strip() for a in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
        bar.update(len(new_tokens))
    bar.close()
    if was_training:
        model.train()
    return answers


def prompt_text(sample: Sample) -> str:
    """The user messages a model answers, placeholders removed: the `prompt` field of result rows."""
    return "\n".join(t.text.replace(IMAGE, "").strip() for t in sample.prompt_turns() if t.role == "user")


def score(task: str, samples: list[Sample], predictions: list[str]) -> tuple[dict[str, float], list[dict]]:
    """Corpus metrics and one row per sample (the predictions.jsonl schema)."""
    references = [s.answer() for s in samples]
    metrics = compute_metrics(task, predictions, references)
    rows = []
    for i, (sample, prediction) in enumerate(zip(samples, predictions)):
        rows.append({"index": i, "source": sample.source, "images": sample.images, "prompt": prompt_text(sample),
                     "reference": sample.answer(), "prediction": prediction,
                     "scores": sample_scores(task, prediction, sample.answer())})
    return metrics, rows


def write_results(folder: Path, name: str, task: str, metrics: dict, rows: list[dict], model: str,
                  adapter: str | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "predictions.jsonl.tmp").open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    (folder / "predictions.jsonl.tmp").replace(folder / "predictions.jsonl")
    record = {"name": name, "task": task, "n": len(rows), "model": model, "adapter": adapter, "metrics": metrics}
    (folder / "metrics.json").write_text(json.dumps(record, indent=2, ensure_ascii=False))
    return folder


def comparison_table(before: dict[str, float], after: dict[str, float], names=("before", "after")) -> str:
    """A plain-text before/after table; arrows say whether the change is an improvement."""
    lines = [f"{'metric':<16}{names[0]:>10}{names[1]:>10}{'change':>10}"]
    for key in after:
        if key not in before:
            continue
        delta = after[key] - before[key]
        better = delta < 0 if lower_is_better(key) else delta > 0
        mark = "" if abs(delta) < 1e-12 else (" +" if better else " -")
        lines.append(f"{key:<16}{before[key]:>10.4f}{after[key]:>10.4f}{delta:>+10.4f}{mark}")
    return "\n".join(lines)


@dataclass
class Target:
    """What `eval` runs: a base model, maybe an adapter, and the run config it came from."""

    model: str
    adapter: str | None
    name: str
    config: RunConfig
    run_dir: Path | None


def resolve_target(target: str | None, model: str | None, adapter: str | None) -> Target:
    """A run folder (its final/ or newest checkpoint), a checkpoint folder, or --model [--adapter]."""
    if target is None:
        if model is None:
            raise VlmtuneError("give a run or checkpoint folder, or --model (and optionally --adapter)")
        return Target(model, adapter, "adapter" if adapter else "model", load_config(None, [f"model.name_or_path={model}"]), None)
    folder = Path(target)
    if not folder.is_dir():
        raise VlmtuneError(f"{target}: no such run or checkpoint folder")
    if (folder / "final").is_dir():
        folder = folder / "final"
    elif not (folder / CONFIG_NAME).exists() or not ((folder / "adapter_config.json").exists() or (folder / "config.json").exists()):
        checkpoints = sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
        if not checkpoints:
            raise VlmtuneError(f"{target}: holds neither final/ nor checkpoint-N/ nor a {CONFIG_NAME}")
        folder = checkpoints[-1]
    if not (folder / CONFIG_NAME).exists():
        raise VlmtuneError(f"{folder}: no {CONFIG_NAME}; pass --model (and --adapter) instead")
    config = load_config(folder / CONFIG_NAME)
    run_dir = folder.parent
    if (folder / "adapter_config.json").exists():
        return Target(config.model.name_or_path, str(folder), folder.name, config, run_dir)
    return Target(str(folder), None, folder.name, config, run_dir)


def load_for_eval(target: Target):
    """(model, processor, family) ready for generation, the adapter applied when there is one."""
    from vlmtune.models.load import load_model_and_processor

    c = target.config
    model, processor, family, _ = load_model_and_processor(
        target.model, c.model.hub, c.model.revision, c.model.dtype, c.data.min_pixels, c.data.max_pixels,
        c.model.trust_remote_code, max_slice_nums=c.data.max_slice_nums)
    if target.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, target.adapter)
    if torch.cuda.is_available():
        model = model.to("cuda")
    return model.eval(), processor, family


def eval_command(target: str | None = None, /, model: str | None = None, adapter: str | None = None,
                 data: str | None = None, task: str | None = None, compare_base: bool = False, batch_size: int = 8,
                 max_new_tokens: int | None = None, limit: int | None = None, out: str | None = None) -> int:
    """Evaluate a run, checkpoint or model on a dataset with task metrics.

    Args:
        target: Run folder (uses final/, else the newest checkpoint) or checkpoint folder.
        model: Base model (hub id or folder) when no run folder is given.
        adapter: LoRA adapter folder to apply on --model.
        data: Dataset to evaluate on; default: the run's validation data.
        task: ocr, latex, caption or generic; default: the run's eval.task, else generic.
        compare_base: Also evaluate the untuned base model and print a before/after table.
        batch_size: Samples per generation batch.
        max_new_tokens: Longest answer; default: 1.5x the longest reference plus 8 tokens.
        limit: Evaluate only the first N samples.
        out: Results folder; default RUN/eval/NAME (or ./eval/NAME without a run folder).
    """
    from vlmtune.data.formats import load_samples

    t = resolve_target(target, model, adapter)
    c = t.config
    task = task or c.eval.task or "generic"
    primary_metric(task)  # fails early on an unknown task
    if data is None:
        if not c.data.train and not c.data.val:
            raise VlmtuneError("no --data given and the run config names no dataset")
        from vlmtune.train import load_data

        samples = load_data(c)[1] or load_samples(c.data.train, c.data.format)
    else:
        samples = load_samples(data, c.data.format)
    samples = samples[:limit] if limit else samples
    if not samples:
        raise VlmtuneError("no samples to evaluate")

    net, processor, family = load_for_eval(t)
    encoder = Encoder(processor, family, prompt=c.data.prompt, system_prompt=c.data.system_prompt,
                      image_size=tuple(c.data.image_size) if c.data.image_size else None)
    eval_root = Path(out) if out else (t.run_dir / "eval" if t.run_dir else Path("eval"))
    results = {}
    runs = [("base", True)] if compare_base else []
    runs.append((t.name, False))
    for name, as_base in runs:
        if as_base and t.adapter:
            with net.disable_adapter():
                predictions = generate(net, encoder, samples, batch_size, max_new_tokens, desc=name)
        elif as_base:
            base_t = Target(c.model.name_or_path, None, "base", c, t.run_dir)
            base_net, _, _ = load_for_eval(base_t)
            predictions = generate(base_net, encoder, samples, batch_size, max_new_tokens, desc=name)
            del base_net
        else:
            predictions = generate(net, encoder, samples, batch_size, max_new_tokens, desc=name)
        metrics, rows = score(task, samples, predictions)
        folder = write_results(eval_root / name, name, task, metrics, rows, c.model.name_or_path,
                               None if as_base else t.adapter)
        results[name] = metrics
        print(f"{name}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()) + f"  ({folder})")
    if compare_base:
        compare = {"task": task, "before": "base", "after": t.name, "metrics": results}
        (eval_root / "compare.json").write_text(json.dumps(compare, indent=2))
        print(comparison_table(results["base"], results[t.name], ("base", t.name)))
    return 0
