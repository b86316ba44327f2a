"""`vlmtune train` from a stream (`data.stream: true`): a local folder of shards stands for a hub id
(the hub path is the same `datasets.load_dataset(..., streaming=True)` call; no network here).

- the same data from the stream and from its JSON file give the same loss, gradient-norm and
  validation curves (one batch holds the whole set, so the order in the batch is all that differs);
- a bad record met mid-stream: skipped and listed once in rejected_train.jsonl however often the
  stream comes round, or, under data.on_bad_sample=error, a stop naming it (`NAME[SPLIT]:INDEX`), with
  a checkpoint and the resume command; a bad record in the pre-flight sample stops the run at once;
- a killed run resumes where it stopped (across the end of a pass) with the losses and weights of a
  run never interrupted;
- two gloo ranks each read their own part, never the other's (long);
- settings a stream cannot serve are refused, each with what to set instead.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

from conftest import ROOT, base_overrides, caption_records, clean_env, free_port, read_jsonl, run_cli, write_json
from vlmtune.config import load_config
from vlmtune.data.encode import Encoder
from vlmtune.data.formats import load_samples
from vlmtune.data.shards import write_shards
from vlmtune.data.stream import CheckedStream, stream_samples
from vlmtune.errors import BadSampleError, ConfigError

RTOL = 1e-5  # stream against file, per step: the same samples in another order within the batch
STREAM = ["data.stream=true", "data.group_by_length=false"]


def shards(folder: Path, records: list[dict], n_shards: int) -> str:
    """`records` (images under `folder`) written as a shard folder `folder/shards`, as `data prepare --shards` does."""
    data = write_json(folder / "train.json", records)
    write_shards(load_samples(data), folder / "shards", n_shards, progress=False)
    return str(folder / "shards")


def train_args(tmp_path: Path, model: Path, data: str, out: Path, *extra: str) -> list[str]:
    config = tmp_path / "empty.yaml"
    config.write_text("{}\n")
    return ["train", str(config), *base_overrides(model, data, out, *extra)]


def curves(run: Path) -> dict[str, list[tuple[int, float]]]:
    records = read_jsonl(run / "metrics.jsonl")
    return {key: [(r["step"], r[key]) for r in records if key in r] for key in ("loss", "grad_norm", "eval_loss")}


def assert_close(got: list[tuple[int, float]], want: list[tuple[int, float]]) -> None:
    assert [s for s, _ in got] == [s for s, _ in want] and got, (got, want)
    worst = max(abs(a - b) / abs(b) for (_, a), (_, b) in zip(got, want))
    assert worst <= RTOL, (worst, got, want)


def test_a_stream_trains_as_its_json_file_does(tiny_qwen2_vl, tmp_path):
    data = shards(tmp_path, caption_records(6, tmp_path, "t"), 2)
    val = write_json(tmp_path / "val.json", caption_records(2, tmp_path, "v"))
    common = ["train.batch_size=6", "train.max_steps=3", "train.learning_rate=0.001", "data.group_by_length=false",
              f"data.val={val}", "train.eval_steps=1"]
    from_file = run_cli(train_args(tmp_path, tiny_qwen2_vl, str(tmp_path / "train.json"), tmp_path / "file", *common))
    assert from_file.returncode == 0, from_file.stderr[-3000:]
    streamed = run_cli(train_args(tmp_path, tiny_qwen2_vl, data, tmp_path / "stream", *common, *STREAM))
    assert streamed.returncode == 0, streamed.stderr[-3000:]

    assert f"train data: streamed from {data} (split train)" in streamed.stdout
    assert "pre-flight check on a sample: the first 6 records of the stream:\n6 samples, 6 ok" in streamed.stdout
    got, want = curves(tmp_path / "stream"), curves(tmp_path / "file")
    for key in ("loss", "grad_norm", "eval_loss"):
        assert_close(got[key], want[key])
    assert [s for s, _ in got["loss"]] == [1, 2, 3] and len(got["eval_loss"]) == 3
    from safetensors.torch import load_file

    a, b = (load_file(tmp_path / run / "final" / "adapter_model.safetensors") for run in ("stream", "file"))
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
    assert load_config(tmp_path / "stream" / "final" / "vlmtune.yaml").data.stream is True


@pytest.fixture
def bad_stream(tmp_path) -> str:
    """8 records in 2 shards; record 5 (the second shard's second) has an empty answer."""
    records = caption_records(8, tmp_path, "b")
    records[5]["conversations"][1]["content"] = "  "
    return shards(tmp_path, records, 2)


def test_a_bad_record_mid_stream_is_skipped_and_listed_once(tiny_qwen2_vl, bad_stream, tmp_path):
    out = tmp_path / "skip"
    val = write_json(tmp_path / "val.json", caption_records(2, tmp_path, "v"))
    # 5 steps of 2 records: 10 good records read, so the stream comes round and meets record 5 twice
    result = run_cli(train_args(tmp_path, tiny_qwen2_vl, bad_stream, out, *STREAM, "train.max_steps=5",
                                "data.stream_check_samples=4", "data.on_bad_sample=skip", f"data.val={val}"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "a sample: the first 4 records of the stream:\n4 samples, 4 ok, 0 with problems" in result.stdout
    assert f"bad ones are skipped and listed in {out / 'rejected_train.jsonl'}" in result.stdout
    rejected = read_jsonl(out / "rejected_train.jsonl")
    assert [(r["source"], r["id"], r["problems"], r["during"]) for r in rejected] == [
        (f"{bad_stream}[train]:5", "b5", ["turn 1 (assistant) is empty"], "streaming")]
    assert result.stdout.count(f"skipping {bad_stream}[train]:5: turn 1 (assistant) is empty") == 1
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4, 5]
    # no train.eval_steps: a stream has no epochs to end, so validation runs once, at the end
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "eval_loss" in r] == [5]
    assert (out / "final").is_dir()


def test_a_bad_record_mid_stream_stops_the_run_under_error(tiny_qwen2_vl, bad_stream, tmp_path):
    out = tmp_path / "error"
    result = run_cli(train_args(tmp_path, tiny_qwen2_vl, bad_stream, out, *STREAM, "train.max_steps=5",
                                "train.save_steps=1", "data.stream_check_samples=4"))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    # Step 3 would read records 4 and 5, but the loader reads one batch ahead (to know which is the
    # last), so the run stops while it fetches step 2's batch, with step 1's checkpoint.
    assert f"{bad_stream}[train]:5: turn 1 (assistant) is empty — fix this record" in result.stderr
    assert f"Saved {out / 'checkpoint-1'} (step 1)." in result.stderr
    assert f"resume with: vlmtune train {out / 'vlmtune.yaml'} train.resume=true" in result.stderr
    assert not (out / "final").exists()

    # in the pre-flight sample, it stops the run before the model loads
    early = run_cli(train_args(tmp_path, tiny_qwen2_vl, bad_stream, tmp_path / "early", *STREAM,
                               "data.stream_check_samples=6"))
    assert early.returncode == 2 and "Traceback" not in early.stderr, early.stderr[-3000:]
    assert ("pre-flight check failed on a sample: the first 6 records of the stream:\n"
            f"{bad_stream}[train]:5: turn 1 (assistant) is empty") in early.stderr
    assert "Loading weights" not in early.stdout + early.stderr


@pytest.mark.long
def test_a_killed_stream_run_resumes_exactly(tiny_qwen2_vl, tmp_path, capsys):
    from test_resume import final_tensors, kill_after_step, losses, one_thread

    from vlmtune.train import train

    records = caption_records(6, tmp_path, "r")
    records[2]["conversations"][1]["content"] = ""  # skipped: 5 good records a pass
    data = shards(tmp_path, records, 2)
    # batches: [0 1] [3 4] [5 0'] [1' 3'] | [4' 5'] [0'' 1'']: the resume starts after the checkpoint at
    # step 4, in the second pass. (Had each pass been an epoch of the Trainer's, it would skip 4 batches
    # of a pass that holds 3 and start the next pass from its beginning.)
    def args(out: Path, *extra: str) -> list[str]:
        return base_overrides(tiny_qwen2_vl, data, out, *STREAM, "train.max_steps=6", "train.save_steps=4",
                              "train.lr_scheduler=linear", "train.learning_rate=0.01", "data.on_bad_sample=skip",
                              "data.stream_check_samples=2", *extra)

    killed, straight = tmp_path / "killed", tmp_path / "straight"
    kill_after_step(5, args(killed))
    assert (killed / "checkpoint-4" / "checkpoint.json").is_file() and not (killed / "final").exists()
    with one_thread():
        train(load_config(None, args(killed, "train.resume=true")))
        assert f"resuming from {killed / 'checkpoint-4'} (step 4)" in capsys.readouterr().out
        train(load_config(None, args(straight)))
    assert losses(killed) == losses(straight) and sorted(losses(killed)) == [1, 2, 3, 4, 5, 6]
    a, b = final_tensors(killed), final_tensors(straight)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the resume read record 2 again (it re-reads the batches before its step), and did not list it twice
    assert [r["source"] for r in read_jsonl(killed / "rejected_train.jsonl")] == [f"{data}[train]:2"]


@pytest.mark.long
@pytest.mark.skipif(sys.platform == "win32", reason="gloo on Windows is not supported here")
def test_two_ranks_read_their_own_parts(tiny_qwen2_vl, qwen2_vl_parts, tmp_path):
    """Every record has its own token length, so the tokens the two ranks train on together at each
    step (the Trainer sums them over the ranks) tell which records were read: the k-th good record of
    each rank's part, round and round. Were the stream read by rank 0 and its batches dispatched, or
    read by each rank and cut again into every other batch (accelerate's two ways with an iterable
    dataset), the sums would differ from the first step or the second."""
    records = caption_records(10, tmp_path, "d")
    for i, r in enumerate(records):  # shard 0: records 0-4, shard 1: records 5-9
        r["conversations"][1]["content"] = ("a red circle" if i < 5 else "a blue square in the middle") + " big" * i
    records[1]["conversations"][1]["content"] = " "  # one bad record in each part, skipped
    records[7]["conversations"][1]["content"] = " "
    data = shards(tmp_path, records, 2)
    encoder = Encoder(*qwen2_vl_parts)
    samples = load_samples(tmp_path / "train.json")
    parts = [[encoder.count_tokens(samples[i]) for i in good] for good in ([0, 2, 3, 4], [5, 6, 8, 9])]
    assert len({n for part in parts for n in part}) == 8  # all lengths differ

    out = tmp_path / "run"
    steps = 6  # 4 good records a part: each part comes round once
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "vlmtune.train",
               *train_args(tmp_path, tiny_qwen2_vl, data, out, *STREAM, "train.batch_size=1",
                           f"train.max_steps={steps}", "train.save_steps=3", "data.on_bad_sample=skip",
                           "data.stream_check_samples=2")[1:]]
    result = subprocess.run(command, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]

    assert "each of the 2 ranks reads its own part" in result.stdout
    assert "a sample: the first 2 records of rank 0/2's part of the stream" in result.stdout
    seen = [r["num_input_tokens_seen"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    per_step = [parts[0][k % 4] + parts[1][k % 4] for k in range(steps)]
    assert seen == [sum(per_step[: k + 1]) for k in range(steps)]
    rejected = sorted(r["source"] for r in read_jsonl(out / "rejected_train.jsonl"))
    assert rejected == [f"{data}[train] rank 0/2:1", f"{data}[train] rank 1/2:2"]
    assert result.stdout.count("done: run folder") == 1 and (out / "final" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("setting, expected", [
    ("train.max_steps=-1", "set train.max_steps"),
    ("data.group_by_length=true", "set data.group_by_length=false"),
    ("data.packing=true", "set data.packing=false"),
    ("data.val_size=0.1", "give data.val (a file or shard folder) or set data.val_size=0"),
    ("data.cache_dir=somewhere", "unset data.cache_dir"),
    ("train.objective=dpo", "SFT only"),
])
def test_what_a_stream_cannot_do_is_refused(setting, expected):
    base = ["data.train=ORG/NAME", "train.max_steps=10", *STREAM]
    load_config(None, base)  # fine as it is
    with pytest.raises(ConfigError, match="data.stream=true") as refused:
        load_config(None, [*base, setting])
    assert expected in str(refused.value)


def test_a_misconfigured_stream_stops_before_the_model_loads(tiny_qwen2_vl, bad_stream, tmp_path):
    no_steps = run_cli(train_args(tmp_path, tiny_qwen2_vl, bad_stream, tmp_path / "a", *STREAM, "train.max_steps=-1"))
    assert no_steps.returncode == 2 and "Traceback" not in no_steps.stderr
    assert "data.stream=true" in no_steps.stderr and "set train.max_steps" in no_steps.stderr
    nowhere = run_cli(train_args(tmp_path, tiny_qwen2_vl, str(tmp_path / "nowhere"), tmp_path / "b", *STREAM))
    assert nowhere.returncode == 2 and "Traceback" not in nowhere.stderr
    assert "cannot open it as a streamed dataset" in nowhere.stderr and "Loading weights" not in nowhere.stderr


def test_dataloader_workers_share_a_part_and_name_their_records(small_stream, qwen2_vl_parts, tmp_path):
    """With data.num_workers, `datasets` gives each worker whole shards: every record once, named
    with its worker; the items carry image keys for the vision feature cache."""
    encoder = Encoder(*qwen2_vl_parts)
    data = CheckedStream(partial(stream_samples, small_stream), encoder, 200, "skip", tmp_path / "rejected.jsonl",
                         image_keys=True)
    loader = torch.utils.data.DataLoader(data, batch_size=None, num_workers=2)
    items = list(loader)
    assert len(items) == 4 and all(item["image_keys"].shape == (1, 2) for item in items)
    expected = sorted(encoder.encode(s)["input_ids"].tolist() for s in load_samples(Path(small_stream).parent / "train.json"))
    assert sorted(item["input_ids"].tolist() for item in items) == expected
    # record names: each worker counts its own records
    rejected = tmp_path / "bad.jsonl"
    broken = CheckedStream(partial(stream_samples, small_stream), encoder, 5, "skip", rejected)  # all too long
    with pytest.raises(Exception, match="every one of the 2 records"):
        list(torch.utils.data.DataLoader(broken, batch_size=None, num_workers=2))
    sources = sorted(r["source"] for r in read_jsonl(rejected))
    assert sources[:2] == [f"{small_stream}[train] worker 0/2:0", f"{small_stream}[train] worker 0/2:1"]


def test_an_image_that_fails_to_decode_mid_stream_follows_the_policy(qwen2_vl_parts, tmp_path):
    """Its header reads, so the check passes it; its pixels do not, so encoding fails."""
    records = caption_records(3, tmp_path, "c")
    whole = (tmp_path / "images" / "c1.png").read_bytes()
    (tmp_path / "images" / "c1.png").write_bytes(whole[: len(whole) // 2])
    data = shards(tmp_path, records, 1)
    encoder = Encoder(*qwen2_vl_parts)
    rejected = tmp_path / "rejected.jsonl"
    items = list(CheckedStream(partial(stream_samples, data), encoder, 200, "skip", rejected))
    assert len(items) == 2
    (line,) = read_jsonl(rejected)
    assert line["source"] == f"{data}[train]:1" and line["problems"][0].startswith("cannot be loaded (OSError")
    with pytest.raises(BadSampleError, match=r"\[train\]:1: cannot be loaded \(OSError"):
        list(CheckedStream(partial(stream_samples, data), encoder, 200, "error", rejected))


@pytest.fixture
def small_stream(tmp_path) -> str:
    return shards(tmp_path, caption_records(4, tmp_path, "w"), 2)


def test_a_stream_run_without_validation_data_asks_for_it_in_eval(tiny_qwen2_vl, tmp_path):
    from vlmtune.config import save_config

    config = load_config(None, ["data.train=ORG/NAME", "train.max_steps=10", *STREAM,
                                f"model.name_or_path={tiny_qwen2_vl}"])
    run = tmp_path / "run"  # weights and the config that trained them, as a final/ folder holds them
    shutil.copytree(tiny_qwen2_vl, run)
    save_config(config, run)
    result = run_cli(["eval", str(run)])
    assert result.returncode == 2, result.stderr[-2000:]
    assert "the run trained on a stream (data.train=ORG/NAME) and names no data.val" in result.stderr
