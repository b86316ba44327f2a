"""`vlmtune data make-pairs`: preference pairs from a model's own sampled answers. The pairs file is
read by the preference reader and trains with `train.objective: dpo`; every chosen answer outscores
its rejected one by the metric computed independently (`vlmtune.metrics`, not the GRPO rewards the
command scores with); ties are skipped and counted; bad input stops it before the model loads and
leaves nothing; Ctrl-C keeps finished batches and the same command resumes to the very pairs an
uninterrupted run writes; a second run to the same --out is refused."""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path

import pytest
from conftest import base_overrides, caption_records, draw, read_jsonl, start_cli, write_json

from vlmtune import cli, make_pairs
from vlmtune.config import load_config
from vlmtune.data.formats import load_samples
from vlmtune.data.preference import check_pairs, load_pairs
from vlmtune.data.sample import Turn
from vlmtune.make_pairs import choose
from vlmtune.metrics import sample_scores
from vlmtune.train import train
from cli_process import wait_for_lines

N_SLOW = 400  # prompts for the run that is interrupted: far more than finish before the signal


def dataset(folder: Path, n: int = 8) -> str:
    """`n` captioned shapes (MiniCPM layout), then a two-image, two-round conversation with a system turn."""
    records = caption_records(n, folder)
    draw(folder / "images" / "x.png", "green", "square")
    records.append({"image": {"<image_00>": "images/img0.png", "<image_01>": "images/x.png"}, "conversations": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "<image_00>\nWhat is this?"},
        {"role": "assistant", "content": "a red circle"},
        {"role": "user", "content": "And this one? <image_01>"},
        {"role": "assistant", "content": "a green square"}]})
    return write_json(folder / "train.json", records)


def make_pairs_args(model: Path, data: str, out: Path, *extra: str) -> list[str]:
    return ["data", "make-pairs", str(model), "--data", data, "--out", str(out), "--num-samples", "4",
            "--max-new-tokens", "6", "--batch-size", "3", *extra]


def no_files_but(folder: Path, *names: str) -> None:
    """The JSONL files in `folder` are `names`: no partial file, no temporary file left."""
    left = [p.name for p in folder.iterdir() if p.suffix == ".jsonl" or ".tmp-" in p.name]
    assert sorted(left) == sorted(names)


# -- choosing ------------------------------------------------------------------------------------

def test_choose_takes_the_best_and_the_worst_and_skips_what_teaches_nothing():
    c = choose(["a", "b", "c", "d"], [0.5, 1.0, 0.0, 1.0])
    assert (c.chosen, c.rejected, c.chosen_score, c.rejected_score, c.skipped) == ("b", "c", 1.0, 0.0, None)
    assert choose(["a", "b"], [0.3, 0.3]).skipped == "tie"
    assert choose(["a", "b"], [0.3, 0.3 + 1e-12]).skipped == "tie"  # rounding is no preference
    assert choose(["a", "b"], [0.3, 0.35], min_margin=0.1).skipped == "margin"
    assert choose(["a", "b"], [0.3, 0.45], min_margin=0.1).skipped is None
    empty = choose(["", "  ", "x"], [1.0, 1.0, 0.0])  # an empty answer is never a side: DPO's check refuses it
    assert (empty.skipped, empty.empty) == ("tie", 2)
    assert choose(["", ""], [0.0, 0.0]).skipped == "no answer"
    # the reference is chosen when no answer beats it; an answer that does stays chosen
    ref = choose(["x", "y"], [0.0, 0.0], ["right", "also right"], [1.0, 1.0])
    assert (ref.chosen, ref.chosen_from, ref.rejected, ref.skipped) == ("right", "reference", "x", None)
    assert choose(["x", "y"], [0.9, 0.1], ["r"], [0.8]).chosen == "x"
    assert choose(["x", "y"], [0.8, 0.1], ["r"], [0.8]).chosen_from == "reference"


# -- end to end ----------------------------------------------------------------------------------

