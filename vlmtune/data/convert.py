"""`vlmtune data convert` and `vlmtune data split`.

    vlmtune data convert latex_ocr_train.csv data/train.json --to qwen
    vlmtune data split data/train.json --val 0.1 --seed 0 --out data/

`convert` reads any supported format (detected from the first record) and writes another;
image paths are rewritten relative to the output file so the new file finds the same images.
`split` cuts one file into train and val files of the same format with a seeded shuffle, so the
same seed always gives the same split; records that share an image stay on one side
(`vlmtune.data.split`, the rule `data prepare` and `train`'s `data.val_size` use too).
"""

from __future__ import annotations

import os
from typing import Literal

from vlmtune.data.formats import read_dataset, write_samples
from vlmtune.data.split import image_groups, parse_val, split_samples
from vlmtune.errors import VlmtuneError

__all__ = ["convert_command", "split_command", "parse_val"]


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


def split_command(data: str, val: str = "0.1", seed: int = 0, out: str | None = None) -> int:
    """Split a dataset into train and val files, reproducibly.

    Writes train.EXT and val.EXT in the input's format and file type; records keep their
    original order inside each file. Records that share an image go to the same file, so no
    image is in both; sizes count images. Records without an id get identity_N from their
    position in the input, so ids stay unique across the two files.

    Args:
        data: dataset file to split (.json, .jsonl or .csv).
        val: validation size: a count of images ("4") or a fraction of them ("0.1").
        seed: shuffle seed; the same seed and input give the same split.
        out: folder for train.EXT and val.EXT (default: the input's folder).
    """
    folder = out if out is not None else os.path.dirname(os.path.abspath(data))
    ext = os.path.splitext(data)[1].lower()
    paths = {name: os.path.join(folder, f"{name}{ext}") for name in ("train", "val")}
    for path in paths.values():
        if os.path.abspath(path) == os.path.abspath(data):
            raise VlmtuneError(f"{data}: splitting would overwrite the input with {path} — "
                               "rename the input or pass --out to another folder")
    samples, fmt = read_dataset(data)
    train, val_part = split_samples(samples, val, seed)
    for i, sample in enumerate(samples):
        if sample.id is None:
            sample.id = f"identity_{i + 1}"
    parts = {"train": train, "val": val_part}
    # both files under temporary names first, then renamed: a failure (a full disk) never leaves a new
    # train file beside an old or missing val file
    created = not os.path.isdir(folder)
    temps = {name: os.path.join(folder, f".{name}.tmp-{os.getpid()}{ext}") for name in parts}
    try:
        for name, part in parts.items():
            write_samples(part, temps[name], fmt)
        for name in parts:
            os.replace(temps[name], paths[name])
    except BaseException:
        for temp in temps.values():
            if os.path.exists(temp):
                os.remove(temp)
        if created and os.path.isdir(folder) and not os.listdir(folder):
            os.rmdir(folder)
        raise
    print(f"train: {len(train)} samples -> {paths['train']}")
    print(f"val:   {len(val_part)} samples -> {paths['val']}")
    train_groups, val_groups = len(image_groups(train)), len(image_groups(val_part))
    if train_groups + val_groups < len(samples):
        print(f"samples that share an image stay together: {train_groups} image groups in train, {val_groups} in val")
    return 0
