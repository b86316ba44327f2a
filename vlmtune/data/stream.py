"""Datasets read as a stream: for data that does not fit on disk.

    from vlmtune.data.stream import CheckedStream, stream_samples
    for sample in stream_samples("ORG/NAME", split="train", rank=0, world_size=2): ...

A streamed dataset is in the shard layout (`table.SCHEMA`, what `vlmtune data prepare --shards N`
writes), on a hub or in a local folder, read with `datasets.load_dataset(..., streaming=True)`:
nothing is stored, and each rank reads its own part (`datasets.distributed.split_dataset_by_node`).
It cannot be checked whole before training, so the pre-flight check runs on its first records
(`sample_check`), and `CheckedStream` checks every record as it arrives and applies
`data.on_bad_sample` to it. `vlmtune train` reads one with `data.stream: true`
(`training_stream`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import torch

from vlmtune.config import RunConfig
from vlmtune.data.check import CheckReport, Problem, check_samples, sample_problems
from vlmtune.data.collate import hash_images
from vlmtune.data.encode import Encoder
from vlmtune.data.sample import Sample
from vlmtune.data.table import SCHEMA, row_to_sample
from vlmtune.errors import BadSampleError, ConfigError, DataError

# What a record that passed its check can still raise while it is encoded (an image whose header
# reads but whose pixels do not); PIL reports broken files with all of these.
LOAD_ERRORS = (OSError, ValueError, SyntaxError, DataError)
SEEN_LIMIT = 10_000  # image sizes remembered between records; forgotten past this, so memory stays flat


# --- streaming -----------------------------------------------------------------------------------

def stream_samples(name: str, split: str = "train", rank: int = 0, world_size: int = 1) -> Iterator[Sample]:
    """The samples of a dataset in the shard layout, streamed with `datasets.load_dataset(...,
    streaming=True)`: a hub id, or a local folder of shards. Under several ranks each reads its own
    part: whole shards when their number divides by the ranks, else every world_size-th record.
    In a DataLoader worker, `datasets` gives each worker whole shards of that part.
    A sample's source is `NAME[SPLIT]:INDEX` (`NAME[SPLIT] rank R/W:INDEX` under several ranks, with
    ` worker K/N` in a DataLoader worker): INDEX counts the records that this reader was given.

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
    worker = torch.utils.data.get_worker_info()
    if worker is not None and worker.num_workers > 1:
        label += f" worker {worker.id}/{worker.num_workers}"
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

    A bad record (or one whose image fails to decode) follows `policy` (data.on_bad_sample): `skip`
    appends it to `rejected` as one JSON line (source, problems), once however often it comes
    round, and goes on with the next; `error` raises `BadSampleError` naming it.

    Args:
        open_stream: a function giving a fresh iterator of samples (called at each pass).
        repeat: start a new pass whenever the stream runs out, forever (`vlmtune train` stops at
            train.max_steps). The Trainer then sees one unbroken sequence of batches: the ranks'
            parts, of different lengths, never end at different steps, and a resume that skips
            the first N batches lands where the run stopped, in whichever pass that was.
        image_keys: add `image_keys` (a hash of each image) for the vision feature cache.
    """

    def __init__(self, open_stream: Callable[[], Iterator[Sample]], encoder: Encoder, max_length: int | None,
                 policy: str, rejected: str | Path, deep: bool = False, repeat: bool = False,
                 image_keys: bool = False):
        self.open_stream = open_stream
        self.encoder = encoder
        self.max_length = max_length
        self.policy = policy
        self.rejected = Path(rejected)
        self.deep = deep
        self.repeat = repeat
        self.image_keys = image_keys
        self.skipped = 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        listed = self._listed()
        while True:
            records = kept = 0
            seen = {"sizes": {}, "problems": {}}
            for sample in self.open_stream():
                records += 1
                if len(seen["sizes"]) + len(seen["problems"]) > SEEN_LIMIT:
                    seen = {"sizes": {}, "problems": {}}
                problems = sample_problems(sample, self.encoder, self.max_length, self.deep, seen)
                if not problems:
                    try:
                        item = self.encoder.encode(sample)
                    except LOAD_ERRORS as e:
                        problems = [("cannot load", f"cannot be loaded ({type(e).__name__}: {e})")]
                if problems:
                    self._reject(sample, problems, listed)
                    continue
                kept += 1
                if self.image_keys and "image_grid_thw" in item:
                    item["image_keys"] = hash_images(item["pixel_values"], item["image_grid_thw"])
                yield item
            if records and not kept:
                raise DataError(f"every one of the {records} records of a whole pass of the stream was rejected; "
                                f"see {self.rejected}")
            if not self.repeat or not records:
                # An empty part ends here: a DataLoader worker given no shard, or a stream with no records
                # (training_stream's pre-flight has refused that before training starts).
                return

    def _listed(self) -> set[str]:
        """The sources `rejected` already lists (a resume reads the records before its step again)."""
        try:
            lines = self.rejected.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return set()
        return {json.loads(line).get("source") for line in lines if line.strip()}

    def _reject(self, sample: Sample, problems: list[tuple[str, str]], listed: set[str]) -> None:
        if self.policy != "skip":
            listing = "; ".join(str(Problem(0, sample.source, kind, message)) for kind, message in problems)
            raise BadSampleError(f"{listing} — fix this record, or set data.on_bad_sample=skip to train "
                                 "without the bad records of the stream")
        self.skipped += 1
        if sample.source in listed:
            return
        listed.add(sample.source)
        print(f"skipping {sample.source}: {'; '.join(m for _, m in problems)} (listed in {self.rejected})", flush=True)
        line = json.dumps({"source": sample.source, "id": sample.id, "problems": [m for _, m in problems],
                           "during": "streaming"}, ensure_ascii=False)
        self.rejected.parent.mkdir(parents=True, exist_ok=True)
        with open(self.rejected, "a", encoding="utf-8") as f:
            f.write(line + "\n")


def training_stream(config: RunConfig, encoder: Encoder, rejected: Path, rank: int = 0, world_size: int = 1,
                    log: Callable[[str], None] = print) -> CheckedStream:
    """`data.train` as the training data of one rank (data.stream): its part of the stream,
    after the pre-flight check of its first `data.stream_check_samples` records, repeated
    until train.max_steps.

    Raises:
        ConfigError: data.train is not set.
        DataError: the stream cannot be opened or gives no records; the sample has problems under
            data.on_bad_sample=error.
    """
    d = config.data
    if not d.train:
        raise ConfigError("data.train is not set: with data.stream=true give a hub id (ORG/NAME) or a local folder "
                          "of shards (`vlmtune data prepare --shards N`)")
    open_stream = partial(stream_samples, d.train, d.stream_split, rank, world_size)  # picklable, for workers
    report, head = sample_check(open_stream(), d.stream_check_samples, encoder, d.max_length, d.deep_check)
    part = f"rank {rank}/{world_size}'s part of " if world_size > 1 else ""
    if not head:
        reader = f"rank {rank}/{world_size}" if part else "this run"
        raise DataError(f"{d.train}[{d.stream_split}]: the stream gives {reader} no records — check the dataset and "
                        "data.stream_split" + (" (a rank gets none when the stream has fewer records than there are "
                                               "ranks)" if part else ""))
    sample = f"a sample: the first {len(head)} records of {part}the stream"
    log(f"train data: streamed from {d.train} (split {d.stream_split}); "
        + (f"each of the {world_size} ranks reads its own part; " if world_size > 1 else "")
        + f"pre-flight check on {sample}:\n{report.summary()}")
    if report.problems and d.on_bad_sample == "error":
        raise DataError(f"pre-flight check failed on {sample}:\n{report.listing()}\n"
                        "Fix these records, or set data.on_bad_sample=skip to train without them.")
    log("every record is checked as it arrives; "
        + ("bad ones stop the run (data.on_bad_sample=error)" if d.on_bad_sample == "error"
           else f"bad ones are skipped and listed in {rejected}"))
    return CheckedStream(open_stream, encoder, d.max_length, d.on_bad_sample, rejected, deep=d.deep_check,
                         repeat=True, image_keys=config.train.cache_vision_features)
