"""`Sample` -> dataset record, one function per format (the reverse of `readers.py`).

Image paths are written relative to the output file's folder (unless `absolute`), so that a
converted file still finds its images wherever it is written; URLs are left alone. A sample
that a format cannot hold (more images than placeholders for a positional format, anything but
one image and one answer for csv) raises `DataError` naming the record it came from.
"""

from __future__ import annotations

import os

from vlmtune.data.readers import is_url
from vlmtune.data.sample import IMAGE, Sample
from vlmtune.errors import DataError

LLAVA_ROLES = {"system": "system", "user": "human", "assistant": "gpt"}


def _where(sample: Sample, i: int) -> str:
    return sample.source or f"sample {i}"


def image_ref(path: str, out_dir: str, absolute: bool) -> str:
    if is_url(path):
        return path
    path = os.path.abspath(path)
    if absolute:
        return path
    try:
        return os.path.relpath(path, out_dir)
    except ValueError:  # different drives on Windows: no relative path exists
        return path


def _sample_id(sample: Sample, i: int) -> str:
    return sample.id if sample.id is not None else f"identity_{i + 1}"


def _with_meta(record: dict, sample: Sample) -> dict:
    for key, value in sample.meta.items():
        record.setdefault(key, value)
    return record


def _split_at_placeholders(sample: Sample, i: int, fmt: str) -> list[list[str]]:
    """Each turn's text cut at its placeholders: ["a", "b"] means "a<image>b"."""
    pieces = [t.text.split(IMAGE) for t in sample.turns]
    slots = sum(len(p) - 1 for p in pieces)
    if len(sample.images) > slots:
        raise DataError(f"{_where(sample, i)}: {len(sample.images)} images but {slots} {IMAGE} placeholders — "
                        f"the {fmt} format puts each image at its placeholder; fix the record "
                        "(`vlmtune data check` lists all such records)")
    return pieces


def to_minicpm(sample: Sample, i: int, out_dir: str, absolute: bool) -> dict:
    images = [image_ref(p, out_dir, absolute) for p in sample.images]
    record: dict = {"id": _sample_id(sample, i)}
    turns = [{"role": t.role, "content": t.text} for t in sample.turns]
    if len(images) == 1:
        record["image"] = images[0]
    elif len(images) > 1:
        # MiniCPM names each image by its own placeholder: the k-th <image> becomes <image_0k>.
        keys = [f"<image_{k:02d}>" for k in range(len(images))]
        record["image"] = dict(zip(keys, images))
        k = 0
        for turn in turns:
            pieces = turn["content"].split(IMAGE)
            text = pieces[0]
            for piece in pieces[1:]:
                text += f"<image_{k:02d}>" + piece
                k += 1
            turn["content"] = text
    record["conversations"] = turns
    return _with_meta(record, sample)


def to_qwen(sample: Sample, i: int, out_dir: str, absolute: bool) -> dict:
    images = iter(image_ref(p, out_dir, absolute) for p in sample.images)
    turns = []
    for turn, pieces in zip(sample.turns, _split_at_placeholders(sample, i, "qwen")):
        text = pieces[0]
        for piece in pieces[1:]:
            path = next(images, None)
            # A placeholder with no image stays a literal <image>, so the mismatch survives.
            text += (IMAGE if path is None else f"<|vision_start|>{path}<|vision_end|>") + piece
        turns.append({"from": turn.role, "value": text})
    return _with_meta({"id": _sample_id(sample, i), "conversations": turns}, sample)


def to_messages(sample: Sample, i: int, out_dir: str, absolute: bool) -> dict:
    images = iter(image_ref(p, out_dir, absolute) for p in sample.images)
    messages = []
    for turn, pieces in zip(sample.turns, _split_at_placeholders(sample, i, "messages")):
        parts: list[dict] = []
        for k, piece in enumerate(pieces):
            if k:
                path = next(images, None)
                if path is None:
                    parts.append({"type": "text", "text": IMAGE})
                else:
                    parts.append({"type": "image", "image": path})
            if piece:
                parts.append({"type": "text", "text": piece})
        messages.append({"role": turn.role, "content": parts})
    return _with_meta({"id": _sample_id(sample, i), "messages": messages}, sample)


def to_llava(sample: Sample, i: int, out_dir: str, absolute: bool) -> dict:
    images = [image_ref(p, out_dir, absolute) for p in sample.images]
    record: dict = {"id": _sample_id(sample, i)}
    if images:
        record["image"] = images[0] if len(images) == 1 else images
    record["conversations"] = [{"from": LLAVA_ROLES[t.role], "value": t.text} for t in sample.turns]
    return _with_meta(record, sample)


def to_flat(sample: Sample, i: int, out_dir: str, absolute: bool) -> tuple[dict, bool]:
    """One csv row; the flag says whether a user prompt was dropped to fit the format."""
    roles = [t.role for t in sample.turns]
    problem = None
    if len(sample.images) != 1:
        problem = f"it has {len(sample.images)} images"
    elif roles != ["user", "assistant"]:
        problem = f"its turns are {'/'.join(roles)}, not one user and one assistant turn"
    elif sample.turns[0].text.count(IMAGE) != 1:
        problem = f"its user turn has {sample.turns[0].text.count(IMAGE)} {IMAGE} placeholders"
    if problem:
        raise DataError(f"{_where(sample, i)}: cannot be written as csv: {problem} — csv holds one image and "
                        "one answer per row; write a JSON format instead (minicpm, qwen, messages or llava)")
    row = {"id": _sample_id(sample, i), "image_path": image_ref(sample.images[0], out_dir, absolute),
           "text": sample.turns[1].text}
    return _with_meta(row, sample), sample.turns[0].text.strip() != IMAGE


WRITERS = {"minicpm": to_minicpm, "qwen": to_qwen, "messages": to_messages, "llava": to_llava}
