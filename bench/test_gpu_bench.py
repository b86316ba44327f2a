"""Tests of the benchmark harness itself (they live beside it: the package's tests never import
bench/). bench/gpu.py runs: `--smoke` takes its code path end to end on CPU with tiny models (Qwen2-VL: seed
pipeline, vlmtune grouped and packed; MiniCPM-V 2.6: the official finetune data path and vlmtune;
step meter, FLOPs, JSON), and without a CUDA device the real benchmark skips in one line with exit
status 0, writing nothing. The real-size models are checked on the meta device (sizes, the weights the
FLOPs count), and the official MiniCPM data path is checked to feed the model what vlmtune feeds it."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import ROOT, clean_env  # noqa: E402  (the tests' environment helpers)

SCRIPT = ROOT / "bench" / "gpu.py"
CHECK = ROOT / "bench" / "gpu_check.py"
sys.path.insert(0, str(ROOT / "bench"))


@pytest.mark.long
def test_smoke_run_writes_figures_for_every_pipeline(tmp_path):
    out = tmp_path / "gpu.json"
    # images enlarged 2x: every formula is sliced by the tiny MiniCPM processor (56 px slices)
    result = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--methods", "lora", "--n", "12",
                             "--minicpm-image-scale", "2", "--work", str(tmp_path / "work"), "--out", str(out)],
                            cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    timed = report["settings"]["steps"] - report["settings"]["warmup_steps"]
    qwen, minicpm = report["results"]["qwen2_vl"]["lora"], report["results"]["minicpmv2_6"]["lora"]
    assert set(qwen) == {"seed", "vlmtune_grouped", "vlmtune_packed"}
    assert set(minicpm) == {"official", "vlmtune_grouped"}
    for name, r in [*qwen.items(), *minicpm.items()]:
        assert r["timed_steps"] == timed
        for key in ("samples_per_s", "tokens_per_s", "trained_tokens_per_s", "model_tflops_per_s"):
            assert math.isfinite(r[key]) and r[key] > 0, (name, key)
        assert r["trainable_parameters"] > 0 and r["n_lm"] > r["n_vision"] > 0
    # padded batches carry padding (answers of 1-40 tokens), packed rows none
    assert qwen["seed"]["padding_fraction"] > 0 and qwen["vlmtune_packed"]["padding_fraction"] == 0
    assert qwen["seed"]["samples_per_step"] == qwen["vlmtune_grouped"]["samples_per_step"] == 4
    assert qwen["seed"]["multipliers"] == {"lm": 2, "vision": 1, "projector": 1}  # LoRA, vision frozen
    # MiniCPM: batches of 2 (seed 004), several slices per image, the resampler counted; the seed-004 LoRA
    # config trains the vision tower and resampler fully, the LLM through adapters only
    for r in minicpm.values():
        assert r["samples_per_step"] == 2 and r["images_per_sample"] > 1
        assert r["n_projector"] > 0 and r["multipliers"] == {"lm": 2, "vision": 3, "projector": 3}
    if not torch.cuda.is_available():
        assert all(r["mfu"] is None and r["peak_memory_bytes"] is None for r in [*qwen.values(), *minicpm.values()])
    ratios = report["ratios_vlmtune_better"]
    assert set(ratios["qwen2_vl"]["lora"]) == {"vlmtune_grouped", "vlmtune_packed"}
    assert set(ratios["minicpmv2_6"]["lora"]) == {"vlmtune_grouped"}
    assert "method pipeline" in result.stdout and "minicpmv2_6  lora   official" in result.stdout  # the table


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here: the benchmark would run")
def test_without_cuda_it_skips_in_one_line(tmp_path):
    out = tmp_path / "gpu.json"
    result = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], cwd=ROOT, env=clean_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert result.stdout.strip().splitlines() == ["bench/gpu.py: no CUDA device here, skipped (use --smoke to "
                                                  "exercise it on CPU)"]
    assert not out.exists()


@pytest.mark.long
def test_gpu_check_smoke_reports_tests_and_runs_in_one_table(tmp_path):
    # `make gpu-check`'s code path on CPU: the gpu-marked tests it stands for run (and skip, saying why),
    # the Qwen and MiniCPM runs give figures and the plan's estimate, the CUDA-only runs say so
    out = tmp_path / "gpu_check.json"
    result = subprocess.run([sys.executable, str(CHECK), "--smoke", "--work", str(tmp_path / "work"),
                             "--out", str(out)], cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["smoke"] is True and report["failed"] == []
    tests = {t["test"].split("::")[-1]: t for t in report["tests"]}
    assert {"test_flash_attention_varlen_isolates_packed_samples",
            "test_zero3_with_text_only_batches_and_trained_vision"} <= set(tests)
    if not torch.cuda.is_available():
        assert all(t["outcome"] == "skipped" and "CUDA" in t["message"] for t in tests.values())
    runs = {r["check"]: r for r in report["runs"]}
    assert [r["status"] for r in report["runs"]] == ["ok", "ok", "skipped", "skipped", "ok"] or torch.cuda.is_available()
    for r in report["runs"]:
        if r["status"] == "ok":
            assert r["samples_per_s"] > 0 and r["timed_steps"] == report["settings"]["steps"] - 1
            if r["pipeline"].startswith("vlmtune"):  # `vlmtune plan`'s estimate of the same run
                assert r["plan_tensor_bytes"] > 0
        else:
            assert r["message"] == "needs CUDA"
    assert {r["family"] for r in runs.values() if r["status"] == "ok"} == {"qwen2_vl", "minicpmv2_6"}
    lines = result.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("check "))
    assert all(any(line.startswith(name) for line in lines[header:]) for name in runs)  # one table, every row


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here: the check would run")
def test_gpu_check_without_cuda_skips_in_one_line(tmp_path):
    out = tmp_path / "gpu_check.json"
    result = subprocess.run([sys.executable, str(CHECK), "--out", str(out)], cwd=ROOT, env=clean_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and not out.exists()
    assert result.stdout.strip().splitlines() == ["bench/gpu_check.py: no CUDA device here, skipped (use --smoke "
                                                  "to exercise it on CPU)"]


def test_the_2b_architecture_has_the_published_size():
    # Built on the meta device: shapes only, no memory. Qwen2-VL-2B-Instruct's model card states
    # 2.21B parameters; the config values in bench/gpu.py give exactly:
    import gpu
    from transformers import Qwen2VLForConditionalGeneration

    from vlmtune.models.tiny import QWEN_SPECIAL_TOKENS, build_tokenizer

    config = gpu.qwen2_vl_2b_config(build_tokenizer(QWEN_SPECIAL_TOKENS))
    with torch.device("meta"):
        model = Qwen2VLForConditionalGeneration._from_config(config)
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight  # tied, as published
    assert sum(p.numel() for p in model.parameters()) == 2_208_985_600
    assert sum(p.numel() for n, p in model.named_parameters() if n.startswith("model.visual.")) == 665_271_296


def test_minicpm_v_2_6_architecture_has_the_published_size(tmp_path):
    # On the meta device, from the published config values with the tiny tokenizer's token ids: the
    # parameters the official remote code builds from those values (recorded in tests/data/minicpm),
    # 8.1B; the FLOPs count the LLM's weights without the embedding but with its own (untied) head, and
    # the vision tower's without its position table.
    import gpu

    from vlmtune.config import load_config
    from vlmtune.models import family_for
    from vlmtune.models.load import load_processor
    from vlmtune.models.minicpmv.modeling import MiniCPMVForConditionalGeneration
    from vlmtune.models.minicpmv.tiny_tokenizer import build_tiny_processor
    from vlmtune.models.minicpmv2 import FAMILIES
    from vlmtune.tuning import prepare_model

    processor = build_tiny_processor("minicpmv2_6", **gpu.MINICPM_SLICING)
    config = gpu.minicpmv2_6_config(processor.tokenizer)
    with torch.device("meta"):
        model = MiniCPMVForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    recorded = json.loads((ROOT / "tests/data/minicpm/minicpmv2_6_params.json").read_text())["params"]
    assert {n: list(p.shape) for n, p in model.named_parameters()} == recorded
    assert sum(p.numel() for p in model.parameters()) == 8_099_175_152

    def weights(prefix: str, without: str | None = None) -> int:
        return sum(math.prod(s) for n, s in recorded.items() if n.startswith(prefix) and not (without and without in n))

    shape = gpu.model_shape(model)
    # Qwen2-7B by hand: 28 x (q 3584^2+3584, k and v 3584*512+512, o 3584^2, MLP 3*3584*18944, 2 norms of
    # 3584) + final norm 3584 + head 151666*3584
    assert shape["n_lm"] == weights("llm.", "embed_tokens") == 7_069_192_704
    assert shape["n_vision"] == weights("vpm.", "position_embedding")
    assert (shape["layers"], shape["hidden"], shape["vision_layers"], shape["vision_hidden"], shape["queries"]) == (
        28, 3584, 27, 1152, 64)
    assert shape["multipliers"] == {"lm": 3, "vision": 3, "projector": 3}  # everything trains
    # seed 004's LoRA: peft's frozen copies of the fully trained vision tower, resampler and embedding
    # (modules_to_save) are not counted twice; the LLM is only passed through (2x)
    lora_config = load_config(gpu.MINICPM_CONFIGS["lora"], [])
    with torch.device("meta"):
        model = prepare_model(model, FAMILIES["minicpmv2_6"], lora_config.train, lora_config.lora, True)
    lora = gpu.model_shape(model)
    adapters = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    counted = ("n_lm", "n_vision", "n_projector")
    assert [lora[k] for k in counted] == [shape[k] for k in counted]
    assert lora["multipliers"] == {"lm": 2, "vision": 3, "projector": 3}
    assert lora["parameters"] == 8_099_175_152 + adapters
    embedding = math.prod(recorded["llm.model.embed_tokens.weight"])
    assert lora["trainable_parameters"] == weights("vpm.") + weights("resampler.") + embedding + adapters
    # the folder bench/gpu.py saves loads back with the real slicing settings, as MiniCPM-V 2.6
    config.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert family_for(tmp_path).name == "minicpmv2_6"
    ip = load_processor(tmp_path, family_for(tmp_path)).image_processor
    assert (ip.scale_resolution, ip.patch_size, ip.image_feature_size, ip.max_slice_nums, ip.use_image_id) == (
        448, 14, 64, 9, True)


def test_official_minicpm_data_path_feeds_the_model_what_vlmtune_does(tmp_path):
    # Same pixels, slices and image-query positions, so both pipelines do the same vision work; the
    # token differences are the documented ones (bench/minicpm_official_pipeline.py).
    import gpu
    from minicpm_official_pipeline import OfficialDataset, model_inputs, official_collator

    from vlmtune.data.encode import Encoder
    from vlmtune.data.formats import load_samples
    from vlmtune.models.minicpmv2 import FAMILIES
    from vlmtune.models.minicpmv.tiny_tokenizer import build_tiny_processor

    processor = build_tiny_processor("minicpmv2_6", **gpu.MINICPM_SLICING)
    ids = {}
    for scale in (1, 8):  # one slice of about 1,000 patches; 3 or more slices
        train_json = gpu.prepare_minicpm_data(tmp_path, 1, scale)
        official = OfficialDataset(json.loads(train_json.read_text()), processor, 2048)[0]
        theirs = model_inputs(official_collator([official]), gpu.MINICPM_SLICING["patch_size"])
        ours = Encoder(processor, FAMILIES["minicpmv2_6"]).encode(load_samples(train_json)[0])
        assert torch.equal(theirs["tgt_sizes"], ours["tgt_sizes"])
        assert torch.allclose(theirs["pixel_values"], ours["pixel_values"], atol=1e-6)
        assert int(theirs["mm_token_type_ids"].sum()) == int(ours["mm_token_type_ids"].sum())
        # answer + <|im_end|> in both; the official labels also train the "\n" after `assistant` and an
        # end-of-sequence id after <|im_end|>
        assert int((official["labels"] != -100).sum()) == int((ours["labels"][1:] != -100).sum()) + 2
        ids[scale] = official["input_ids"].tolist(), ours["input_ids"].tolist(), len(ours["tgt_sizes"])
        if scale == 8:  # a sliced image: the same tokens, so the same image-query positions
            assert torch.equal(theirs["mm_token_type_ids"][0], ours["mm_token_type_ids"])
    (one_official, one_ours, one_slices), (many_official, many_ours, many_slices) = ids[1], ids[8]
    assert one_slices == 1 and many_slices >= 3
    assert many_official == many_ours
    image_id = processor.tokenizer("<image_id>0</image_id>", add_special_tokens=False)["input_ids"]
    start = next(i for i in range(len(one_ours)) if one_ours[i: i + len(image_id)] == image_id)
    assert one_official == one_ours[:start] + one_ours[start + len(image_id):]  # only sliced images get an id there
