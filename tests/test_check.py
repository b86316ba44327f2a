"""Pre-flight check: each kind of bad sample is reported as `FILE:INDEX: what is wrong`, by the
library, by `vlmtune data check` (exit codes 0 / 1 / 2) and at the start of `vlmtune train`
(policy error: stop before any weights load; policy skip: rejected records to a file, train on
the rest)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, base_overrides, caption_records, clean_env, draw, read_jsonl, run_cli, write_json
from vlmtune import cli
from vlmtune.config import load_config
from vlmtune.data.check import check_samples
from vlmtune.data.encode import Encoder
from vlmtune.data.formats import load_samples
from vlmtune.errors import DataError

MAX_LENGTH = 100
LONG_ANSWER = " ".join(["a red circle and a blue square on the left"] * 12)


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def bot(text: str) -> dict:
    return {"role": "assistant", "content": text}


def bad_records(folder: Path) -> tuple[list[dict], dict[int, str]]:
    """One record per problem (and nothing else wrong with it), plus the expected message of each,
    with `{image}` standing for the absolute path of the record's image."""
    draw(folder / "images" / "ok.png")
    (folder / "images" / "garbage.png").write_bytes(b"this is not a picture\x00\x01\x02" * 10)
    records = [
        {"image": "images/missing.png", "conversations": [user("<image>\nWhat?"), bot("a red circle")]},
        {"image": "images/garbage.png", "conversations": [user("<image>\nWhat?"), bot("a red circle")]},
        {"image": "images/ok.png", "conversations": [user("<image> and <image>?"), bot("a red circle")]},
        {"image": "images/ok.png", "conversations": [user("<image>\nWhat?"), user("Well?"), bot("a red circle")]},
        {"image": "images/ok.png", "conversations": [user("<image>\nWhat?"), bot("   ")]},
        {"image": "images/ok.png", "conversations": [user("<image>\nWhat?"), bot(LONG_ANSWER)]},
    ]
    messages = {
        0: "image not found: {missing}",
        1: "image cannot be read: {garbage} (UnidentifiedImageError",
        2: "2 image placeholder(s) in the text but 1 image(s)",
        3: "roles user/user/assistant: expected an optional system turn, then user/assistant alternating, "
           "ending with assistant",
        4: "turn 1 (assistant) is empty",
        5: "TOO_LONG tokens (images included) > max_length 100",
    }
    paths = {"missing": folder / "images" / "missing.png", "garbage": folder / "images" / "garbage.png"}
    return records, {k: v.format(**{n: str(p) for n, p in paths.items()}) for k, v in messages.items()}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> dict:
    """A file of good records with one bad record of each kind in between."""
    folder = tmp_path_factory.mktemp("mixed")
    good = caption_records(4, folder, "g")
    bad, messages = bad_records(folder)
    records = [good[0], *bad[:3], good[1], *bad[3:], good[2], good[3]]
    expected = {records.index(bad[k]): message for k, message in messages.items()}
    return {"path": write_json(folder / "train.json", records), "expected": expected, "folder": folder,
            "good_ids": [g["id"] for g in good]}


def test_each_problem_is_reported_as_file_index_message(mixed, qwen2_vl_parts):
    processor, family = qwen2_vl_parts
    samples = load_samples(mixed["path"])
    encoder = Encoder(processor, family)
    report = check_samples(samples, encoder, MAX_LENGTH, progress=False)
    too_long = next(i for i, m in mixed["expected"].items() if m.startswith("TOO_LONG"))
    n_tokens = encoder.count_tokens(samples[too_long])
    assert n_tokens > MAX_LENGTH
    expected = {i: f"{mixed['path']}:{i}: " + m.replace("TOO_LONG", str(n_tokens))
                for i, m in mixed["expected"].items()}

    lines = [str(p) for p in report.problems]
    assert len(lines) == len(expected)  # exactly one problem per bad record, none for good ones
    assert report.bad_indices == set(expected)
    for p in report.problems:
        assert str(p).startswith(expected[p.index]), (str(p), expected[p.index])
    assert sorted(p.kind for p in report.problems) == sorted([
        "missing image", "unreadable image", "placeholder count != image count", "bad role order", "empty turn",
        "too long"])
    summary = report.summary()
    assert summary.startswith("10 samples, 4 ok, 6 with problems")
    assert "tokens per sample (images included): p50" in summary
    # Without max_length, a long sample is fine; without an encoder, tokens are not counted at all.
    assert "too long" not in {p.kind for p in check_samples(samples, encoder, None, progress=False).problems}
    assert check_samples(samples, None, None, progress=False).token_lengths == []


