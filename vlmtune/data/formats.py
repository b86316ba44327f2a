"""Dataset files in and out: the public face of the data formats layer.

    from vlmtune.data.formats import load_samples, write_samples
    samples = load_samples("data/latex_ocr_train.json")   # format detected from the first record
    write_samples(samples, "out/train.jsonl", "qwen")

A file is a JSON list of records (.json), one record per line (.jsonl) or a table (.csv); the
extension decides which. The record shape is one of `FORMATS`: "minicpm", "qwen" (Qwen2-VL
tutorial files), "messages" (OpenAI/HF chat), "llava" (LLaVA/ShareGPT) or "csv" (an image
column and an answer column). Records become `Sample`s in `readers.py` and go back in
`writers.py`; this module only deals with files.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys

from vlmtune.data.readers import detect_format, read_record
from vlmtune.data.sample import Sample
from vlmtune.data.writers import WRITERS, to_flat
from vlmtune.errors import DataError
from vlmtune.fileio import atomic_write_text

__all__ = ["FORMATS", "detect_format", "load_samples", "read_dataset", "read_records", "write_samples"]

FORMATS = ("minicpm", "qwen", "messages", "llava", "csv")
EXTENSIONS = (".json", ".jsonl", ".csv")


def _extension(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext not in EXTENSIONS:
        raise DataError(f"{path}: unknown file type {ext or '(no extension)'!r} — "
                        "use a .json (list of records), .jsonl (one record per line) or .csv file")
    return ext


def _check_format(format: str | None, path: str, ext: str) -> None:
    if format is not None and format not in FORMATS:
        raise DataError(f"{path}: unknown format {format!r} — use one of {', '.join(FORMATS)}")
    if ext == ".csv" and format not in (None, "csv"):
        raise DataError(f"{path}: a .csv file holds only the csv format, not {format} — "
                        "use a .json or .jsonl file for it")


def _json_lines(text: str, path: str) -> list:
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{len(records)}: invalid JSON on line {lineno} (column {e.colno}): "
                            f"{e.msg} — each line of a JSON Lines file must hold one complete record") from None
    return records


def _read_records(path: str, ext: str) -> list:
    with open(path, encoding="utf-8-sig", newline="") as f:  # -sig: CSVs saved by Excel start with a BOM
        if ext == ".csv":
            return list(csv.DictReader(f))
        text = f.read()
    if ext == ".jsonl":
        return _json_lines(text, path)
    try:
        data = json.loads(text) if text.strip() else []
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and text.lstrip().startswith("{"):
            return _json_lines(text, path)  # JSON Lines saved as .json: common, and unambiguous
        raise DataError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg} — "
                        "a .json file holds one list of records") from None
    if isinstance(data, dict):
        return [data]
    if not isinstance(data, list):
        raise DataError(f"{path}: holds a JSON {type(data).__name__}, not a list of records — "
                        "write the records as [{...}, {...}]")
    return data


def _no_records(path: str, ext: str) -> DataError:
    """The error for a dataset file without a single record, saying what the file holds instead."""
    if os.path.getsize(path) == 0:
        held = "the file is empty (0 bytes)"
    else:
        held = {".json": "an empty list", ".jsonl": "no record lines", ".csv": "a header row and no rows"}[ext]
    return DataError(f"{path}: holds no records ({held}); a dataset needs at least one sample. Check that the "
                     "export or `vlmtune data prepare` that wrote it finished, and that this is the right file")


def read_records(path: str | os.PathLike) -> list:
    """The parsed records of a .json, .jsonl or .csv file, in order (preference files are read
    from here too: `vlmtune/data/preference.py`).

    Raises:
        DataError: no such file, unknown extension, invalid JSON, or no records at all.
    """
    path = os.fspath(path)
    ext = _extension(path)
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file — check the path")
    records = _read_records(path, ext)
    if not records:
        raise _no_records(path, ext)
    return records


def read_dataset(path: str | os.PathLike, format: str | None = None, *,
                 allow_empty: bool = False) -> tuple[list[Sample], str]:
    """Read a dataset file and say which format it was in.

    Every command reads its data here, so a file with no records is refused here, once: training,
    evaluating or converting nothing is always a mistake (a failed export, the wrong file).

    Args:
        path: a .json, .jsonl or .csv file.
        format: one of `FORMATS`; None detects it from the file's first record.
        allow_empty: give no samples (and the format asked for, or "minicpm") for an empty file
            instead of an error.

    Returns:
        The samples in file order, and the format name.

    Raises:
        DataError: unreadable or empty file, or a structurally bad record; the message names file
            and index.
    """
    path = os.fspath(path)
    ext = _extension(path)
    _check_format(format, path, ext)
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file — check the path")
    records = _read_records(path, ext)
    if not records and not allow_empty:
        raise _no_records(path, ext)
    if ext == ".csv":
        format = "csv"
    if format is None:
        format = detect_format(records[0], f"{path}:0") if records else FORMATS[0]
    base = os.path.dirname(os.path.abspath(path))
    return [read_record(r, format, f"{path}:{i}", base) for i, r in enumerate(records)], format


def load_samples(path: str | os.PathLike, format: str | None = None, *, allow_empty: bool = False) -> list[Sample]:
    """Read a dataset file into `Sample`s with absolute image paths.

    Args:
        path: a .json (list of records), .jsonl (one record per line) or .csv file.
        format: one of `FORMATS`; None detects it from the file's first record.
        allow_empty: an empty file gives [] instead of an error.

    Raises:
        DataError: unreadable or empty file, or a structurally bad record; the message names file
            and index.
    """
    return read_dataset(path, format, allow_empty=allow_empty)[0]


def _csv_text(rows: list[dict]) -> str:
    columns = dict.fromkeys(["id", "image_path", "text"])  # even with no rows, so the header says what goes where
    for row in rows:
        columns.update(dict.fromkeys(row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: v if isinstance(v, str) else "" if v is None else json.dumps(v, ensure_ascii=False)
                         for k, v in row.items()})
    return buffer.getvalue()


def write_samples(samples: list[Sample], path: str | os.PathLike, format: str, *,
                  absolute_paths: bool = False) -> None:
    """Write samples to a .json, .jsonl or .csv file in `format`, atomically.

    Args:
        samples: what to write; missing ids become identity_1, identity_2, ...
        path: output file; its extension picks JSON list, JSON Lines or CSV. Folders are created.
        format: one of `FORMATS` (a .csv file takes only "csv").
        absolute_paths: write absolute image paths instead of paths relative to the output folder.

    Raises:
        DataError: a sample the format cannot hold (named by its source record), or a bad
            path/format; nothing is written then.
    """
    path = os.fspath(path)
    ext = _extension(path)
    if format is None:
        raise DataError(f"{path}: no format given — use one of {', '.join(FORMATS)}")
    _check_format(format, path, ext)
    out_dir = os.path.dirname(os.path.abspath(path))
    if format == "csv":
        rows, dropped = [], 0
        for i, sample in enumerate(samples):
            row, lost_prompt = to_flat(sample, i, out_dir, absolute_paths)
            rows.append(row)
            dropped += lost_prompt
        if dropped:
            print(f"warning: {path}: dropped the user prompt of {dropped} of {len(samples)} samples "
                  "(csv keeps only the image and the answer); write a JSON format to keep it",
                  file=sys.stderr)
        records = rows
    else:
        records = [WRITERS[format](sample, i, out_dir, absolute_paths) for i, sample in enumerate(samples)]
    if ext == ".csv":
        text = _csv_text(records)
    elif ext == ".jsonl":
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    else:
        text = json.dumps(records, ensure_ascii=False, indent=2) + "\n"
    atomic_write_text(path, text)