def test_pairs_are_read_checked_and_trained_on_and_chosen_outscores_rejected(tmp_path, tiny_qwen2_vl, capsys):
    data = dataset(tmp_path)
    out = tmp_path / "pairs.jsonl"
    # ocr's main metric is CER, scored as 1 - CER: graded, so a random model's answers differ
    assert cli.main(make_pairs_args(tiny_qwen2_vl, data, out, "--task", "ocr")) == 0
    printed = capsys.readouterr().out
    rows = read_jsonl(out)
    pairs = load_pairs(out)
    assert len(pairs) == len(rows) > 0
    assert check_pairs(pairs, progress=False).problems == []

    samples = load_samples(data)
    by_source = {s.source: s for s in samples}
    ties = len(samples) - len(rows)
    assert f"{len(samples)} prompts, {len(rows)} pairs written to {out}" in printed
    assert f"skipped: {ties} ties (best and worst scored the same)" in printed
    for row, pair in zip(rows, pairs):
        assert row["metric"] == "cer" and row["chosen_from"] == "sample"
        original = by_source[row["source"]]
        references = [original.answer()]
        # the metric of `vlmtune eval`, computed here on its own
        chosen, rejected = (max(0.0, 1 - sample_scores("ocr", p.answer(), references)["cer"])
                            for p in (pair.chosen, pair.rejected))
        assert chosen == pytest.approx(row["chosen_score"]) and rejected == pytest.approx(row["rejected_score"])
        assert chosen > rejected
        # the prompt is the one the model was asked: every turn before the answer, every image
        assert pair.chosen.turns[:-1] == original.prompt_turns() == pair.rejected.turns[:-1]
        assert pair.chosen.images == original.images
    chosen_mean = sum(r["chosen_score"] for r in rows) / len(rows)
    assert f"cer: chosen {chosen_mean:.4f}" in printed

    train(load_config(None, base_overrides(tiny_qwen2_vl, str(out), tmp_path / "dpo", "train.objective=dpo",
                                           "train.max_steps=2")))
    logged = [r for r in read_jsonl(tmp_path / "dpo" / "metrics.jsonl") if "rewards/margins" in r]
    assert len(logged) == 2 and all(math.isfinite(r["loss"]) for r in logged)
    no_files_but(tmp_path, "pairs.jsonl")


def test_ties_are_skipped_and_counted_and_the_reference_breaks_them(tmp_path, tiny_qwen2_vl, capsys):
    data = dataset(tmp_path, 6)  # 7 prompts, the last a two-image conversation
    # exact match: a random model never says "a red circle", so every answer scores 0 and every prompt ties
    out = tmp_path / "ties.jsonl"
    assert cli.main(make_pairs_args(tiny_qwen2_vl, data, out, "--metric", "exact_match")) == 0
    assert out.read_text() == ""
    assert "7 prompts, 0 pairs written" in (printed := capsys.readouterr().out)
    assert "skipped: 7 ties (best and worst scored the same)" in printed

    out = tmp_path / "ref.jsonl"
    assert cli.main(make_pairs_args(tiny_qwen2_vl, data, out, "--metric", "exact_match", "--include-reference")) == 0
    rows, pairs = read_jsonl(out), load_pairs(out)
    assert len(rows) == 7 and check_pairs(pairs, progress=False).problems == []
    for row, pair, sample in zip(rows, pairs, load_samples(data)):
        assert (row["chosen_from"], row["chosen_score"], row["rejected_score"]) == ("reference", 1.0, 0.0)
        assert pair.chosen.answer() == sample.answer() != pair.rejected.answer()
        assert pair.chosen.turns[:-1] == sample.prompt_turns() and pair.chosen.images == sample.images
    # the conversation keeps its system turn, both rounds and both images, in their places
    assert [t.role for t in pairs[-1].rejected.turns] == ["system", "user", "assistant", "user", "assistant"]
    assert pairs[-1].chosen.turns[3] == Turn("user", "And this one? <image>") and len(pairs[-1].chosen.images) == 2
    assert "7 prompts, 7 pairs written" in (printed := capsys.readouterr().out)
    assert "7 chosen answers are the reference" in printed

    out = tmp_path / "margin.jsonl"
    assert cli.main(make_pairs_args(tiny_qwen2_vl, data, out, "--metric", "exact_match", "--include-reference",
                                    "--min-margin", "1.5")) == 0
    assert out.read_text() == "" and "0 ties (best and worst scored the same), 7 under --min-margin 1.5" \
        in capsys.readouterr().out


def test_interrupted_run_resumes_to_the_pairs_of_an_uninterrupted_one(tmp_path, tiny_qwen2_vl, capsys, monkeypatch):
    data = dataset(tmp_path)
    whole, resumed = tmp_path / "whole.jsonl", tmp_path / "resumed.jsonl"

    def args(out: Path, *extra: str) -> list[str]:
        return make_pairs_args(tiny_qwen2_vl, data, out, "--task", "ocr", "--seed", "7", *extra)

    assert cli.main(args(whole)) == 0
    assert read_jsonl(whole)

    real = make_pairs.complete

    def interrupt_at_call(n: int) -> None:
        """Ctrl-C in the n-th generation call from now."""
        calls = []

        def interrupted(*a, **k):
            calls.append(1)
            if len(calls) == n:
                raise KeyboardInterrupt
            return real(*a, **k)

        monkeypatch.setattr(make_pairs, "complete", interrupted)

    # Ctrl-C during the second of three batches (9 prompts, 3 per batch)
    interrupt_at_call(2)
    capsys.readouterr()
    assert cli.main(args(resumed)) == 130
    partial = tmp_path / "resumed.partial.jsonl"
    assert f"make-pairs stopped after 3 of 9 prompts; they are kept in {partial}" in capsys.readouterr().err
    assert not resumed.exists()
    lines = read_jsonl(partial)
    assert "vlmtune data make-pairs" in lines[0] and [r["index"] for r in lines[1:]] == [0, 1, 2]

    # other settings are refused while the partial file is there; nothing in it changes
    before = partial.read_bytes()
    assert cli.main(args(resumed, "--num-samples", "3")) == 2
    err = capsys.readouterr().err
    assert f"{partial} holds the unfinished work of a make-pairs run with other settings (num_samples 4 -> 3)" in err
    assert partial.read_bytes() == before and not resumed.exists()

    with partial.open("a") as f:  # a kill while a batch was written: its last line cut short
        f.write('{"index": 3, "rec')
    interrupt_at_call(2)  # resumed at the second batch, stopped again in the third
    assert cli.main(args(resumed)) == 130
    assert f"resuming from {partial}: 3 of 9 prompts already done" in capsys.readouterr().err
    assert [r["index"] for r in read_jsonl(partial)[1:]] == [0, 1, 2, 3, 4, 5]  # the cut line is gone
    monkeypatch.setattr(make_pairs, "complete", real)
    assert cli.main(args(resumed)) == 0
    assert f"resuming from {partial}: 6 of 9 prompts already done" in capsys.readouterr().err
    assert resumed.read_bytes() == whole.read_bytes()  # the same seed per batch: the same pairs
    assert not partial.exists()

    other = tmp_path / "other.jsonl"
    assert cli.main(make_pairs_args(tiny_qwen2_vl, data, other, "--task", "ocr", "--seed", "8")) == 0
    assert other.read_text() != whole.read_text()
    no_files_but(tmp_path, "whole.jsonl", "resumed.jsonl", "other.jsonl")


