"""`vlmtune eval` and `vlmtune predict` as a user meets them when something is wrong: a missing
image is a `FILE:INDEX` error before any generation, and a run that is killed or interrupted
keeps the predictions of every finished batch in the partial file."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from conftest import draw, read_jsonl, run_cli, start_cli, write_json

from vlmtune import cli
from cli_process import wait_for_lines

N_SLOW = 400  # prompts for the interrupted runs: far more than finish before the signal


def records(folder: Path, n: int, missing: set[int] = frozenset()) -> list[dict]:
    """n single-turn records about one picture, each with its own question (so none are merged)."""
    draw(folder / "images" / "shape.png", "red", "circle")
    return [{"image": f"images/{'gone' if i in missing else 'shape'}.png", "conversations": [
        {"role": "user", "content": f"<image>\nQuestion number {i}: what is this?"},
        {"role": "assistant", "content": "a red circle"}]} for i in range(n)]


def check_missing_image_error(stderr: str, data: str, folder: Path) -> None:
    assert "Traceback" not in stderr
    assert f"{data}:1: image not found: {folder / 'images' / 'gone.png'}" in stderr
    assert f"{data}:3: image not found" in stderr
    assert "2 of 4 record(s)" in stderr and "nothing was generated" in stderr


@pytest.mark.long  # a vlmtune process of its own
def test_eval_with_a_missing_image_stops_before_any_generation(tmp_path, tiny_qwen2_vl):
    data = write_json(tmp_path / "bad.json", records(tmp_path, 4, missing={1, 3}))
    result = run_cli(["eval", "--model", str(tiny_qwen2_vl), "--data", data, "--task", "caption",
                      "--out", str(tmp_path / "out")])
    assert result.returncode == 2, result.stderr
    check_missing_image_error(result.stderr, data, tmp_path)
    assert not (tmp_path / "out").exists()  # no model was run, nothing was written


def test_predict_with_a_missing_image_stops_before_any_generation(tmp_path, tiny_qwen2_vl, capsys):
    data = write_json(tmp_path / "bad.json", records(tmp_path, 4, missing={1, 3}))
    out = tmp_path / "o" / "p.jsonl"
    assert cli.main(["predict", "--model", str(tiny_qwen2_vl), "--data", data, "--out", str(out)]) == 2
    check_missing_image_error(capsys.readouterr().err, data, tmp_path)
    assert not (tmp_path / "o").exists()


def start_predict(tmp_path: Path, model: Path):
    """`vlmtune predict` on N_SLOW prompts, one per batch, as a background process."""
    data = write_json(tmp_path / "many.json", records(tmp_path, N_SLOW))
    out = tmp_path / "preds.jsonl"
    process = start_cli(["predict", "--model", str(model), "--data", data, "--out", str(out), "--batch-size", "1",
                         "--max-new-tokens", "24"])
    return process, out


def finished_rows(path: Path) -> list[dict]:
    """The partial file's rows; every line is a whole JSON row, in order from index 0."""
    rows = read_jsonl(path)
    assert [row["index"] for row in rows] == list(range(len(rows)))
    assert all(row["prediction"] is not None and row["reference"] == "a red circle" for row in rows)
    return rows


@pytest.mark.long  # a vlmtune process of its own
def test_predict_killed_keeps_the_finished_batches(tmp_path, tiny_qwen2_vl):
    process, out = start_predict(tmp_path, tiny_qwen2_vl)
    partial = tmp_path / "preds.partial.jsonl"
    wait_for_lines(process, partial, 3)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    rows = finished_rows(partial)
    assert 3 <= len(rows) < N_SLOW
    assert not out.exists()  # the final name only ever holds a complete file


@pytest.mark.long  # a vlmtune process of its own
def test_predict_interrupted_says_where_the_finished_batches_are(tmp_path, tiny_qwen2_vl):
    process, out = start_predict(tmp_path, tiny_qwen2_vl)
    partial = tmp_path / "preds.partial.jsonl"
    wait_for_lines(process, partial, 2)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    rows = finished_rows(partial)
    assert f"predictions stopped after {len(rows)} of {N_SLOW}; the finished ones are in {partial}" in stderr
    assert "Traceback" not in stderr and not out.exists()


def test_eval_and_predict_leave_only_the_final_files(tmp_path, tiny_qwen2_vl):
    data = write_json(tmp_path / "ok.json", records(tmp_path, 3))
    assert cli.main(["predict", "--model", str(tiny_qwen2_vl), "--data", data, "--out", str(tmp_path / "p.jsonl"),
                     "--batch-size", "2", "--max-new-tokens", "4"]) == 0
    assert [r["index"] for r in read_jsonl(tmp_path / "p.jsonl")] == [0, 1, 2]
    assert cli.main(["eval", "--model", str(tiny_qwen2_vl), "--data", data, "--task", "caption", "--out",
                     str(tmp_path / "eval"), "--max-new-tokens", "4"]) == 0
    assert sorted(p.name for p in (tmp_path / "eval" / "model").iterdir()) == ["metrics.json", "predictions.jsonl"]
    assert sorted(p.name for p in tmp_path.iterdir() if "partial" in p.name) == []
    assert json.loads((tmp_path / "eval" / "model" / "metrics.json").read_text())["n"] == 3


@pytest.mark.long  # vlmtune processes of their own
def test_a_second_predict_into_the_same_file_is_refused_while_the_first_writes(tmp_path, tiny_qwen2_vl):
    process, out = start_predict(tmp_path, tiny_qwen2_vl)
    partial = tmp_path / "preds.partial.jsonl"
    try:
        wait_for_lines(process, partial, 2)
        second = run_cli(["predict", "--model", str(tiny_qwen2_vl), "--data", str(tmp_path / "many.json"),
                          "--out", str(out), "--max-new-tokens", "4"])
        assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-3000:]
        assert f"{partial} is being written by another running command" in second.stderr
        assert process.poll() is None  # the first writes on
        wait_for_lines(process, partial, len(read_jsonl(partial)) + 2)
    finally:
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=60)
    assert process.returncode == 130
    assert finished_rows(partial)  # only the first command's rows, whole and in order
    assert not out.exists()
