"""Evaluate a run, a checkpoint or any model on a dataset with task metrics.

    vlmtune eval runs/latex --compare-base                 # final weights vs the untuned base
    vlmtune eval runs/latex/checkpoint-100 --data val.json --task latex
    vlmtune eval --model Qwen/Qwen2-VL-2B-Instruct --adapter runs/latex/final --data val.json

Records that share image(s) and prompt are one item, generated for once and scored against all
their answers (a COCO image with five captions is one item with five references). Every record
is checked before the model loads (images exist and open, turns are well formed); a bad one
stops the command with `FILE:INDEX: what is wrong`. Generation is batched (prompts padded on the
left, greedy by default) and `max_new_tokens` is derived from the references, not the seeds' 8192.
Results under `RUN/eval/NAME/`: `predictions.jsonl` (image, prompt, references, prediction and
scores per item), written batch by batch to `predictions.partial.jsonl` and renamed when all are
done, so a crash or Ctrl-C keeps the finished ones; then `metrics.json` (corpus metrics); with
--compare-base a before/after table in `RUN/eval/compare.json`.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from vlmtune.config import CONFIG_NAME, RunConfig, load_config
from vlmtune.data.collate import Collator, EncodedDataset
from vlmtune.data.encode import Encoder
from vlmtune.data.check import check_samples
from vlmtune.data.sample import IMAGE, DataError, Sample, Turn
from vlmtune.errors import VlmtuneError
from vlmtune.fileio import atomic_write_text, disk_full_error
from vlmtune.metrics import compute_metrics, lower_is_better, primary_metric, sample_scores


def derive_max_new_tokens(tokenizer, samples: list[Sample]) -> int:
    """Room for the longest reference and then some: 1.5x its token count plus 8."""
    longest = max((len(tokenizer(s.answer(), add_special_tokens=False)["input_ids"]) for s in samples), default=32)
    return int(math.ceil(longest * 1.5)) + 8


@torch.no_grad()
def generate(model, encoder: Encoder, samples: list[Sample], batch_size: int = 8, max_new_tokens: int | None = None,
             progress: bool = True, desc: str = "generating", streamer=None,
             on_batch: Callable[[list[int], list[str]], None] | None = None) -> list[str]:
    """Greedy answers to the prompt turns of `samples`, in order, `batch_size` prompts at a time.

    Records that ask the same thing (same images, same turns before the answer) are answered
    once and share the answer: a COCO image with five captions is one prompt, not five.
    `on_batch(indices, answers)` is called after each batch with the positions in `samples` it
    answered, so callers can write results as they come. `streamer` (a transformers
    `TextStreamer`, batch_size 1 only) receives tokens as they come.
    """
    tokenizer = encoder.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    max_new_tokens = max_new_tokens or derive_max_new_tokens(tokenizer, samples)
    askers: dict[tuple, list[int]] = {}  # prompt -> positions of the records that ask it
    for i, sample in enumerate(samples):
        askers.setdefault(item_key(sample), []).append(i)
    groups = list(askers.values())
    dataset = EncodedDataset([samples[g[0]] for g in groups], encoder, prompt_only=True)
    collate = Collator(pad_id, padding_side="left", concat_dims=encoder.family.concat_dims)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    answers: list[str] = [""] * len(samples)
    bar = tqdm(total=len(groups), desc=desc, unit="sample", disable=not progress, leave=False)
    for start in range(0, len(groups), batch_size):
        chunk = range(start, min(start + batch_size, len(groups)))
        batch = collate([dataset[g] for g in chunk])
        batch = {k: v.to(device) for k, v in batch.items()}
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id,
                             streamer=streamer)
        new_tokens = out[:, batch["input_ids"].shape[1]:]
        decoded = [a.strip() for a in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
        done = [(i, answer) for g, answer in zip(chunk, decoded) for i in groups[g]]
        for i, answer in done:
            answers[i] = answer
        if on_batch is not None:
            on_batch([i for i, _ in done], [a for _, a in done])
        bar.update(len(chunk))
    bar.close()
    if was_training:
        model.train()
    return answers


def prompt_text(sample: Sample) -> str:
    """The user messages a model answers, placeholders removed: the `prompt` field of result rows."""
    return "\n".join(t.text.replace(IMAGE, "").strip() for t in sample.prompt_turns() if t.role == "user")


def item_key(sample: Sample) -> tuple:
    """What a record asks: its images and the turns before its answer. Records with equal keys
    are one evaluation item."""
    images = tuple(i if "://" in i else os.path.normpath(os.path.abspath(i)) for i in sample.images)
    return images, tuple((t.role, t.text) for t in sample.prompt_turns())


@dataclass
class EvalItem:
    """One thing to evaluate: the records that ask the same about the same image(s). Each of
    their answers is an accepted reference (COCO gives five captions per image)."""

    records: list[Sample]
    indices: list[int]  # positions of the records in the list they were grouped from

    @property
    def sample(self) -> Sample:
        """The record the model is asked with (the first; the others ask the same)."""
        return self.records[0]

    @property
    def references(self) -> list[str]:
        return [r.answer() for r in self.records]


def group_items(samples: list[Sample]) -> list[EvalItem]:
    """The evaluation items of `samples`, in the order of their first record."""
    items: dict[tuple, EvalItem] = {}
    for i, sample in enumerate(samples):
        item = items.setdefault(item_key(sample), EvalItem([], []))
        item.records.append(sample)
        item.indices.append(i)
    return list(items.values())


def first_items(samples: list[Sample], n: int | None) -> list[Sample]:
    """The records of the first `n` items (all records for None): a limit that never leaves an
    item with part of its references."""
    if n is None:
        return samples
    keep = {i for item in group_items(samples)[:n] for i in item.indices}
    return [s for i, s in enumerate(samples) if i in keep]


def item_row(task: str, index: int, item: EvalItem, prediction: str) -> dict:
    """One line of predictions.jsonl. `reference` (the first) stays for readers of one reference."""
    references = item.references
    return {"index": index, "source": item.sample.source, "sources": [r.source for r in item.records],
            "images": item.sample.images, "prompt": prompt_text(item.sample), "reference": references[0],
            "references": references, "prediction": prediction,
            "scores": sample_scores(task, prediction, references)}


def score(task: str, samples: list[Sample], predictions: list[str]) -> tuple[dict[str, float], list[dict]]:
    """Corpus metrics and one row per item (the predictions.jsonl schema).

    `predictions` holds one answer per record, as `generate` returns them; records that share
    image(s) and prompt are one item, scored once against all their answers.
    """
    items = group_items(samples)
    answers = [predictions[item.indices[0]] for item in items]
    metrics = compute_metrics(task, answers, [item.references for item in items])
    return metrics, [item_row(task, k, item, answer) for k, (item, answer) in enumerate(zip(items, answers))]


def partial_path(path: Path) -> Path:
    """Where rows go while they are being generated: NAME.partial.jsonl beside NAME.jsonl."""
    return path.with_name(f"{path.stem}.partial{path.suffix}")


class PartialJsonl:
    """JSON lines appended (and flushed) batch by batch to `partial_path(path)`, renamed to `path`
    by `finish()`, so an error, Ctrl-C or a kill keeps every finished row; leaving the `with`
    block without `finish()` says where they are.

    Args:
        path: the final file.
        total: how many rows are expected, for the message.
        what: what the rows are, for the message.
    """

    def __init__(self, path: str | Path, total: int, what: str = "predictions"):
        self.path = Path(path)
        self.partial = partial_path(self.path)
        self.total, self.what = total, what
        self.indices: list[int] = []
        self.rows: list[dict] = []
        self.file = None

    def __enter__(self) -> PartialJsonl:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = self.partial.open("w", encoding="utf-8")
        return self

    def write(self, rows: list[dict]) -> None:
        try:
            self.file.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
            self.file.flush()
        except OSError as e:
            raise disk_full_error(e, self.partial) or e
        self.rows += rows

    def finish(self) -> Path:
        """Put the rows in place under the final name, in `index` order."""
        self.file.close()
        self.file = None
        indices = [row["index"] for row in self.rows]
        if indices == sorted(indices):
            os.replace(self.partial, self.path)
        else:  # generate answers repeated prompts together; the file keeps the input's order
            rows = sorted(self.rows, key=lambda row: row["index"])
            atomic_write_text(self.path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
            self.partial.unlink()
        return self.path

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.file is None:
            return
        self.file.close()
        self.file = None
        print(f"{self.what} stopped after {len(self.rows)} of {self.total}; the finished ones are in {self.partial}",
              file=sys.stderr)


def _answered(sample: Sample) -> Sample:
    """`sample` with a stand-in answer when it has none, for the check: `predict` answers records
    that end with the question."""
    turns = list(sample.turns)
    if turns and turns[-1].role == "assistant" and not turns[-1].text.strip():
        turns[-1] = Turn("assistant", "?")
    elif not turns or turns[-1].role != "assistant":
        turns.append(Turn("assistant", "?"))
    return replace(sample, turns=turns)


def preflight(samples: list[Sample], data: str, need_answers: bool = True) -> None:
    """Check every record before a model loads: its images exist and open, its turns are well
    formed (with an answer to score, unless `need_answers` is false).

    Raises:
        DataError: `FILE:INDEX: what is wrong` for each bad record; nothing was generated.
    """
    report = check_samples(samples if need_answers else [_answered(s) for s in samples], progress=False)
    if report.problems:
        bad = len(report.bad_indices)
        raise DataError(f"{bad} of {len(samples)} record(s) of {data} cannot be used; nothing was generated:\n"
                        f"{report.listing()}\nFix or remove them (`vlmtune data check {data}` lists every problem), "
                        "then run again.")


def write_results(folder: Path, name: str, task: str, metrics: dict, n_items: int, n_records: int, model: str,
                  adapter: str | None) -> Path:
    """metrics.json beside the predictions: `n` items scored, from `records` records."""
    record = {"name": name, "task": task, "n": n_items, "records": n_records, "model": model, "adapter": adapter,
              "metrics": metrics}
    atomic_write_text(folder / "metrics.json", json.dumps(record, indent=2, ensure_ascii=False))
    return folder


def evaluate_items(model, encoder: Encoder, task: str, items: list[EvalItem], folder: Path, batch_size: int,
                   max_new_tokens: int, desc: str) -> dict[str, float]:
    """Generate for every item, writing its predictions.jsonl row as each batch finishes; the
    corpus metrics."""
    with PartialJsonl(folder / "predictions.jsonl", len(items)) as out:
        def write(indices: list[int], answers: list[str]) -> None:
            out.write([item_row(task, k, items[k], answer) for k, answer in zip(indices, answers)])

        predictions = generate(model, encoder, [item.sample for item in items], batch_size, max_new_tokens, desc=desc,
                               on_batch=write)
        metrics = compute_metrics(task, predictions, [item.references for item in items])
        out.finish()
    return metrics


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


def resolve_target(target: str | None, model: str | None, adapter: str | None,
                   trust_remote_code: bool = False) -> Target:
    """A run folder (its final/ or newest checkpoint), a checkpoint folder, or --model [--adapter].

    Remote code follows `trust_remote_code` (the command's --trust-remote-code) alone: a value saved
    in the run folder's config is ignored.
    """
    from vlmtune.config import saved_remote_code
    from vlmtune.models.load import check_adapter

    if target is None:
        if model is None:
            raise VlmtuneError("give a run or checkpoint folder, or --model (and optionally --adapter)")
        if adapter:
            check_adapter(adapter)
        config = load_config(None, [f"model.name_or_path={model}"])
        config.model.trust_remote_code = trust_remote_code
        return Target(model, adapter, "adapter" if adapter else "model", config, None)
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
    config = saved_remote_code(load_config(folder / CONFIG_NAME), trust_remote_code, folder / CONFIG_NAME)
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
                 max_new_tokens: int | None = None, limit: int | None = None, out: str | None = None,
                 trust_remote_code: bool = False) -> int:
    """Evaluate a run, checkpoint or model on a dataset with task metrics.

    Args:
        target: Run folder (uses final/, else the newest checkpoint) or checkpoint folder.
        model: Base model (hub id or folder) when no run folder is given.
        adapter: LoRA adapter folder to apply on --model.
        data: Dataset to evaluate on; default: the run's validation data.
        task: ocr, latex, caption or generic; default: the run's eval.task, else generic.
        compare_base: Also evaluate the untuned base model and print a before/after table.
        batch_size: Prompts per generation batch.
        max_new_tokens: Longest answer; default: 1.5x the longest reference plus 8 tokens.
        limit: Evaluate only the first N items (records with the same image(s) and prompt are one
            item, scored against all their answers).
        out: Results folder; default RUN/eval/NAME (or ./eval/NAME without a run folder).
        trust_remote_code: Run the Python files of the model folder (read them first); a run folder's
            config never enables it.
    """
    from vlmtune.data.formats import load_samples

    t = resolve_target(target, model, adapter, trust_remote_code)
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
    samples = first_items(samples, limit) if limit else samples
    if not samples:
        raise VlmtuneError("no samples to evaluate")
    preflight(samples, data or c.data.val or c.data.train)  # before the model loads: FILE:INDEX errors
    items = group_items(samples)

    net, processor, family = load_for_eval(t)
    encoder = Encoder(processor, family, prompt=c.data.prompt, system_prompt=c.data.system_prompt,
                      image_size=tuple(c.data.image_size) if c.data.image_size else None)
    max_new_tokens = max_new_tokens or derive_max_new_tokens(encoder.tokenizer, samples)  # every reference
    eval_root = Path(out) if out else (t.run_dir / "eval" if t.run_dir else Path("eval"))
    results = {}
    runs = [("base", True)] if compare_base else []
    runs.append((t.name, False))
    for name, as_base in runs:
        folder = eval_root / name
        if as_base and t.adapter:
            with net.disable_adapter():
                metrics = evaluate_items(net, encoder, task, items, folder, batch_size, max_new_tokens, name)
        elif as_base:
            base_t = Target(c.model.name_or_path, None, "base", c, t.run_dir)
            base_net, _, _ = load_for_eval(base_t)
            metrics = evaluate_items(base_net, encoder, task, items, folder, batch_size, max_new_tokens, name)
            del base_net
        else:
            metrics = evaluate_items(net, encoder, task, items, folder, batch_size, max_new_tokens, name)
        write_results(folder, name, task, metrics, len(items), len(samples), c.model.name_or_path,
                      None if as_base else t.adapter)
        results[name] = metrics
        print(f"{name}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()) + f"  ({folder})")
    if compare_base:
        compare = {"task": task, "before": "base", "after": t.name, "metrics": results}
        (eval_root / "compare.json").write_text(json.dumps(compare, indent=2))
        print(comparison_table(results["base"], results[t.name], ("base", t.name)))
    return 0