# -- refused before any generation ---------------------------------------------------------------------

def test_bad_input_is_an_error_before_the_model_loads_and_leaves_nothing(tmp_path, tiny_qwen2_vl, capsys):
    out = tmp_path / "out" / "pairs.jsonl"
    broken = tmp_path / "broken.json"
    broken.write_text('[{"image": "a.png", "conversations": [')
    assert cli.main(make_pairs_args(tiny_qwen2_vl, str(broken), out)) == 2
    err = capsys.readouterr().err
    assert str(broken) in err and "Traceback" not in err

    records = caption_records(4, tmp_path)
    records[2]["image"] = "images/gone.png"
    data = write_json(tmp_path / "missing.json", records)
    assert cli.main(make_pairs_args(tiny_qwen2_vl, data, out)) == 2
    err = capsys.readouterr().err
    assert f"{data}:2: image not found: {tmp_path / 'images' / 'gone.png'}" in err
    assert "1 of 4 record(s)" in err and "nothing was generated" in err

    good = write_json(tmp_path / "good.json", caption_records(2, tmp_path))
    assert cli.main(make_pairs_args(tmp_path / "no_such_run", good, out)) == 2
    assert f"{tmp_path / 'no_such_run'}: no such run or checkpoint folder" in capsys.readouterr().err
    assert cli.main(make_pairs_args(tiny_qwen2_vl, good, out, "--num-samples", "1")) == 2
    assert "nothing to compare it with" in capsys.readouterr().err
    assert cli.main(make_pairs_args(tiny_qwen2_vl, good, out, "--temperature", "0")) == 2
    assert "greedy decoding" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_help_lists_the_command_and_its_options(capsys):
    assert cli.main(["--help"]) == 0
    assert "data make-pairs" in capsys.readouterr().out
    with pytest.raises(SystemExit) as done:
        cli.main(["data", "make-pairs", "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for option in ("--num-samples", "--temperature", "--top-p", "--max-new-tokens", "--metric", "--task",
                   "--include-reference", "--min-margin", "--batch-size", "--seed", "--limit", "--out", "--data"):
        assert option in text
    assert "exact_match,cer,render_match,cider,bleu4" in text


# -- a second run, and a real Ctrl-C ------------------------------------------------------------


@pytest.mark.long  # a vlmtune process of its own
def test_a_second_run_to_the_same_out_is_refused_and_ctrl_c_keeps_whole_batches(tmp_path, tiny_qwen2_vl, capsys):
    draw(tmp_path / "images" / "shape.png", "red", "circle")
    records = [{"image": "images/shape.png", "conversations": [  # each its own question: none are merged
        {"role": "user", "content": f"<image>\nQuestion {i}: what is it?"},
        {"role": "assistant", "content": "a red circle"}]} for i in range(N_SLOW)]
    data = write_json(tmp_path / "many.json", records)
    out = tmp_path / "pairs.jsonl"
    partial = tmp_path / "pairs.partial.jsonl"
    args = make_pairs_args(tiny_qwen2_vl, data, out, "--batch-size", "1", "--max-new-tokens", "16")
    process = start_cli(args)
    wait_for_lines(process, partial, 2 + 1)  # the header, then 2 rows

    assert cli.main(args) == 2  # while the first one writes
    assert f"--out {out}: another `vlmtune data make-pairs` is writing it ({partial} is locked)" \
        in capsys.readouterr().err

    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and not out.exists()
    lines = partial.read_bytes().splitlines()
    rows = [json.loads(line) for line in lines[1:]]  # every line whole: a batch is written at once
    assert [r["index"] for r in rows] == list(range(len(rows))) and 2 <= len(rows) < N_SLOW
    assert f"make-pairs stopped after {len(rows)} of {N_SLOW} prompts; they are kept in {partial}" in stderr
