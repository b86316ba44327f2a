"""The data path at scale: records parsed in parallel into memory-mapped Arrow, the pre-flight check
in parallel (the same report as the serial check, problem for problem), its results cached and
recomputed when the data changes, and shard folders and streams that give the very samples, and
encoded tensors, of the JSON file they were made from."""

from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import base_overrides, draw, read_jsonl, write_json
from vlmtune.data import table as table_module
from vlmtune.data.check import check_samples
from vlmtune.data.check_cache import cached_check
from vlmtune.data.encode import Encoder
from vlmtune.data.formats import load_samples
from vlmtune.data.images import EmbeddedImage
from vlmtune.data.shards import write_shards
from vlmtune.data.split import split_samples
from vlmtune.data.stream import CheckedStream, sample_check, stream_samples
from vlmtune.data.table import SampleTable, open_records
from vlmtune.errors import BadSampleError, DataError

MAX_LENGTH = 100
LONG = " ".join(["a red circle and a blue square on the left"] * 12)
SIZES = [(112, 112), (56, 84), (84, 56), (140, 112)]
# Each kind of problem check.py knows, injected every `period` records from `offset`.
INJECTED = {"image is a URL": (53, 1), "missing image": (41, 2), "unreadable image": (47, 3),
            "placeholder count != image count": (43, 4), "bad role order": (59, 5), "empty turn": (61, 6),
            "cannot encode": (67, 7), "too long": (71, 8)}
TRUNCATED = (73, 9)  # a PNG cut short: its header reads, its pixels do not (found by the deep check only)