def test_data_check_command_exit_codes(mixed, caption_data, capsys):
    # 1: problems, each printed as FILE:INDEX: message, then the summary.
    assert cli.main(["data", "check", mixed["path"]]) == 1
    out = capsys.readouterr().out
    for i, message in mixed["expected"].items():
        if not message.startswith("TOO_LONG"):
            assert f"{mixed['path']}:{i}: {message}" in out
    assert "10 samples, 5 ok, 5 with problems" in out  # no --model: lengths are not measured
    # 0: a clean file.
    assert cli.main(["data", "check", caption_data["train"]]) == 0
    assert "4 samples, 4 ok, 0 with problems" in capsys.readouterr().out
    # 2: a usage error (--max-length needs the model's processor to count tokens).
    assert cli.main(["data", "check", caption_data["train"], "--max-length", "10"]) == 2
    assert "--max-length needs --model" in capsys.readouterr().err


def test_data_check_with_model_measures_lengths_and_writes_rejected(mixed, tiny_qwen2_vl, tmp_path, capsys):
    rejected = tmp_path / "bad.jsonl"
    code = cli.main(["data", "check", mixed["path"], "--model", str(tiny_qwen2_vl), "--max-length", str(MAX_LENGTH),
                     "--rejected", str(rejected)])
    assert code == 1
    out = capsys.readouterr().out
    assert "10 samples, 4 ok, 6 with problems" in out and "tokens (images included) > max_length 100" in out
    assert [r["source"] for r in read_jsonl(rejected)] == [f"{mixed['path']}:{i}" for i in sorted(mixed["expected"])]


def test_data_check_is_a_real_command_with_exit_codes(mixed, caption_data):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "vlmtune.cli", "data", "check", *args], cwd=ROOT,
                              env=clean_env(), capture_output=True, text=True, timeout=120)

    bad, good, usage = run(mixed["path"]), run(caption_data["train"]), run(caption_data["train"], "--max-length", "5")
    assert bad.returncode == 1
    assert all(f"{mixed['path']}:{i}: {m}" in bad.stdout for i, m in mixed["expected"].items() if "TOO_LONG" not in m)
    assert good.returncode == 0, good.stderr
    assert usage.returncode == 2 and "error: --max-length needs --model" in usage.stderr
    assert "Traceback" not in usage.stderr


def test_train_with_skip_writes_rejected_and_trains_on_the_rest(mixed, tiny_qwen2_vl, tmp_path, capsys):
    from vlmtune.train import train

    out = tmp_path / "run"
    val_folder = tmp_path / "val"
    val_records = caption_records(2, val_folder, "v")
    val_records[1]["image"] = "images/gone.png"
    val = write_json(val_folder / "val.json", val_records)
    # One epoch, one sample per step: the number of steps is the number of samples trained on.
    train(load_config(None, base_overrides(tiny_qwen2_vl, mixed["path"], out, "train.max_steps=-1", "train.epochs=1",
                                           "train.batch_size=1", f"data.val={val}", "data.on_bad_sample=skip",
                                           f"data.max_length={MAX_LENGTH}")))
    rejected = read_jsonl(out / "rejected_train.jsonl")
    assert [r["source"] for r in rejected] == [f"{mixed['path']}:{i}" for i in sorted(mixed["expected"])]
    assert all(r["problems"] and r["turns"] for r in rejected)
    assert [r["source"] for r in read_jsonl(out / "rejected_val.jsonl")] == [f"{val}:1"]
    assert "skipping 6 bad sample(s) of 10" in capsys.readouterr().out
    steps = [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert steps[-1] == len(mixed["good_ids"]) == 4
    assert (out / "final" / "adapter_model.safetensors").is_file()


def test_train_with_error_policy_stops_before_loading_weights(mixed, tiny_qwen2_vl, tmp_path, monkeypatch):
    import vlmtune.parts as parts_module
    import vlmtune.train as train_module

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were loaded although the pre-flight check failed")

    monkeypatch.setattr(parts_module, "load_model", no_weights)  # every command loads weights through RunParts
    out = tmp_path / "run"
    with pytest.raises(DataError) as info:
        train_module.train(load_config(None, base_overrides(tiny_qwen2_vl, mixed["path"], out,
                                                            f"data.max_length={MAX_LENGTH}")))
    message = str(info.value)
    for i, expected in mixed["expected"].items():
        if expected.startswith("TOO_LONG"):
            assert f"{mixed['path']}:{i}: " in message and "> max_length 100" in message
        else:
            assert f"{mixed['path']}:{i}: {expected}" in message
    assert "data.on_bad_sample=skip" in message
    assert not (out / "rejected_train.jsonl").exists() and not list(out.glob("checkpoint-*"))


def test_data_check_deep_decodes_every_image(tmp_path):
    # a PNG cut short after its header: its size reads, its pixels do not
    records = caption_records(2, tmp_path, "t")
    image = tmp_path / records[1]["image"]
    data = image.read_bytes()
    image.write_bytes(data[: len(data) // 2])
    path = write_json(tmp_path / "train.json", records)
    deep = run_cli(["data", "check", path, "--deep", "--num-proc", "1"])
    assert deep.returncode == 1, deep.stdout + deep.stderr
    assert f"{path}:1" in deep.stdout and "1 with problems" in deep.stdout
