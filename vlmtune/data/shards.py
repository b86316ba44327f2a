"""Shard folders: samples with their images embedded, instead of a million small image files.

    from vlmtune.data.shards import write_shards
    write_shards(samples, "data/coco/train", n_shards=8)      # what `data prepare --shards 8` does

A shard is a Parquet file of `table.SCHEMA` rows: the turns, the id, the record's other fields as
JSON, and every image as {path, bytes}: `bytes` the encoded file, never re-encoded, and `path` the
name it had (relative to `base` when given), so that records showing the same image still name the
same image, and the train/validation split groups them as it grouped the files. `data.train:
FOLDER` trains on such a folder (`table.open_shards`: memory-mapped, checked like a file); every
message names a record as `SHARD_FILE:ROW`.

The same layout, pushed to a hub (or kept in a local folder), can also be read as a stream
(`stream.py`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pyarrow.parquet as pq
from tqdm import tqdm

from vlmtune.data.images import EmbeddedImage
from vlmtune.data.sample import Sample
from vlmtune.data.table import ROWS_PER_BATCH, SCHEMA, samples_to_batch
from vlmtune.errors import DataError


def _embedded(sample: Sample, base: str | None) -> Sample:
    """The sample with every image file read into an `EmbeddedImage` under the name it had."""
    images = []
    for path in sample.images:
        if isinstance(path, EmbeddedImage):
            images.append(path)
            continue
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise DataError(f"{sample.source}: cannot read image {path} ({type(e).__name__}: {e.strerror or e}) — "
                            "fix the record (`vlmtune data check` lists every such problem) and write the "
                            "shards again") from None
        name = os.path.relpath(path, base) if base and Path(path).is_relative_to(base) else str(path)
        images.append(EmbeddedImage(name, data))
    return Sample(images=images, turns=sample.turns, id=sample.id, source=sample.source, meta=sample.meta)


def write_shards(samples: Sequence[Sample], folder: str | Path, n_shards: int, name: str = "train",
                 base: str | Path | None = None, progress: bool = True) -> list[Path]:
    """Write `samples`, images embedded, as `n_shards` Parquet files FOLDER/NAME-0000K-of-0000N.parquet.

    The samples keep their order (shard k holds the k-th n/N of them). Image names are made
    relative to `base` when they lie under it. The folder is built beside its destination and
    renamed into place: a failure leaves nothing.

    Raises:
        DataError: an image cannot be read (named with its record); `n_shards` < 1; FOLDER exists.
    """
    folder = Path(folder)
    if n_shards < 1:
        raise DataError(f"--shards {n_shards}: give at least 1")
    if folder.exists() and any(folder.iterdir()):
        raise DataError(f"{folder} already exists and is not empty; choose another folder for the shards")
    folder.parent.mkdir(parents=True, exist_ok=True)
    n = len(samples)
    n_shards = max(1, min(n_shards, n))
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    written = []
    try:
        with tqdm(total=n, desc=f"writing {name} shards", unit="sample", disable=not progress or n < 1000) as bar:
            for k in range(n_shards):
                start, stop = k * n // n_shards, (k + 1) * n // n_shards
                path = tmp / f"{name}-{k:05d}-of-{n_shards:05d}.parquet"
                with pq.ParquetWriter(str(path), SCHEMA) as writer:
                    for a in range(start, stop, ROWS_PER_BATCH):
                        b = min(a + ROWS_PER_BATCH, stop)
                        chunk = samples.chunk(a, b) if hasattr(samples, "chunk") else samples[a:b]
                        writer.write_batch(samples_to_batch([_embedded(s, base) for s in chunk]), row_group_size=500)
                        bar.update(b - a)
                written.append(folder / path.name)
        if folder.exists():
            folder.rmdir()  # empty, as checked above
        os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return written
