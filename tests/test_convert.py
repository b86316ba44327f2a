"""`vlmtune data convert` and `vlmtune data split`, end to end on real files."""

from __future__ import annotations

import csv
import json
import os

import pytest
from PIL import Image

from vlmtune.cli import main
from vlmtune.data.convert import convert_command, parse_val, split_command
from vlmtune.data.formats import load_samples, read_dataset
from vlmtune.errors import VlmtuneError


def png(path) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (4, 4), (30, 200, 30)).save(path)
    return os.path.abspath(path)


def seed_csv(folder, n: int) -> str:
    """The seeds' intermediate file: absolute image paths and a text column."""
    path = os.path.join(folder, "latex_ocr_train.csv")
    os.makedirs(folder, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image_path", "text"])
        for i in range(n):
            w.writerow([png(os.path.join(folder, "LaTeX_OCR", f"{i}.jpg")), f"x_{{{i}}}"])
    return path


def minicpm_file(path, n: int, own_images: bool = False) -> str:
    """n records asking about img/a.png, or (own_images) each about its own img/aN.png."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    names = [f"img/a{i}.png" for i in range(n)] if own_images else ["img/a.png"] * n
    for name in set(names):
        png(os.path.join(os.path.dirname(path), name))
    records = [{"id": f"r{i}", "image": names[i], "conversations": [
        {"role": "user", "content": f"<image>\nQuestion {i}?"}, {"role": "assistant", "content": f"Answer {i}."}]}
        for i in range(n)]
    with open(path, "w", encoding="utf-8") as f:
        if str(path).endswith(".jsonl"):
            f.writelines(json.dumps(r) + "\n" for r in records)
        else:
            json.dump(records, f)
    return str(path)


def test_convert_csv_to_qwen_in_another_folder(tmp_path, capsys):
    src = seed_csv(tmp_path / "raw", 3)
    out = tmp_path / "data" / "train.json"
    assert convert_command(src, str(out), to="qwen") == 0
    assert f"wrote 3 samples to {out} (csv -> qwen)" in capsys.readouterr().out
    records = json.loads(out.read_text(encoding="utf-8"))
    assert records[0] == {"id": "identity_1", "conversations": [
        {"from": "user", "value": "<|vision_start|>../raw/LaTeX_OCR/0.jpg<|vision_end|>"},
        {"from": "assistant", "value": "x_{0}"}]}
    samples = load_samples(out)
    assert [s.answer() for s in samples] == ["x_{0}", "x_{1}", "x_{2}"]
    assert all(os.path.isfile(s.images[0]) for s in samples)


def test_convert_through_the_cli_with_absolute_paths(tmp_path, capsys):
    src = minicpm_file(tmp_path / "in" / "d.json", 2)
    out = tmp_path / "out" / "d.jsonl"
    assert main(["data", "convert", src, str(out), "--to", "messages", "--absolute-paths"]) == 0
    first = json.loads(out.read_text(encoding="utf-8").splitlines()[0])
    assert first["messages"][0]["content"][0] == {"type": "image", "image": str(tmp_path / "in" / "img" / "a.png")}
    assert [s.id for s in load_samples(out)] == ["r0", "r1"]


def test_convert_errors_are_printed_without_traceback(tmp_path, capsys):
    src = minicpm_file(tmp_path / "d.json", 2)
    assert main(["data", "convert", src, str(tmp_path / "d.csv"), "--to", "qwen"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert "holds only the csv format" in err


@pytest.mark.parametrize("val, n, n_val", [("4", 10, 4), ("0.25", 10, 3), ("0.1", 5, 1), (".5", 7, 4),
                                          ("0.99", 3, 2)])
def test_parse_val_counts_and_fractions(val, n, n_val):
    assert parse_val(val, n) == n_val


@pytest.mark.parametrize("val, message", [("abc", "not a count"), ("1.5", "not a count"), ("-1", "not a count"),
                                          ("0", "at least one"), ("10", "1 to 9"), ("12", "1 to 9")])
def test_bad_val_is_a_clear_error(val, message):
    with pytest.raises(VlmtuneError, match=message):
        parse_val(val, 10)


def test_split_needs_two_samples(tmp_path):
    src = minicpm_file(tmp_path / "d.json", 1)
    with pytest.raises(VlmtuneError, match="cannot split 1 sample"):
        split_command(src, val="1")


def test_split_count_is_reproducible_and_complete(tmp_path, capsys):
    src = minicpm_file(tmp_path / "in" / "all.jsonl", 20, own_images=True)
    out_a, out_b, out_c = (tmp_path / name for name in ("a", "b", "c"))
    assert split_command(src, val="4", seed=3, out=str(out_a)) == 0
    printed = capsys.readouterr().out
    assert "train: 16 samples" in printed and "val:   4 samples" in printed
    split_command(src, val="4", seed=3, out=str(out_b))
    split_command(src, val="4", seed=4, out=str(out_c))
    for name in ("train.jsonl", "val.jsonl"):
        assert (out_a / name).read_bytes() == (out_b / name).read_bytes()
    assert (out_a / "val.jsonl").read_bytes() != (out_c / "val.jsonl").read_bytes()

    train, fmt = read_dataset(out_a / "train.jsonl")
    val = load_samples(out_a / "val.jsonl")
    assert fmt == "minicpm"
    ids = [s.id for s in train] + [s.id for s in val]
    assert sorted(ids) == sorted(f"r{i}" for i in range(20))  # disjoint, nothing lost
    assert [s.id for s in train] == sorted((s.id for s in train), key=lambda x: int(x[1:]))  # input order kept
    assert all(os.path.isfile(s.images[0]) for s in train + val)  # paths rewritten for the new folder


def test_split_fraction_next_to_the_input_keeps_csv(tmp_path, capsys):
    src = seed_csv(tmp_path / "raw", 10)
    assert main(["data", "split", src, "--val", "0.2"]) == 0
    train = load_samples(tmp_path / "raw" / "train.csv")
    val = load_samples(tmp_path / "raw" / "val.csv")
    assert (len(train), len(val)) == (8, 2)
    assert len({s.id for s in train + val}) == 10  # generated ids do not collide across the files
    assert all(os.path.isfile(s.images[0]) for s in train + val)


def test_split_bad_val_through_the_cli(tmp_path, capsys):
    src = minicpm_file(tmp_path / "d.json", 5)
    assert main(["data", "split", src, "--val", "lots"]) == 2
    assert "--val 'lots' is not a count (e.g. 4) or a fraction between 0 and 1" in capsys.readouterr().err
    assert not (tmp_path / "train.json").exists()


def test_split_refuses_to_overwrite_its_input(tmp_path):
    src = minicpm_file(tmp_path / "train.json", 5)
    with pytest.raises(VlmtuneError, match="would overwrite the input"):
        split_command(src, val="1")
    assert len(load_samples(src)) == 5
