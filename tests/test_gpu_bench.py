"""bench/gpu.py runs: `--smoke` takes its code path end to end on CPU with a tiny model (seed
pipeline, vlmtune grouped and packed; step meter, FLOPs, JSON), and without a CUDA device the
real benchmark skips in one line with exit status 0, writing nothing."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, clean_env

SCRIPT = ROOT / "bench" / "gpu.py"


def test_smoke_run_writes_figures_for_every_pipeline(tmp_path):
    out = tmp_path / "gpu.json"
    result = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--methods", "lora", "--n", "12",
                             "--work", str(tmp_path / "work"), "--out", str(out)],
                            cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    runs = report["results"]["lora"]
    assert set(runs) == {"seed", "vlmtune_grouped", "vlmtune_packed"}
    for name, r in runs.items():
        assert r["timed_steps"] == report["settings"]["steps"] - report["settings"]["warmup_steps"]
        for key in ("samples_per_s", "tokens_per_s", "trained_tokens_per_s", "model_tflops_per_s"):
            assert math.isfinite(r[key]) and r[key] > 0, (name, key)
        assert r["trainable_parameters"] > 0 and r["n_lm"] > r["n_vision"] > 0
    # padded batches carry padding (answers of 1-40 tokens), packed rows none
    assert runs["seed"]["padding_fraction"] > 0 and runs["vlmtune_packed"]["padding_fraction"] == 0
    assert runs["seed"]["samples_per_step"] == runs["vlmtune_grouped"]["samples_per_step"] == 4
    if not torch.cuda.is_available():
        assert all(r["mfu"] is None and r["peak_memory_bytes"] is None for r in runs.values())
    assert set(report["ratios_vlmtune_better"]["lora"]) == {"vlmtune_grouped", "vlmtune_packed"}
    assert "method pipeline" in result.stdout  # the table


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here: the benchmark would run")
def test_without_cuda_it_skips_in_one_line(tmp_path):
    out = tmp_path / "gpu.json"
    result = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], cwd=ROOT, env=clean_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert result.stdout.strip().splitlines() == ["bench/gpu.py: no CUDA device here, skipped (use --smoke to "
                                                  "exercise it on CPU)"]
    assert not out.exists()


def test_the_2b_architecture_has_the_published_size():
    # Built on the meta device: shapes only, no memory. Qwen2-VL-2B-Instruct's model card states
    # 2.21B parameters; the config values in bench/gpu.py give exactly:
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu
    from transformers import Qwen2VLForConditionalGeneration

    from vlmtune.models.tiny import QWEN_SPECIAL_TOKENS, build_tokenizer

    config = gpu.qwen2_vl_2b_config(build_tokenizer(QWEN_SPECIAL_TOKENS))
    with torch.device("meta"):
        model = Qwen2VLForConditionalGeneration._from_config(config)
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight  # tied, as published
    assert sum(p.numel() for p in model.parameters()) == 2_208_985_600
    assert sum(p.numel() for n, p in model.named_parameters() if n.startswith("model.visual.")) == 665_271_296
