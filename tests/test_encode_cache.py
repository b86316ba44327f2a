"""`data.cache_dir`: a cache hit returns exactly the tensors a fresh encoding gives; any edit to the
sample, an image file, the prompt settings or the processor misses (never stale tensors); two
processes writing the same entries at once never expose a torn file; a damaged entry is reported,
encoded again and rewritten; a second `train` run reads the entries instead of writing them."""

from __future__ import annotations

import copy
import multiprocessing
import os
import time
import warnings
from pathlib import Path

import pytest
import torch

from conftest import base_overrides, caption_records, draw, read_jsonl, write_json
from vlmtune.config import load_config
from vlmtune.data.collate import EncodedDataset
from vlmtune.data.encode import Encoder
from vlmtune.data.encode_cache import EncodeCache
from vlmtune.data.formats import load_samples
from vlmtune.data.sample import Turn
from vlmtune.fileio import tensors_checksum
from vlmtune.train import train


@pytest.fixture
def samples(tmp_path):
    """Three one-image samples in their own folder (tests edit the image files)."""
    return load_samples(write_json(tmp_path / "data" / "train.json", caption_records(3, tmp_path / "data")))


def assert_same(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(expected)  # same keys, same order
    for key in expected:
        assert got[key].dtype == expected[key].dtype, key
        assert torch.equal(got[key], expected[key]), key


def entries(cache: EncodeCache) -> list[Path]:
    return sorted(cache.folder.glob("*/*.safetensors"))


@pytest.mark.parametrize("prompt_only", [False, True], ids=["train", "prompt"])
def test_a_hit_returns_exactly_the_fresh_encoding(qwen2_vl_parts, samples, tmp_path, prompt_only):
    processor, family = qwen2_vl_parts
    encoder = Encoder(processor, family, system_prompt="You describe pictures.")
    fresh = [encoder.encode_prompt(s) if prompt_only else encoder.encode(s) for s in samples]

    first = EncodeCache(tmp_path / "cache", encoder)
    dataset = EncodedDataset(samples, encoder, prompt_only=prompt_only, cache=first)
    for i, expected in enumerate(fresh):
        assert_same(dataset[i], expected)
    assert (first.misses, first.hits) == (3, 0) and len(entries(first)) == 3

    # a later run: a new encoder and cache object over the same folder
    again = EncodeCache(tmp_path / "cache", Encoder(processor, family, system_prompt="You describe pictures."))
    assert again.folder == first.folder
    dataset = EncodedDataset(samples, encoder, prompt_only=prompt_only, cache=again)
    for i, expected in enumerate(fresh):
        assert_same(dataset[i], expected)
    assert (again.misses, again.hits) == (0, 3)
    assert (first.folder / "fingerprint.json").is_file()


def edit_turn(samples, encoder, tmp_path):
    samples[0].turns[-1] = Turn("assistant", "a blue circle")
    return samples, encoder


def edit_image_same_size_and_mtime(samples, encoder, tmp_path):
    path = samples[0].images[0]
    before = os.stat(path)
    draw(Path(path), "yellow", "triangle")  # same size in pixels, other content
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # as `cp -p` or a coarse clock would leave it
    return samples, encoder


def edit_prompt(samples, encoder, tmp_path):
    return samples, Encoder(encoder.processor, encoder.family, prompt="Describe it.", system_prompt="Be brief.")


def edit_image_size(samples, encoder, tmp_path):
    return samples, Encoder(encoder.processor, encoder.family, image_size=(56, 56))


def edit_pixel_budget(samples, encoder, tmp_path):
    processor = copy.deepcopy(encoder.processor)
    processor.image_processor.size = {"shortest_edge": 28 * 28, "longest_edge": 56 * 56}  # as load_processor sets data.max_pixels
    return samples, Encoder(processor, encoder.family)


def edit_tokenizer(samples, encoder, tmp_path):
    processor = copy.deepcopy(encoder.processor)
    processor.tokenizer.add_tokens(["circle"])  # a new whole-word token changes the ids of the answers
    return samples, Encoder(processor, encoder.family)


def edit_chat_template(samples, encoder, tmp_path):
    processor = copy.deepcopy(encoder.processor)
    processor.chat_template = processor.chat_template.replace("You are a helpful assistant.", "You are terse.")
    return samples, Encoder(processor, encoder.family)


@pytest.mark.parametrize("edit", [edit_turn, edit_image_same_size_and_mtime, edit_prompt, edit_image_size,
                                  edit_pixel_budget, edit_tokenizer, edit_chat_template])
def test_any_edit_misses_and_never_returns_stale_tensors(qwen2_vl_parts, samples, tmp_path, edit):
    processor, family = qwen2_vl_parts
    encoder = Encoder(processor, family)
    cache = EncodeCache(tmp_path / "cache", encoder)
    old = cache.encode(samples[0])
    assert cache.misses == 1 and torch.equal(cache.encode(samples[0])["input_ids"], old["input_ids"])

    samples, encoder = edit(samples, encoder, tmp_path)
    expected = encoder.encode(samples[0])
    changed = [k for k in expected if k not in old or not torch.equal(expected[k], old[k])]
    assert changed, "the edit must change the encoding, or this test shows nothing"
    cache = EncodeCache(tmp_path / "cache", encoder)
    assert_same(cache.encode(samples[0]), expected)
    assert (cache.misses, cache.hits) == (1, 0)


def _hammer(cache: EncodeCache, key: str, tensors: dict, rounds: int, start: float, result) -> None:
    """Write the same entry over and over while reading it back; count reads that were not whole.

    Runs in a forked process: no torch kernel here (an OpenMP pool inherited through fork can hang);
    entries are compared by checksum, computed from the raw bytes."""
    expected = tensors_checksum(tensors)
    while time.time() < start:
        pass
    bad = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(rounds):
            cache.store(key, tensors)
            got = cache.load(key)
            if got is None or tensors_checksum(got) != expected:
                bad += 1
    result.put(bad + cache.corrupt)


def test_two_processes_writing_the_same_entries_never_expose_a_torn_file(qwen2_vl_parts, samples, tmp_path):
    processor, family = qwen2_vl_parts
    encoder = Encoder(processor, family)
    cache = EncodeCache(tmp_path / "cache", encoder)
    key = cache.key(samples[0])
    # Big pixel tensors make each write take long enough for the other process to read mid-write.
    tensors = dict(encoder.encode(samples[0]))
    tensors["pixel_values"] = torch.randn(512, 1176)
    context = multiprocessing.get_context("fork")
    result = context.Queue()
    start = time.time() + 0.5
    workers = [context.Process(target=_hammer, args=(cache, key, tensors, 100, start, result)) for _ in range(2)]
    for w in workers:
        w.start()
    bad = [result.get(timeout=120) for _ in workers]
    for w in workers:
        w.join(timeout=60)
        assert w.exitcode == 0
    assert bad == [0, 0]
    assert_same(cache.load(key), tensors)
    assert not list(cache.folder.rglob("*.tmp"))  # every temporary file was renamed into place


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_a_data_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # inside the last tensor's bytes: the header still parses
    path.write_bytes(bytes(data))


def empty(path: Path) -> None:
    path.write_bytes(b"")


@pytest.mark.parametrize("damage", [truncate, flip_a_data_byte, empty])
def test_a_damaged_entry_is_reported_encoded_again_and_rewritten(qwen2_vl_parts, samples, tmp_path, damage):
    processor, family = qwen2_vl_parts
    encoder = Encoder(processor, family)
    expected = encoder.encode(samples[0])
    cache = EncodeCache(tmp_path / "cache", encoder)
    cache.encode(samples[0])
    (entry,) = entries(cache)
    damage(entry)

    with pytest.warns(UserWarning, match=rf"{entry}: damaged encoding-cache entry for .*train.json:0"):
        got = cache.encode(samples[0])
    assert_same(got, expected)
    assert cache.corrupt == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the entry was rewritten whole: read back without a warning
        assert_same(cache.encode(samples[0]), expected)
    assert cache.hits == 1


@pytest.mark.long
def test_a_second_run_reads_the_cache_and_trains_the_same(tiny_qwen2_vl, caption_data, tmp_path):
    cache_dir = tmp_path / "cache"
    logs, stamps = [], []
    for run in ("first", "second"):
        out = train(load_config(None, base_overrides(tiny_qwen2_vl, caption_data["train"], tmp_path / run,
                                                     f"data.cache_dir={cache_dir}", "train.max_steps=4")))
        logs.append([r["loss"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r])
        stamps.append({p: p.stat().st_mtime_ns for p in cache_dir.rglob("*.safetensors")})
    # 4 samples, 2 epochs: one entry each, written in the first epoch of the first run; the second
    # run wrote no entry and rewrote none
    assert len(stamps[0]) == 4
    assert stamps[1] == stamps[0]
    assert logs[0] == logs[1] and len(logs[0]) == 4
