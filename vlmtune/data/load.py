"""A run's training and validation samples, read from the files its config names.

    from vlmtune.data.load import load_data
    train, val = load_data(config)

`vlmtune train` trains and validates on these, and `vlmtune eval` without --data evaluates on the
same validation side, so both see one split.
"""

from __future__ import annotations

from vlmtune.config import RunConfig
from vlmtune.data.sample import Sample
from vlmtune.data.split import split_samples
from vlmtune.errors import ConfigError


def split_val(samples: list[Sample], size: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """The in-training validation split: `data split`'s rule (`vlmtune/data/split.py`), grouped by image."""
    return split_samples(samples, size, seed, what="data.val_size") if size else (samples, [])


def load_data(config: RunConfig) -> tuple[list[Sample], list[Sample]]:
    """(train, val): `data.val` when given, else `data.val_size` images split off `data.train`.

    Raises:
        ConfigError: `data.train` is not set.
    """
    from vlmtune.data.formats import load_samples

    if not config.data.train:
        raise ConfigError("data.train is not set: give the training file, e.g. data.train=data/train.json")
    train = load_samples(config.data.train, config.data.format)
    if config.data.val:
        return train, load_samples(config.data.val, config.data.format)
    return split_val(train, config.data.val_size, config.data.seed)