def conversation(question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def mixed_records(folder: Path, n: int) -> tuple[list[dict], dict[str, set[int]]]:
    """`n` MiniCPM records over 40 images of four sizes, with every kind of problem injected."""
    for k in range(40):
        draw(folder / "images" / f"{k}.png", ("red", "green", "blue", "yellow")[k % 4],
             ("circle", "square", "triangle")[k % 3], SIZES[k % 4])
    (folder / "images" / "garbage.png").write_bytes(b"not a picture\x00" * 20)
    whole = (folder / "images" / "0.png").read_bytes()
    (folder / "images" / "truncated.png").write_bytes(whole[: len(whole) // 2])
    expected: dict[str, set[int]] = {kind: set() for kind in INJECTED}
    records = []
    for i in range(n):
        record = {"id": f"r{i}", "image": f"images/{i % 40}.png",
                  "conversations": conversation("<image>\nWhat is in the picture?", f"shape {i} " + "word " * (i % 7))}
        kind = next((k for k, (period, offset) in INJECTED.items() if i % period == offset), None)
        if kind is None and i % TRUNCATED[0] == TRUNCATED[1]:
            record["image"] = "images/truncated.png"
        elif kind == "image is a URL":
            record["image"] = f"https://example.com/{i}.png"
        elif kind == "missing image":
            record["image"] = f"images/missing_{i}.png"
        elif kind == "unreadable image":
            record["image"] = "images/garbage.png"
        elif kind == "placeholder count != image count":
            record["conversations"][0]["content"] = "<image> and <image>?"
        elif kind == "bad role order":
            record["conversations"].insert(1, {"role": "user", "content": "Well?"})
        elif kind == "empty turn":
            record["conversations"][1]["content"] = "   "
        elif kind == "cannot encode":
            record["conversations"][0]["content"] = "<image>\nBREAK the template"
        elif kind == "too long":
            record["conversations"][1]["content"] = LONG
        if kind is not None:
            expected[kind].add(i)
        records.append(record)
    return records, expected


def breaking_encoder(processor, family) -> Encoder:
    """The tiny Qwen2-VL's processor with a chat template that renders a last message holding 'BREAK'
    differently, so those samples cannot be cut into turns: the check's 'cannot encode' problem."""
    processor = copy.copy(processor)
    processor.chat_template = ("{% for message in messages %}{% if loop.last and 'BREAK' in (message['content'] | string)"
                               " %}<|im_start|>note\n<|im_end|>\n{% endif %}" + processor.chat_template[len(
                                   "{% for message in messages %}"):])
    return Encoder(processor, family)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scale")
    records, expected = mixed_records(folder, 2000)
    return {"path": write_json(folder / "train.json", records), "expected": expected, "folder": folder}


def as_tuples(report) -> list[tuple]:
    return [(p.index, p.source, p.kind, p.message) for p in report.problems]


def test_parallel_check_finds_exactly_what_the_serial_check_finds(mixed, qwen2_vl_parts, tmp_path):
    processor, family = qwen2_vl_parts
    encoder = breaking_encoder(processor, family)
    samples = load_samples(mixed["path"])
    table = open_records(mixed["path"], cache_root=tmp_path, num_proc=2, progress=False)
    assert isinstance(table, SampleTable) and len(table) == 2000

    serial = check_samples(samples, encoder, MAX_LENGTH, progress=False, num_proc=1)
    parallel = check_samples(table, encoder, MAX_LENGTH, progress=False, num_proc=2)
    assert (serial.processes, parallel.processes) == (1, 2)
    assert as_tuples(parallel) == as_tuples(serial)
    assert parallel.token_lengths == serial.token_lengths
    # and the problems are the injected ones, each found on its record and nowhere else
    found = {kind: {p.index for p in serial.problems if p.kind == kind} for kind in INJECTED}
    assert found == mixed["expected"]
    assert len(serial.problems) == sum(len(v) for v in mixed["expected"].values())
    bad = serial.problems[0]
    assert bad.source == f"{mixed['path']}:{bad.index}"
    # the batched token count is the length of the encoded sample
    kinds = {p.index for p in serial.problems}
    measured = [i for i in range(2000) if i not in kinds or i in mixed["expected"]["too long"]]
    for position in (0, 1, 500, len(measured) - 1):
        i = measured[position]
        assert serial.token_lengths[position] == len(encoder.encode(samples[i])["input_ids"])

    # deep: every pixel decoded, which also finds the truncated image, in both modes alike
    deep_serial = check_samples(samples, encoder, MAX_LENGTH, progress=False, num_proc=1, deep=True)
    deep_parallel = check_samples(table, encoder, MAX_LENGTH, progress=False, num_proc=2, deep=True)
    assert as_tuples(deep_parallel) == as_tuples(deep_serial)
    truncated = {i for i in range(2000) if samples[i].images and samples[i].images[0].endswith("truncated.png")}
    assert truncated and truncated.isdisjoint(serial.bad_indices)
    assert {p.index for p in deep_serial.problems if p.kind == "unreadable image"} == (
        mixed["expected"]["unreadable image"] | truncated)


def same_sample(a, b) -> None:
    assert (list(map(str, a.images)), [(t.role, t.text) for t in a.turns], a.id, a.meta) == (
        list(map(str, b.images)), [(t.role, t.text) for t in b.turns], b.id, b.meta)


@pytest.mark.parametrize("ext", [".json", ".jsonl", ".csv"])
def test_records_parsed_in_parallel_are_those_of_load_samples(tmp_path, monkeypatch, ext):
    monkeypatch.setattr(table_module, "JSON_CHUNK_RECORDS", 7)  # many parsing tasks from a small file
    monkeypatch.setattr(table_module, "JSONL_CHUNK_BYTES", 300)
    for k in range(6):
        draw(tmp_path / "images" / f"{k}.png")
    records = [{"id": f"r{i}", "image": f"images/{i % 6}.png", "source_row": i, "extra": {"k": [i, "é"]},
                "conversations": conversation("<image>\nWhat?", f"answer {i} ✓")} for i in range(60)]
    path = tmp_path / f"train{ext}"
    if ext == ".json":
        path.write_text(json.dumps(records, ensure_ascii=False, indent=2), encoding="utf-8")
    elif ext == ".jsonl":
        path.write_text("\n\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n", encoding="utf-8")
    else:
        path.write_text("id,image_path,text\n" + "".join(f"r{i},images/{i % 6}.png,answer {i}\n" for i in range(60)))
    expected = load_samples(path)
    table = open_records(path, cache_root=tmp_path / "cache", num_proc=2, progress=False)
    assert len(table) == len(expected) == 60
    for a, b in zip(table, expected):
        same_sample(a, b)
        assert a.source == b.source
    again = open_records(path, cache_root=tmp_path / "cache", num_proc=2, progress=False)  # from the cache
    assert again.key == table.key and len(list((tmp_path / "cache" / "records").iterdir())) == 1
    same_sample(again[59], expected[59])
    # views: slicing, selecting, the split rule of `data split`
    assert [s.id for s in table.select([5, 2])] == ["r5", "r2"] and table[-1].id == "r59"
    train, val = split_samples(table, 0.2, seed=3)
    train_list, val_list = split_samples(expected, 0.2, seed=3)
    assert [s.source for s in train] == [s.source for s in train_list]
    assert [s.source for s in val] == [s.source for s in val_list]


def test_a_bad_record_is_named_as_load_samples_names_it(tmp_path, monkeypatch):
    monkeypatch.setattr(table_module, "JSONL_CHUNK_BYTES", 200)
    draw(tmp_path / "a.png")
    lines = [json.dumps({"image": "a.png", "conversations": conversation("<image>", "ok")})] * 30
    lines[17] = json.dumps({"image": "a.png", "conversations": [{"role": "robot", "content": "hi"}]})
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as serial:
        load_samples(path)
    with pytest.raises(DataError) as parallel:
        open_records(path, cache_root=tmp_path / "cache", num_proc=2, progress=False)
    assert str(parallel.value) == str(serial.value)
    assert f"{path}:17: turn 0 has unknown role 'robot'" in str(parallel.value)
    assert not list((tmp_path / "cache" / "records").iterdir())  # nothing half-made is left


def test_check_results_are_cached_and_recomputed_when_the_data_changes(tmp_path, qwen2_vl_parts):
    processor, family = qwen2_vl_parts
    encoder = Encoder(processor, family)
    for k in range(3):
        draw(tmp_path / "images" / f"{k}.png", size=SIZES[k])
    records = [{"id": f"r{i}", "image": f"images/{i % 3}.png",
                "conversations": conversation("<image>\nWhat?", f"shape {i}")} for i in range(300)]
    path = write_json(tmp_path / "train.json", records)
    cache = tmp_path / "cache"
    said: list[str] = []

    def check():
        said.clear()
        table = open_records(path, cache_root=cache, num_proc=2, progress=False)
        return cached_check(table, encoder, 60, cache, num_proc=2, progress=False, log=said.append)

    first = check()
    assert not first.problems and not said
    entries = list((cache / "check").glob("*.npz"))
    assert len(entries) == 1
    second = check()
    assert said and "results reused" in said[0]
    assert second.token_lengths == first.token_lengths and second.n_samples == 300
    # one record changed: the file's hash changes, so the check runs again and sees the change
    records[123]["conversations"][1]["content"] = LONG
    write_json(tmp_path / "train.json", records)
    third = check()
    assert not said
    assert [(p.index, p.kind) for p in third.problems] == [(123, "too long")]
    # an image file changed (same name, other size): the stored lengths are stale, so again
    time.sleep(0.01)
    draw(tmp_path / "images" / "1.png", size=(224, 224))
    fourth = check()
    assert not said
    assert fourth.token_lengths[1] > third.token_lengths[1]
    # other settings (max_length) are another entry
    table = open_records(path, cache_root=cache, num_proc=2, progress=False)
    cached_check(table, encoder, 5000, cache, num_proc=1, progress=False, log=said.append)
    assert not said


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """20 records over 5 images of different sizes, two of them multi-image, one text-only."""
    folder = tmp_path_factory.mktemp("small")
    for k in range(5):
        draw(folder / "images" / f"{k}.png", ("red", "blue")[k % 2], "square", SIZES[k % 4])
    records = [{"id": f"s{i}", "image": f"images/{i % 5}.png",
                "conversations": conversation("<image>\nDescribe it.", f"shape number {i}")} for i in range(17)]
    records.append({"id": "multi", "image": {"<image_00>": "images/1.png", "<image_01>": "images/2.png"},
                    "conversations": conversation("<image_00> versus <image_01>?", "the second")})
    records.append({"id": "text", "conversations": conversation("Say hi.", "hi")})
    records.append({"id": "turns", "image": "images/3.png", "conversations": [
        *conversation("<image>\nWhat?", "a square"), *conversation("Colour?", "blue")]})
    return {"path": write_json(folder / "train.json", records), "folder": folder}


def same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_shards_give_the_samples_and_tensors_of_their_json(small, qwen2_vl_parts, tmp_path):
    processor, family = qwen2_vl_parts
    encoder = Encoder(processor, family)
    expected = load_samples(small["path"])
    files = write_shards(expected, tmp_path / "shards", 3, progress=False)
    assert [f.name for f in files] == [f"train-0000{k}-of-00003.parquet" for k in range(3)]
    assert not list((tmp_path / "shards").glob("*.png"))  # the images are inside the shards
    table = open_records(tmp_path / "shards", cache_root=tmp_path / "cache", progress=False)
    assert len(table) == len(expected) == 20
    for i, (a, b) in enumerate(zip(table, expected)):
        assert all(isinstance(p, EmbeddedImage) for p in a.images) and len(a.images) == len(b.images)
        assert [p.data for p in a.images] == [Path(p).read_bytes() for p in b.images]
        same_tensors(encoder.encode(a), encoder.encode(b))
    shard, row = table[7].source.rsplit(":", 1)
    assert Path(shard).name == "train-00001-of-00003.parquet" and int(row) == 7 - len(expected) // 3
    # records that show one image still share it: the split keeps them on one side, as from the JSON
    train, val = split_samples(table, 2, seed=0)
    train_json, val_json = split_samples(expected, 2, seed=0)
    assert [s.id for s in val] == [s.id for s in val_json] and len(train) == len(train_json)
    # the check runs on shards as on files
    report = check_samples(table, encoder, MAX_LENGTH, progress=False, num_proc=2)
    assert report.token_lengths == check_samples(expected, encoder, MAX_LENGTH, progress=False).token_lengths


def test_a_stream_gives_the_samples_of_its_json_and_each_rank_its_own_part(small, qwen2_vl_parts, tmp_path):
    processor, family = qwen2_vl_parts
    encoder = Encoder(processor, family)
    expected = load_samples(small["path"])
    write_shards(expected, tmp_path / "hub_copy", 2, progress=False)  # a local folder stands for the hub id
    streamed = list(stream_samples(str(tmp_path / "hub_copy"), "train"))
    assert len(streamed) == 20
    for a, b in zip(streamed, expected):
        same_sample_content(a, b)
        same_tensors(encoder.encode(a), encoder.encode(b))
    parts = [list(stream_samples(str(tmp_path / "hub_copy"), "train", rank, 2)) for rank in (0, 1)]
    ids = [[s.id for s in part] for part in parts]
    assert ids[0] and ids[1] and set(ids[0]).isdisjoint(ids[1])
    assert sorted(ids[0] + ids[1]) == sorted(s.id for s in expected)
    with pytest.raises(DataError, match="cannot open it as a streamed dataset"):
        next(stream_samples(str(tmp_path / "nowhere"), "train"))


def same_sample_content(a, b) -> None:
    assert [(t.role, t.text) for t in a.turns] == [(t.role, t.text) for t in b.turns] and a.id == b.id
    assert [p.data for p in a.images] == [Path(p).read_bytes() for p in b.images]


def test_a_stream_is_checked_as_records_arrive(small, qwen2_vl_parts, tmp_path):
    processor, family = qwen2_vl_parts
    encoder = Encoder(processor, family)
    samples = load_samples(small["path"])
    samples[4].turns[1].text = "  "  # an empty answer
    samples[9].turns[1].text = LONG  # too long
    write_shards(samples, tmp_path / "stream", 2, progress=False)
    source = str(tmp_path / "stream")

    report, head = sample_check(stream_samples(source), 8, encoder, MAX_LENGTH)
    assert len(head) == 8 and [(p.index, p.kind) for p in report.problems] == [(4, "empty turn")]

    rejected = tmp_path / "rejected.jsonl"
    data = CheckedStream(lambda: stream_samples(source), encoder, MAX_LENGTH, "skip", rejected)
    items = list(data)
    assert len(items) == 18 and data.skipped == 2
    good = [s for i, s in enumerate(samples) if i not in (4, 9)]
    same_tensors(items[5], encoder.encode(good[5]))
    lines = read_jsonl(rejected)
    assert [line["id"] for line in lines] == ["s4", "s9"]
    assert lines[0]["source"].endswith(":4") and lines[0]["problems"] == ["turn 1 (assistant) is empty"]
    assert "tokens (images included) > max_length 100" in lines[1]["problems"][0]

    strict = CheckedStream(lambda: stream_samples(source), encoder, MAX_LENGTH, "error", tmp_path / "none.jsonl")
    with pytest.raises(BadSampleError, match=r"\[train\]:4: turn 1 \(assistant\) is empty — fix this record"):
        list(strict)


def test_prepare_with_shards_writes_the_samples_prepare_writes_as_json(tmp_path, qwen2_vl_parts):
    from test_prepare import latex_parquet

    from vlmtune import cli

    processor, family = qwen2_vl_parts
    encoder = Encoder(processor, family)
    local = latex_parquet(tmp_path / "src.parquet", [f"x^{i}" for i in range(12)])
    common = ["data", "prepare", "--local", str(local), "--image-column", "image", "--text-column", "text",
              "--val", "2", "--prompt", "Transcribe."]
    assert cli.main([*common, "--out", str(tmp_path / "json")]) == 0
    assert cli.main([*common, "--out", str(tmp_path / "sharded"), "--shards", "2"]) == 0
    assert cli.main([*common, "--out", str(tmp_path / "sharded"), "--shards", "2"]) == 0  # again: nothing to do
    out = tmp_path / "sharded"
    assert sorted(p.name for p in out.iterdir()) == ["prepare.json", "train", "val"]
    assert len(list((out / "train").glob("*.parquet"))) == 2
    for side in ("train", "val"):
        from_json = load_samples(tmp_path / "json" / f"{side}.json")
        from_shards = open_records(out / side, progress=False)
        assert len(from_shards) == len(from_json)
        for a, b in zip(from_shards, from_json):
            same_tensors(encoder.encode(a), encoder.encode(b))


@pytest.mark.long
def test_train_on_shards_skips_bad_records_and_a_rerun_reuses_the_check(small, tiny_qwen2_vl, tmp_path, capsys):
    from vlmtune.config import load_config
    from vlmtune.train import train

    samples = load_samples(small["path"])
    samples[3].turns[1].text = " "
    write_shards(samples, tmp_path / "shards", 2, progress=False)
    cache = tmp_path / "cache"
    for run in ("a", "b"):
        config = load_config(None, base_overrides(tiny_qwen2_vl, str(tmp_path / "shards"), tmp_path / run,
                                                  "data.on_bad_sample=skip", f"data.cache_dir={cache}",
                                                  "data.num_proc=2"))
        train(config)
        out = capsys.readouterr().out
        rejected = read_jsonl(tmp_path / run / "rejected_train.jsonl")
        assert [r["id"] for r in rejected] == ["s3"] and rejected[0]["source"].endswith("train-00000-of-00002.parquet:3")
        assert (tmp_path / run / "final").is_dir()
        assert ("results reused" in out) == (run == "b")
    assert len(list((cache / "records").iterdir())) == 1
