"""Datasets read as a stream: for data that does not fit on disk.

    from vlmtune.data.stream import CheckedStream, stream_samples
    for sample in stream_samples("ORG/NAME", split="train", rank=0, world_size=2): ...

A streamed dataset is in the shard layout (`table.SCHEMA`, what `vlmtune data prepare --shards N`
writes), on a hub or in a local folder, read with `datasets.load_dataset(..., streaming=True)`:
nothing is stored, and each rank reads its own part (`datasets.distributed.split_dataset_by_node`).
It cannot be checked whole before training, so the pre-flight check runs on its first records
(`sample_check`), and `CheckedStream` checks every record as it arrives and applies
`data.on_bad_sample` to it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from vlmtune.data.check import CheckReport, Problem, check_samples, sample_problems
from vlmtune.data.sample import Sample
from vlmtune.data.table import SCHEMA, row_to_sample
from vlmtune.errors import BadSampleError, DataError


# --- streaming -----------------------------------------------------------------------------------

def stream_samples(name: str, split: str = "train", rank: int = 0, world_size: int = 1) -> Iterator[Sample]:
    """The samples of a dataset in the shard layout, streamed with `datasets.load_dataset(...,
    streaming=True)`: a hub id, or a local folder of shards. Under several ranks each reads its own
    part: whole shards when their number divides by the ranks, else every world_size-th record.
    A sample's source is `NAME[SPLIT]:INDEX` (`NAME[SPLIT] rank R/W:INDEX` under several ranks).

    Raises:
        DataError: the dataset cannot be opened, or its records are not in the shard layout.
    """
    import datasets
    from datasets.distributed import split_dataset_by_node

    try:
        ds = datasets.load_dataset(name, split=split, streaming=True)
    except Exception as e:  # the library raises many classes for a bad id, split or folder
        raise DataError(f"{name}: cannot open it as a streamed dataset ({type(e).__name__}: "
                        f"{(str(e).strip().splitlines() or [''])[0][:300]}) — check the hub id (or the folder) and the "
                        f"split {split!r}") from None
    if world_size > 1:
        ds = split_dataset_by_node(ds, rank=rank, world_size=world_size)
    label = f"{name}[{split}]" + (f" rank {rank}/{world_size}" if world_size > 1 else "")
    for i, row in enumerate(ds):
        missing = [c for c in SCHEMA.names if c not in row]
        if missing:
            raise DataError(f"{label}:{i}: the record has no {', '.join(missing)} column(s) (it has "
                            f"{', '.join(row)}) — a streamed dataset must be in vlmtune's shard layout: write it "
                            "with `vlmtune data prepare --shards N` and push that folder")
        yield row_to_sample(row, f"{label}:{i}")


def sample_check(stream: Iterator[Sample], n: int, encoder=None, max_length: int | None = None,
                 deep: bool = False) -> tuple[CheckReport, list[Sample]]:
    """The pre-flight check of a stream's first `n` records: a `CheckReport` about a sample of the
    data (a stream cannot be checked whole before training), and those records."""
    head = []
    for sample in stream:
        head.append(sample)
        if len(head) >= n:
            break
    return check_samples(head, encoder, max_length, progress=False, num_proc=1, deep=deep), head


class CheckedStream(torch.utils.data.IterableDataset):
    """Encoded training samples of a stream, each checked as it arrives (`check.sample_problems`:
    images, placeholders, roles, empty turns, length) before it is encoded.

    A bad record follows `policy` (data.on_bad_sample): `skip` appends it to `rejected` as one JSON
    line (source, problems) and goes on with the next; `error` raises `BadSampleError` naming it.

    Args:
        open_stream: a function giving a fresh iterator of samples (called once per epoch).
    """

    def __init__(self, open_stream, encoder, max_length: int | None, policy: str, rejected: str | Path,
                 deep: bool = False):
        self.open_stream = open_stream
        self.encoder = encoder
        self.max_length = max_length
        self.policy = policy
        self.rejected = Path(rejected)
        self.deep = deep
        self.skipped = 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        seen = {"sizes": {}, "problems": {}}
        for sample in self.open_stream():
            problems = sample_problems(sample, self.encoder, self.max_length, self.deep, seen)
            if not problems:
                yield self.encoder.encode(sample)
                continue
            if self.policy != "skip":
                listing = "; ".join(str(Problem(0, sample.source, kind, message)) for kind, message in problems)
                raise BadSampleError(f"{listing} — fix this record, or set data.on_bad_sample=skip to train "
                                     "without the bad records of the stream")
            self.skipped += 1
            line = json.dumps({"source": sample.source, "id": sample.id, "problems": [m for _, m in problems],
                               "during": "streaming"}, ensure_ascii=False)
            self.rejected.parent.mkdir(parents=True, exist_ok=True)
            with open(self.rejected, "a", encoding="utf-8") as f:
                f.write(line + "\n")
