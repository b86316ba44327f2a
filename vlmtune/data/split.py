"""The one train/validation split rule: whole image groups, drawn reproducibly from a seed.

    from vlmtune.data.split import split_samples
    train, val = split_samples(samples, "0.1", seed=0)     # or 4 (a count), or 0.1 (a float)

`vlmtune data split`, `vlmtune data prepare` and the validation split inside `vlmtune train`
(`data.val_size`) all call `split_samples`, so the same data, size and seed give the same split
everywhere.

Records that share an image go to the same side: COCO has five captions per image, and a
validation image whose other captions were trained on measures memory, not captioning. Groups
are the connected sets of records linked by a common image file (most often: the records of one
image); a record without images is a group of its own. The size counts groups (images), a
fraction is a fraction of the groups, and the groups are shuffled with `random.Random(seed)`.
Both sides keep the records' original order. When every record has its own image this is the
plain record-level draw `data split` always made.
"""

from __future__ import annotations

import os
import random
import re

from vlmtune.data.sample import Sample
from vlmtune.errors import VlmtuneError


def parse_val(val: str | int | float, total: int, what: str = "--val", unit: str = "sample") -> int:
    """Number of validation groups for a size given as a count ("4", 4) or a fraction ("0.1", 0.1).

    Args:
        val: the size as typed on the command line, or as a number from a config.
        total: how many groups there are to split.
        what: how the size is named in messages ("--val", "data.val_size").
        unit: what `total` counts, for messages.

    Raises:
        VlmtuneError: `val` is neither, or leaves nothing on one side of the split.
    """
    text = str(val).strip()
    if isinstance(val, float) and val >= 1 and val.is_integer():
        text = str(int(val))  # a config's 4.0 is the count 4
    if re.fullmatch(r"\d+", text):
        count = int(text)
    elif re.fullmatch(r"\d*\.\d+|\d+\.\d*|\d+(?:\.\d*)?[eE][-+]?\d+", text) and 0 < float(text) < 1:
        # Round half up (not Python's half-to-even) and keep at least one on each side.
        count = min(max(int(total * float(text) + 0.5), 1), max(total - 1, 1))
    else:
        raise VlmtuneError(f"{what} {val!r} is not a count (e.g. 4) or a fraction between 0 and 1 (e.g. 0.1)")
    if total < 2:
        raise VlmtuneError(f"cannot split {total} {unit}(s): train and val each need at least one")
    if not 0 < count < total:
        raise VlmtuneError(f"{what} {val} asks for {count} of {total} {unit}s — it must leave at least one "
                           f"{unit} for each of train and val (1 to {total - 1})")
    return count


def image_groups(samples: list[Sample]) -> list[list[int]]:
    """The indices of `samples` in groups linked by a shared image file, ordered by their first
    record; a record without images is a group of its own."""
    parent = list(range(len(samples)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[str, int] = {}  # image file -> first record that shows it
    # a SampleTable gives its image columns without building a Sample per record
    image_lists = samples.image_lists() if hasattr(samples, "image_lists") else (s.images for s in samples)
    for i, images in enumerate(image_lists):
        for image in images:
            key = image if "://" in image else os.path.normpath(os.path.abspath(image))
            if key in owner:
                parent[root(i)] = root(owner[key])
            else:
                owner[key] = i
    groups: dict[int, list[int]] = {}
    for i in range(len(samples)):
        groups.setdefault(root(i), []).append(i)
    return sorted(groups.values(), key=lambda g: g[0])


def split_samples(samples: list[Sample], val: str | int | float, seed: int,
                  what: str = "--val") -> tuple[list[Sample], list[Sample]]:
    """(train, val): `val` image groups (a count, or a fraction of the groups) drawn with `seed`.

    Raises:
        VlmtuneError: the size is malformed, or the groups cannot give both sides at least one.
    """
    groups = image_groups(samples)
    if len(groups) == len(samples):
        count = parse_val(val, len(groups), what)
    else:
        try:
            count = parse_val(val, len(groups), what, unit="image group")
        except VlmtuneError as e:
            raise VlmtuneError(f"{e}. Samples that share an image stay on one side, so {what} counts image groups: "
                               f"these {len(samples)} samples have {len(groups)}.") from None
    order = list(range(len(groups)))
    random.Random(seed).shuffle(order)
    chosen = {i for g in order[:count] for i in groups[g]}
    if hasattr(samples, "select"):  # a SampleTable: two views of it, nothing copied
        return (samples.select([i for i in range(len(samples)) if i not in chosen]),
                samples.select(sorted(chosen)))
    return ([s for i, s in enumerate(samples) if i not in chosen], [s for i, s in enumerate(samples) if i in chosen])
