"""Two CPU processes (torchrun, gloo) train the tiny model together: the data is split between
them, the run folder is written once, by rank 0, and nothing crashes on duplicate writes."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, caption_records, clean_env, free_port, read_jsonl, write_json
from vlmtune.data.encode import Encoder
from vlmtune.data.formats import load_samples

N_SAMPLES = 6
WORLD = 2


@pytest.mark.long
@pytest.mark.skipif(sys.platform == "win32", reason="gloo on Windows is not supported here")
def test_torchrun_two_processes_train_and_write_once(tiny_qwen2_vl, qwen2_vl_parts, tmp_path):
    # Six samples with the same text, so every sample has the same token count L and the tokens
    # seen after step k tell how many samples all ranks processed together: WORLD * k * L.
    records = caption_records(N_SAMPLES, tmp_path, "d")
    for r in records:
        r["conversations"][1]["content"] = "a red circle"
    # Plus one bad record, skipped: every rank runs the pre-flight check and writes the rejects.
    bad = {"image": "images/missing.png", "conversations": records[0]["conversations"]}
    data = write_json(tmp_path / "train.json", records[:3] + [bad] + records[3:])
    processor, family = qwen2_vl_parts
    encoder = Encoder(processor, family)
    missing = str(tmp_path / "images" / "missing.png")
    lengths = {encoder.count_tokens(s) for s in load_samples(data) if s.images[0] != missing}
    assert len(lengths) == 1
    (length,) = lengths

    config = tmp_path / "config.yaml"
    config.write_text(f"model:\n  name_or_path: {tiny_qwen2_vl}\ndata:\n  train: {data}\n")
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--nnodes", "1",
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               "-m", "vlmtune.train", str(config),
               f"train.output_dir={out}", "train.epochs=1", "train.max_steps=-1", "train.batch_size=1",
               "train.grad_accum=1", "train.logging_steps=1", "train.save_steps=2", "lora.r=4",
               "eval.num_samples=0", "train.learning_rate=0.001", "data.on_bad_sample=skip"]
    result = subprocess.run(command, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]

    # Each sample was seen once, by one rank: one epoch of 6 samples is 3 steps of 2 x 1 sample.
    steps = N_SAMPLES // WORLD
    records = read_jsonl(out / "metrics.jsonl")
    losses = [r for r in records if "loss" in r]
    assert [r["step"] for r in losses] == list(range(1, steps + 1))  # logged once per step: rank 0 only
    assert all(math.isfinite(r["loss"]) for r in losses)
    assert [r["num_input_tokens_seen"] for r in losses] == [WORLD * k * length for k in range(1, steps + 1)]
    summary = [r for r in records if "train_runtime" in r and "loss" not in r]
    assert len(summary) == 1 and summary[0]["step"] == steps

    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and state["train_batch_size"] == 1
    assert (out / "checkpoint-2" / "vlmtune.yaml").is_file()
    assert (out / f"checkpoint-{steps}" / "adapter_model.safetensors").is_file()

    # final/ is complete, and written by one process only.
    final = out / "final"
    for name in ("adapter_model.safetensors", "adapter_config.json", "chat_template.jinja", "tokenizer.json",
                 "vlmtune.yaml"):
        assert (final / name).is_file(), name
    from safetensors.torch import load_file

    adapter = load_file(final / "adapter_model.safetensors")
    assert adapter and all(torch.isfinite(v).all() for v in adapter.values())
    assert result.stdout.count("done: run folder") == 1
    assert result.stdout.count("train data: 7 samples, 6 ok, 1 with problems") == 1
    assert [r["source"] for r in read_jsonl(out / "rejected_train.jsonl")] == [f"{data}:3"]
    assert not list(out.rglob("*.tmp")) and not list(out.rglob(".*.tmp-*"))
