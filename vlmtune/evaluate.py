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

import fcntl
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

from vlmtune.data.check import check_samples
from vlmtune.data.encode import Encoder
from vlmtune.data.sample import Sample, Turn
from vlmtune.errors import DataError, VlmtuneError
from vlmtune.fileio import atomic_write_text, disk_full_error
from vlmtune.generation import derive_max_new_tokens, generate, ready_model, resolve_target, target_parts
from vlmtune.metrics import compute_metrics, lower_is_better, primary_metric
from vlmtune.scoring import EvalItem, first_items, group_items, item_row


def partial_path(path: Path) -> Path:
    """Where rows go while they are being generated: NAME.partial.jsonl beside NAME.jsonl."""
    return path.with_name(f"{path.stem}.partial{path.suffix}")


class PartialJsonl:
    """JSON lines appended (and flushed) batch by batch to `partial_path(path)`, renamed to `path`
    by `finish()`, so an error, Ctrl-C or a kill keeps every finished row; leaving the `with`
    block without `finish()` says where they are. The partial file is held with an exclusive
    `flock` until it is renamed: a second command writing the same file is refused, not allowed
    to interleave its rows with this one's.

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
        fd = os.open(self.partial, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise VlmtuneError(f"{self.partial} is being written by another running command (the same one twice?): "
                               f"wait for it to finish, or write the {self.what} elsewhere") from None
        os.ftruncate(fd, 0)  # rows a stopped earlier command left here are replaced, as rerunning it would
        self.file = os.fdopen(fd, "w", encoding="utf-8")
        return self

    def write(self, rows: list[dict]) -> None:
        try:
            self.file.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
            self.file.flush()
        except OSError as e:
            raise disk_full_error(e, self.partial) or e
        self.rows += rows

    def finish(self) -> Path:
        """Put the rows in place under the final name, in `index` order (still holding the lock, so
        no second command can take the partial file between the last row and the rename)."""
        indices = [row["index"] for row in self.rows]
        if indices == sorted(indices):
            os.replace(self.partial, self.path)
        else:  # generate answers repeated prompts together; the file keeps the input's order
            rows = sorted(self.rows, key=lambda row: row["index"])
            atomic_write_text(self.path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
            self.partial.unlink()
        self.file.close()
        self.file = None
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
        from vlmtune.data.load import load_data

        if c.data.stream and not c.data.val:
            raise VlmtuneError(f"the run trained on a stream (data.train={c.data.train}) and names no data.val: "
                               "give the data to evaluate on with --data FILE")
        samples = load_data(c)[1] or load_samples(c.data.train, c.data.format)
    else:
        samples = load_samples(data, c.data.format)
    samples = first_items(samples, limit) if limit else samples
    if not samples:
        raise VlmtuneError("no samples to evaluate")
    preflight(samples, data or c.data.val or c.data.train)  # before the model loads: FILE:INDEX errors
    items = group_items(samples)

    parts = target_parts(t)
    net, encoder = ready_model(parts, t.adapter), parts.encoder
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
            base_net = ready_model(target_parts(t.base()))
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
