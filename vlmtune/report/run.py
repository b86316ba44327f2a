"""Read what a run folder holds into plain Python values, for the report.

Every part but `vlmtune.yaml` is optional: a run still training has only the config and a
growing `metrics.jsonl`; `eval/` and `samples/` appear later. JSONL files are appended to while
training runs, so an unreadable line is skipped and counted (the report says so) instead of
failing; a broken JSON file written in one piece (`metrics.json`, `compare.json`) is an error.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from vlmtune.config import CONFIG_NAME
from vlmtune.errors import VlmtuneError


@dataclass
class Evaluation:
    """One `eval/<name>/` folder: corpus metrics and, when written, per-sample predictions."""

    name: str
    folder: Path
    info: dict  # metrics.json as written: name, task, n, model, adapter, metrics
    predictions: Path | None


@dataclass
class RunData:
    folder: Path
    config_text: str  # vlmtune.yaml verbatim, shown in the report
    config: dict  # the same, parsed
    config_mtime: float
    metrics: list[dict[str, float]] = field(default_factory=list)  # metrics.jsonl, numeric values only
    evaluations: dict[str, Evaluation] = field(default_factory=dict)  # by name
    compare: dict | None = None  # eval/compare.json
    samples: list[tuple[int, Path]] = field(default_factory=list)  # (step, samples/step-N.jsonl), by step
    skipped: dict[str, int] = field(default_factory=dict)  # file -> unreadable JSONL lines skipped


def read_run(folder: str | Path) -> RunData:
    """Everything the report shows from `folder`.

    Raises:
        VlmtuneError: no such folder, no vlmtune.yaml in it, or a file that is not valid.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise VlmtuneError(f"{folder}: no such run folder; give the folder `vlmtune train` wrote "
                           "(its train.output_dir)")
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        what = "the folder is empty" if not any(folder.iterdir()) else f"it has no {CONFIG_NAME}"
        raise VlmtuneError(f"{folder}: not a vlmtune run folder, {what} (`vlmtune train` writes {CONFIG_NAME} "
                           "there when it starts)")
    config_text = config_path.read_text(encoding="utf-8")
    try:
        config = yaml.safe_load(config_text)
    except yaml.YAMLError as e:
        raise VlmtuneError(f"{config_path}: not valid YAML ({e})") from None
    if not isinstance(config, dict):
        raise VlmtuneError(f"{config_path}: expected a mapping of sections (model, data, lora, train, dpo, grpo, eval)")
    run = RunData(folder, config_text, config, config_path.stat().st_mtime)

    metrics_path = folder / "metrics.jsonl"
    if metrics_path.is_file():
        records, skipped = read_jsonl(metrics_path)
        run.metrics = [numeric(r) for r in records]
        if skipped:
            run.skipped[str(metrics_path.relative_to(folder))] = skipped
    for metrics_json in sorted(folder.glob("eval/*/metrics.json")):
        info = read_json(metrics_json)
        predictions = metrics_json.parent / "predictions.jsonl"
        name = metrics_json.parent.name
        run.evaluations[name] = Evaluation(name, metrics_json.parent, info,
                                           predictions if predictions.is_file() else None)
    # predictions without metrics (an evaluation that stopped early) are still worth showing
    for predictions in sorted(folder.glob("eval/*/predictions.jsonl")):
        name = predictions.parent.name
        if name not in run.evaluations:
            run.evaluations[name] = Evaluation(name, predictions.parent, {}, predictions)
    if (folder / "eval" / "compare.json").is_file():
        run.compare = read_json(folder / "eval" / "compare.json")
    for path in folder.glob("samples/step-*.jsonl"):
        match = re.fullmatch(r"step-(\d+)\.jsonl", path.name)
        if match:
            run.samples.append((int(match.group(1)), path))
    run.samples.sort()
    return run


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise VlmtuneError(f"{path}: not valid JSON ({e}); rerun the command that wrote it, or delete it") from None
    if not isinstance(data, dict):
        raise VlmtuneError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_jsonl(path: Path) -> tuple[list[dict], int]:
    """The JSON objects of a JSONL file, and how many non-empty lines were not one."""
    records, skipped = [], 0
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                skipped += 1
                continue
            if isinstance(record, dict):
                records.append(record)
            else:
                skipped += 1
    return records, skipped


def to_float(value) -> float | None:
    """A number, or a string of one ("0.25"), as a float; anything else (and NaN/inf) is None."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def numeric(record: dict) -> dict[str, float]:
    """The numeric fields of one metrics.jsonl record (loggers sometimes write numbers as strings)."""
    out = {}
    for key, value in record.items():
        number = to_float(value)
        if number is not None:
            out[key] = number
    return out


def series(records: list[dict[str, float]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of `key` over the records that logged it."""
    steps, values = [], []
    for record in records:
        if key in record and "step" in record:
            steps.append(record["step"])
            # null: a NaN or infinite value (callbacks.JsonlMetrics); drawn as a gap, never as 0
            values.append(float("nan") if record[key] is None else record[key])
    return steps, values


def last(records: list[dict[str, float]], key: str) -> float | None:
    for record in reversed(records):
        if key in record:
            return record[key]
    return None


def section(config: dict, name: str) -> dict:
    value = config.get(name)
    return value if isinstance(value, dict) else {}
