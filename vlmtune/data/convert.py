"""`vlmtune data convert` and `vlmtune data split`.

    vlmtune data convert latex_ocr_train.csv data/train.json --to qwen
    vlmtune data split data/train.json --val 0.1 --seed 0 --out data/

`convert` reads any supported format (detected from the first record) and writes another;
image paths are rewritten relative to the output file so the new file finds the same images.
`split` cuts one file into train and val files of the same format with a seeded shuffle, so the
same seed always gives the same split.
"""

from __future__ import annotations

import os
import random
import re
from typing import Literal

from vlmtune.data.formats import read_dataset, write_samples
from vlmtune.errors import VlmtuneError


def convert_command(input: str, output: str, to: Literal["minicpm", "qwen", "messages", "llava", "csv"] = "minicpm",
                    absolute_paths: bool = False) -> int:
    """Convert a dataset between the supported formats.

    The input format is detected from its first record. The output extension picks the file
    type: .json (a list of records), .jsonl (one record per line) or .csv (csv format only).

    Args:
        input: dataset file to read (.json, .jsonl or .csv).
        output: file to write (.json, .jsonl or .csv).
        to: output format: minicpm, qwen (Qwen2-VL tutorial files), messages (OpenAI/HF chat),
            llava (LLaVA/ShareGPT) or csv (one image and one answer per row).
        absolute_paths: write absolute image paths instead of paths relative to the output file.
    """
    samples, source_format = read_dataset(input)
    write_samples(samples, output, to, absolute_paths=absolute_paths)
    print(f"wrote {len(samples)} samples to {output} ({source_format} -> {to})")
    return 0


def parse_val(val: str, total: int) -> int:
    """Number of validation samples for `--val`: a count ("4") or a fraction ("0.1").

    Raises:
        VlmtuneError: `val` is neither, or leaves no sample on one side of the split.
    """
    text = str(val).strip()
    if re.fullmatch(r"\d+", text):
        count = int(text)
    elif re.fullmatch(r"\d*\.\d+|\d+\.\d*|\d+(?:\.\d*)?[eE][-+]?\d+", text) and 0 < float(text) < 1:
        # Round half up (not Python's half-to-even) and keep at least one sample on each side.
        count = min(max(int(total * float(text) + 0.5), 1), max(total - 1, 1))
    else:
        raise VlmtuneError(f"--val {val!r} is not a count (e.g. 4) or a fraction between 0 and 1 (e.g. 0.1)")
    if total < 2:
        raise VlmtuneError(f"cannot split {total} sample(s): train and val each need at least one")
    if not 0 < count < total:
        raise VlmtuneError(f"--val {val} asks for {count} of {total} samples — it must leave at least one "
                           f"sample for each of train and val (1 to {total - 1})")
    return count


def split_command(data: str, val: str = "0.1", seed: int = 0, out: str | None = None) -> int:
    """Split a dataset into train and val files, reproducibly.

    Writes train.EXT and val.EXT in the input's format and file type; records keep their
    original order inside each file. Records without an id get identity_N from their position
    in the input, so ids stay unique across the two files.

    Args:
        data: dataset file to split (.json, .jsonl or .csv).
        val: validation size: a count ("4") or a fraction of the samples ("0.1").
        seed: shuffle seed; the same seed and input give the same split.
        out: folder for train.EXT and val.EXT (default: the input's folder).
    """
    samples, fmt = read_dataset(data)
    count = parse_val(val, len(samples))
    for i, sample in enumerate(samples):
        if sample.id is None:
            sample.id = f"identity_{i + 1}"
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    val_indices = set(order[:count])

    folder = out if out is not None else os.path.dirname(os.path.abspath(data))
    ext = os.path.splitext(data)[1].lower()
    paths = {name: os.path.join(folder, f"{name}{ext}") for name in ("train", "val")}
    for path in paths.values():
        if os.path.abspath(path) == os.path.abspath(data):
            raise VlmtuneError(f"{data}: splitting would overwrite the input with {path} — "
                               "rename the input or pass --out to another folder")
    parts = {
        "train": [s for i, s in enumerate(samples) if i not in val_indices],
        "val": [s for i, s in enumerate(samples) if i in val_indices],
    }
    for name, part in parts.items():
        write_samples(part, paths[name], fmt)
    print(f"train: {len(parts['train'])} samples -> {paths['train']}")
    print(f"val:   {len(parts['val'])} samples -> {paths['val']}")
    return 0
