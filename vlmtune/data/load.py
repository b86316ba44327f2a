"""A run's training and validation samples, read from the files its config names.

    from vlmtune.data.load import load_data
    train, val = load_data(config, cache_root="runs/x/data_cache")

`vlmtune train` trains and validates on these, and `vlmtune eval` without --data evaluates on the
same validation side, so both see one split. The training side is a `SampleTable`
(`vlmtune/data/table.py`): the records as memory-mapped Arrow columns, parsed in parallel once and
kept under `cache_root`, so a million records cost neither a million Python objects nor a second
parse on resume. The validation side is a plain list (it is small, and evaluation walks it whole).
"""

from __future__ import annotations

from pathlib import Path

from vlmtune.config import RunConfig
from vlmtune.data.sample import Sample
from vlmtune.data.split import split_samples
from vlmtune.data.table import SampleTable, open_records
from vlmtune.errors import ConfigError


def data_cache_root(config: RunConfig, out: str | Path) -> Path:
    """Where parsed records and pre-flight results are kept: `data.cache_dir` (shared by runs) when
    set, else the run folder's `data_cache/` (a resume finds them there)."""
    return Path(config.data.cache_dir) if config.data.cache_dir else Path(out) / "data_cache"


def split_val(samples, size: float, seed: int) -> tuple:
    """The in-training validation split: `data split`'s rule (`vlmtune/data/split.py`), grouped by image."""
    return split_samples(samples, size, seed, what="data.val_size") if size else (samples, [])


def load_data(config: RunConfig, cache_root: str | Path | None = None,
              progress: bool = True) -> tuple[SampleTable | None, list[Sample]]:
    """(train, val): `data.val` when given, else `data.val_size` images split off `data.train`.
    With `data.stream` the training side is None: it is read as it arrives (`vlmtune/data/stream.py`).

    Args:
        cache_root: keep the parsed records here (`data_cache_root`); None keeps them in memory.

    Raises:
        ConfigError: `data.train` is not set.
        DataError: a file or record that cannot be read, named with its index.
    """
    if not config.data.train:
        raise ConfigError("data.train is not set: give the training file, e.g. data.train=data/train.json")
    d = config.data
    if d.stream:
        return None, list(open_records(d.val, d.format, cache_root, d.num_proc, progress)) if d.val else []
    train = open_records(d.train, d.format, cache_root, d.num_proc, progress)
    if d.val:
        return train, list(open_records(d.val, d.format, cache_root, d.num_proc, progress))
    train, val = split_val(train, d.val_size, d.seed)
    return train, list(val)
