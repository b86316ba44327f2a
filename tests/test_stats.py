"""`vlmtune data stats`: counts worked out by hand on a three-sample file, and token lengths,
histogram and max_length rejections with a tiny model's real processor."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlmtune import cli
from vlmtune.data.encode import Encoder
from vlmtune.data.formats import load_samples
from vlmtune.data.stats import compute_stats
from vlmtune.data_commands import stats_command
from vlmtune.models import family_for
from vlmtune.models.load import load_processor
from vlmtune.models.tiny import build_tiny_model

SIZES = {"a.png": (10, 20), "b.png": (30, 40), "c.png": (50, 60)}


def write_data(folder: Path, extra: list[dict] = ()) -> Path:
    """Three samples: one image each for the first two, two images and two exchanges for the third."""
    for name, size in SIZES.items():
        Image.new("RGB", size, (200, 40, 40)).save(folder / name)
    records = [
        {"id": "s1", "image": "a.png", "conversations": [
            {"role": "user", "content": "<image>\nWhat?"}, {"role": "assistant", "content": "abc"}]},
        {"id": "s2", "image": "b.png", "conversations": [
            {"role": "user", "content": "<image>"}, {"role": "assistant", "content": "hello"}]},
        {"id": "s3", "image": {"<image_00>": "a.png", "<image_01>": "c.png"}, "conversations": [
            {"role": "user", "content": "<image_00>\n<image_01>\nCompare."}, {"role": "assistant", "content": "same"},
            {"role": "user", "content": "Why?"}, {"role": "assistant", "content": "because"}]},
        *extra,
    ]
    path = folder / "train.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_model("qwen2_vl", tmp_path_factory.mktemp("stats") / "tiny")


def test_counts_and_sizes_match_the_hand_computed_numbers(tmp_path, capsys):
    data = write_data(tmp_path)
    stats = compute_stats(load_samples(data))
    assert stats.n_samples == 3
    assert stats.turns == [2, 2, 4] and dict(stats.roles) == {"user": 4, "assistant": 4}
    assert stats.images == [1, 1, 2]
    assert sorted(stats.sizes.values()) == [(10, 20), (30, 40), (50, 60)]  # a.png counted once
    assert stats.answer_chars == [3, 5, 7]  # abc, hello, because
    assert stats.text_chars == [9, 5, 25]  # "\nWhat?"+"abc"; "hello"; "\n\nCompare."+"same"+"Why?"+"because"

    assert stats_command(str(data)) == 0
    out = capsys.readouterr().out
    assert f"{data}: 3 samples (minicpm)" in out
    for line in ("turns:          8 (assistant 4, user 4); per sample min 2, median 2, max 4",
                 "images:         4 in samples, 3 distinct files; per sample min 1, median 1, max 2",
                 "image width:    min 10, median 30, max 50",
                 "image height:   min 20, median 40, max 60",
                 "answer length:  min 3, median 5, max 7",
                 "text length:    min 5, median 9, max 25"):
        assert line in out
    assert "tokens:" not in out and not (tmp_path / "train.tokens.png").exists()  # no model: no histogram


def test_token_lengths_histogram_and_max_length_rejections(tmp_path, tiny, capsys):
    data = write_data(tmp_path)
    family = family_for(tiny)
    encoder = Encoder(load_processor(tiny, family), family)
    lengths = [len(encoder.encode(s)["input_ids"]) for s in load_samples(data)]  # full encoding, pixels and all
    limit = min(lengths)
    rejected = sum(n > limit for n in lengths)
    assert rejected >= 1  # the two-image, two-exchange sample is the longest

    assert cli.main(["data", "stats", str(data), "--model", str(tiny), "--max-length", str(limit)]) == 0
    out = capsys.readouterr().out
    expected = np.percentile(lengths, [50, 90, 95, 99])
    stats = compute_stats(load_samples(data), encoder)
    assert stats.tokens == lengths
    assert stats.token_percentiles() == {"min": min(lengths), "p50": expected[0], "p90": expected[1],
                                         "p95": expected[2], "p99": expected[3], "max": max(lengths)}
    assert f"tokens:         min {min(lengths)}, " in out and f", max {max(lengths)}, mean " in out
    assert f"max_length {limit}: would reject {rejected} of 3 measured samples ({100 * rejected / 3:.1f}%)" in out
    histogram = tmp_path / "train.tokens.png"
    assert f"histogram:      {histogram}" in out
    with Image.open(histogram) as im:
        assert im.format == "PNG" and im.size[0] > 100

    custom = tmp_path / "plots" / "lengths.png"
    assert stats_command(str(data), model=str(tiny), plot=str(custom)) == 0
    assert custom.is_file()


def test_missing_images_are_reported_and_not_measured(tmp_path, tiny, capsys):
    broken = {"id": "s4", "image": "gone.png", "conversations": [
        {"role": "user", "content": "<image>"}, {"role": "assistant", "content": "x"}]}
    data = write_data(tmp_path, [broken])
    assert stats_command(str(data), model=str(tiny), max_length=100000) == 0
    out = capsys.readouterr().out
    assert f"unreadable:     1 image reference(s) missing or unreadable, first: {data}:3: " in out
    assert f"not measured:   1 sample(s), first: {data}:3: image missing or unreadable" in out
    assert "max_length 100000: would reject 0 of 3 measured samples (0.0%)" in out


def test_max_length_and_plot_need_a_model(tmp_path, capsys):
    data = write_data(tmp_path)
    assert cli.main(["data", "stats", str(data), "--max-length", "100"]) == 2
    assert "--max-length and --plot need --model" in capsys.readouterr().err
