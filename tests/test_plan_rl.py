"""`vlmtune plan` for DPO and GRPO: the rows per forward (pairs x 2, prompts x group), the reference
model when it is a frozen copy, and the estimate within 20% of a measured CPU peak (as tests/test_plan.py
checks SFT)."""

from __future__ import annotations

import pytest
import torch

from conftest import caption_records, write_json
from test_dpo import pair_records
from vlmtune.config import load_config
from vlmtune.plan import make_plan

TOLERANCE = 0.20


def overrides(model, data, out, *extra) -> list[str]:
    return [f"model.name_or_path={model}", "model.attn_implementation=sdpa", f"data.train={data}",
            "data.image_size=[112, 112]", "data.max_length=4096", f"train.output_dir={out}", "train.batch_size=2",
            "train.grad_accum=1", "train.max_steps=2", "train.save_steps=1000", "train.logging_steps=1000",
            "eval.num_samples=0", "lora.r=8", "lora.dropout=0.0", "grpo.num_generations=4", "grpo.max_new_tokens=4",
            *extra]


def test_objectives_change_rows_and_add_the_reference_only_when_it_is_a_copy(tiny_qwen2_vl):
    base = [f"model.name_or_path={tiny_qwen2_vl}", "data.max_length=64"]
    sft = make_plan(load_config(None, base), device="cpu")
    dpo = make_plan(load_config(None, [*base, "train.objective=dpo"]), device="cpu")
    grpo = make_plan(load_config(None, [*base, "train.objective=grpo", "grpo.num_generations=8"]), device="cpu")
    assert (sft.setup.batch_size, dpo.setup.batch_size, grpo.setup.batch_size) == (4, 8, 32)
    assert dpo.estimate.weights == sft.estimate.weights  # LoRA: the reference is the model without adapters
    full = make_plan(load_config(None, [*base, "train.method=full"]), device="cpu")
    full_dpo = make_plan(load_config(None, [*base, "train.method=full", "train.objective=dpo"]), device="cpu")
    assert full_dpo.estimate.weights == 2 * full.estimate.weights  # a frozen copy, same dtype
    no_kl = make_plan(load_config(None, [*base, "train.method=full", "train.objective=grpo", "grpo.beta=0"]),
                      device="cpu")
    assert no_kl.estimate.weights == full.estimate.weights
    assert any("generation buffers" in n for n in grpo.notes)


@pytest.mark.long
@pytest.mark.parametrize("case", [
    ["train.objective=dpo", "train.method=lora"],
    ["train.objective=dpo", "train.method=full"],
    ["train.objective=grpo", "train.method=lora", "grpo.beta=0.04"],
], ids=["dpo-lora", "dpo-full", "grpo-lora"])
def test_estimate_is_within_20_percent_of_the_measured_peak(case, tiny_qwen2_vl, tmp_path):
    from peak_memory import measure_training_peak

    torch.manual_seed(0)
    if "train.objective=dpo" in case:
        data = write_json(tmp_path / "pairs.json", pair_records(tmp_path))
    else:
        data = write_json(tmp_path / "train.json", caption_records(4, tmp_path))
    config_overrides = overrides(tiny_qwen2_vl, data, tmp_path / "run", *case)
    measured = measure_training_peak(load_config(None, config_overrides), step=2)
    rows = 4 if "train.objective=dpo" in case else 8
    assert measured.batch_shape[0] == rows
    config = load_config(None, [*config_overrides, f"data.max_length={measured.batch_shape[1]}"])
    estimate = make_plan(config, device="cpu", padded=measured.padded).estimate
    ratio = estimate.tensors / measured.peak_bytes
    assert abs(ratio - 1) <= TOLERANCE, f"estimate {estimate.tensors} vs measured {measured.peak_bytes} ({ratio:.3f})"
