"""`vlmtune plan`: the estimate against measured CPU peaks, trainable counts against real models,
image geometry against the real processor, the command's verdict, suggestions and JSON."""

import json
from pathlib import Path

import pytest
import torch

from conftest import ROOT, draw, run_cli, write_json
from vlmtune.config import load_config
from vlmtune.plan import make_plan, parse_memory
from vlmtune.plan.estimate import Trainable
from vlmtune.plan.summary import summarize

TOLERANCE = 0.20  # issue 5: within 20% of the measured peak


@pytest.fixture(scope="module")
def padded_data(tmp_path_factory) -> str:
    """8 samples whose answers all differ in length, so every batch of 2 holds padding, as real data does."""
    folder = tmp_path_factory.mktemp("plan_data")
    words = "a red green blue yellow circle square triangle and on the left right top bottom".split()
    records = []
    for i in range(8):
        draw(folder / "images" / f"{i}.png", ("red", "green", "blue", "yellow")[i % 4], "circle")
        answer = " ".join(words[(i + k) % len(words)] for k in range(2 + 3 * i))
        records.append({"image": f"images/{i}.png", "conversations": [
            {"role": "user", "content": "<image>\nWhat is in the image?"}, {"role": "assistant", "content": answer}]})
    return write_json(folder / "train.json", records)


def _overrides(model, data, out, *extra) -> list[str]:
    return [f"model.name_or_path={model}", "model.attn_implementation=sdpa", f"data.train={data}",
            "data.image_size=[112, 112]", "data.max_length=4096", f"train.output_dir={out}", "train.batch_size=2",
            "train.grad_accum=1", "train.max_steps=2", "train.save_steps=1000", "train.logging_steps=1000",
            "eval.num_samples=0", "lora.r=8", "lora.dropout=0.0", *extra]


@pytest.mark.parametrize("case", [
    ["train.method=lora"],
    ["train.method=lora", "train.gradient_checkpointing=true", "lora.dropout=0.05"],
    ["train.method=full"],
    ["train.method=full", "train.freeze_vision=false", "train.freeze_projector=false",
     "train.gradient_checkpointing=true"],
], ids=["lora", "lora+gc+dropout", "full", "full+vision+gc"])
def test_estimate_is_within_20_percent_of_the_measured_peak(case, tiny_qwen2_vl, padded_data, tmp_path):
    from peak_memory import measure_training_peak

    torch.manual_seed(0)
    overrides = _overrides(tiny_qwen2_vl, padded_data, tmp_path / "run", *case)
    measured = measure_training_peak(load_config(None, overrides), step=2)
    assert measured.padded and measured.batch_shape[0] == 2
    # the plan for the batch the measured step actually got: its padded length
    config = load_config(None, [*overrides, f"data.max_length={measured.batch_shape[1]}"])
    estimate = make_plan(config, device="cpu", padded=measured.padded).estimate
    assert estimate.overhead == 0  # on the CPU the plan counts tensors only, as the measurement does
    ratio = estimate.tensors / measured.peak_bytes
    assert abs(ratio - 1) <= TOLERANCE, f"estimate {estimate.tensors} vs measured {measured.peak_bytes} ({ratio:.3f})"
    # the persistent part on its own: weights + optimizer state as counted in the live process
    assert estimate.weights == measured.parameter_bytes
    assert abs(estimate.optimizer - measured.optimizer_bytes) <= 1024  # AdamW's step counters (a few bytes each)


@pytest.mark.parametrize("overrides", [
    [],
    ["train.freeze_vision=false"],
    ["train.freeze_projector=false", "lora.modules_to_save=[embed_tokens]"],
    ["train.method=dora", "lora.targets=[q_proj, v_proj]"],
    ["train.method=full"],
    ["train.method=full", "train.freeze_vision=false", "train.freeze_llm=true"],
], ids=["lora", "lora+vision", "lora+projector+embed", "dora-qv", "full", "full-vision-only"])
def test_trainable_counts_match_the_real_prepared_model(overrides, tiny_qwen2_vl):
    """The meta-device count equals what `vlmtune.tuning.prepare_model` makes of the real model."""
    from vlmtune.models import family_for
    from vlmtune.models.load import load_model
    from vlmtune.tuning import prepare_model

    config = load_config(None, [f"model.name_or_path={tiny_qwen2_vl}", "lora.r=8", *overrides])
    summary = summarize(tiny_qwen2_vl)
    planned = Trainable.of(summary, config.train, config.lora)
    model = load_model(tiny_qwen2_vl, torch.float32)
    model = prepare_model(model, family_for(tiny_qwen2_vl), config.train, config.lora)
    real_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    real_total = sum(p.numel() for p in model.parameters())
    assert planned.count() == real_trainable
    assert sum(p.numel() for p in summary.model.parameters()) + planned.copies + (
        planned.count() - sum(planned.params.values())) == real_total


@pytest.mark.parametrize("size", [(112, 112), (500, 100), (37, 301)])
def test_image_geometry_matches_the_real_processor(size, qwen2_vl_parts, tiny_qwen2_vl, tmp_path):
    from PIL import Image

    processor, _ = qwen2_vl_parts
    path = tmp_path / "x.png"
    Image.new("RGB", size, "white").save(path)
    grid = processor.image_processor(images=[Image.open(path)], return_tensors="pt")["image_grid_thw"][0]
    patches, tokens, _ = summarize(tiny_qwen2_vl).image.per_image(size)
    assert patches == int(grid.prod())
    assert tokens == patches // 4


PUBLISHED = json.loads((Path(__file__).parent / "data" / "minicpm" / "published_configs.json").read_text())["configs"]


def _minicpm_folder(tmp_path: Path, arch: str = "minicpmv2_6", **changes) -> Path:
    """config.json of a MiniCPM checkpoint as published (tests/data/minicpm/published_configs.json)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps({**PUBLISHED[arch], **changes}))
    return tmp_path


def test_minicpm_is_planned_from_its_config_json_alone(tmp_path):
    summary = summarize(_minicpm_folder(tmp_path))
    parts = summary.parameters_by_part()
    # Qwen2-7B has 7,615,616,512 parameters with its 152,064-token vocabulary; MiniCPM-V 2.6 has 151,666
    assert parts["llm"] == 7_615_616_512 - (152_064 - 151_666) * 3584 * 2
    assert 400e6 < parts["vision"] < 420e6  # SigLIP-400M without its head
    assert summary.image.per_image() == (10 * 1024, 10 * 64, 10)  # whole image + 9 slices of 448 px
    assert summary.image.per_image((500, 100)) == (1024, 64, 1)  # small images are not sliced
    config = load_config(None, [f"model.name_or_path={tmp_path}", "model.dtype=bf16"])
    trainable = Trainable.of(summary, config.train, config.lora)
    assert len(trainable.lora_targets) == 28 * 4  # the official default: q/k/v/o_proj of every LLM layer


def test_minicpmv2_is_planned_with_its_timm_tower_and_minicpm_llm(tmp_path):
    summary = summarize(_minicpm_folder(tmp_path, "minicpmv2"))
    parts = summary.parameters_by_part()
    # MiniCPM-2.4B: 40 layers of 2304 (4 x 2304^2 attention + 3 x 2304 x 5760 MLP + 2 norms), untied 122,753-token
    # embedding and head, final norm
    layer = 4 * 2304 ** 2 + 3 * 2304 * 5760 + 2 * 2304
    assert parts["llm"] == 40 * layer + 2 * 122_753 * 2304 + 2304
    assert summary.vision.layers == 26 and summary.vision.block_prefix == "vpm.blocks.0"  # last block dropped
    assert 390e6 < parts["vision"] < 420e6
    assert summary.image.max_slices == 9 and summary.image.query_num == 64


def test_plan_command_verdict_suggestions_and_json(tiny_qwen2_vl, padded_data, tmp_path, capsys):
    from vlmtune import cli

    config = tmp_path / "run.yaml"
    config.write_text(f"model: {{name_or_path: {tiny_qwen2_vl}}}\ndata: {{train: {padded_data}, max_length: 2048}}\n"
                      "train: {method: full, batch_size: 8}\n")
    assert cli.main(["plan", str(config), "--device", "cpu", "--device-memory", "8GiB"]) == 0
    out = capsys.readouterr().out
    assert "fits in 8.0 GiB: yes" in out and "weights" in out

    tight = run_cli(["plan", str(config), "--device", "cpu", "--device-memory", "20MiB", "--json"])
    assert tight.returncode == 1, tight.stderr
    result = json.loads(tight.stdout)
    assert result["fits"] is False and result["total_bytes"] > parse_memory("20MiB")
    assert sum(result["components_bytes"].values()) == result["total_bytes"]
    changes = [s["change"] for s in result["suggestions"]]
    assert any("gradient_checkpointing=true" in c for c in changes)
    assert any(c.startswith("train.batch_size=") for c in changes)
    singles = [s["total_gib"] for s in result["suggestions"] if not s["change"].startswith("together: ")]
    assert singles == sorted(singles) and all(t < result["total_gib"] for t in singles)
    # none fits alone in 20 MiB: the last line adds the changes up, most effective first, until they fit
    together = result["suggestions"][-1]
    assert together["change"].startswith("together: train.batch_size=1") and together["fits"]
    assert together["total_gib"] < min(singles)

    assert cli.main(["plan", str(config), "train.batch_size=4", "--device", "cpu", "--device-memory", "20MiB"]) == 1
    out = capsys.readouterr().out
    assert "batch 4 x 2048 tokens" in out and "does not fit in 20.0 MiB" in out  # small sizes in MiB
    assert "changes that lower the estimate" in out and "train.gradient_checkpointing=true" in out


def test_full_finetuning_of_an_8b_model_on_a_24gib_gpu_gets_lora_and_qlora_suggested(tmp_path):
    from vlmtune.plan import suggestions

    folder = _minicpm_folder(tmp_path)
    config = load_config(None, [f"model.name_or_path={folder}", "model.dtype=bf16", "train.method=full",
                                "train.batch_size=1", "train.gradient_checkpointing=true", "data.max_length=2048"])
    plan = make_plan(config, "cuda", 1)
    limit = parse_memory("24GiB")
    assert plan.estimate.total > limit
    assert plan.estimate.weights == 2 * sum(p.numel() for p in plan.summary.model.parameters())  # bf16
    found = dict(suggestions(plan, limit, "cuda", 1, 1))
    assert found["train.method=qlora (4-bit base weights)"].estimate.total < found["train.method=lora"].estimate.total
    assert found["train.method=qlora (4-bit base weights)"].estimate.total <= limit  # 4-bit 8B fits a 24 GiB GPU
    assert found["train.method=lora"].estimate.optimizer < plan.estimate.optimizer / 50  # 40M of 8.1B train


def test_packing_is_planned_as_one_row_with_a_block_mask(tiny_qwen2_vl):
    base = [f"model.name_or_path={tiny_qwen2_vl}", "train.batch_size=4", "data.max_length=512"]
    padded = make_plan(load_config(None, base), device="cpu")
    packed = make_plan(load_config(None, [*base, "data.packing=true"]), device="cpu")
    assert (packed.setup.batch_size, packed.setup.seq_len, packed.setup.padded) == (1, 4 * 512, True)
    assert packed.images == 4 * (512 // packed.tokens_per_image)  # packs full of short one-image samples
    # same tokens, but the block mask over the whole row (sdpa) is 4x the padded batch's masks
    assert packed.estimate.activations > padded.estimate.activations


def test_zero3_splits_state_over_gpus_and_offload_removes_it(tmp_path):
    folder = _minicpm_folder(tmp_path / "m")
    summary = summarize(folder)
    base = [f"model.name_or_path={folder}", "model.dtype=bf16", "train.method=full", "train.batch_size=1",
            "train.gradient_checkpointing=true", "data.max_length=2048"]
    zero3 = ["train.deepspeed=" + str(ROOT / "configs/deepspeed/zero3.json")]
    two = make_plan(load_config(None, base + zero3), "cuda", 2, summary=summary).estimate
    eight = make_plan(load_config(None, base + zero3), "cuda", 8, summary=summary).estimate
    assert two.total > eight.total
    # fp32 master weights + two fp32 moments, split over the GPUs (plain AdamW keeps two bf16 moments)
    n_train = summary.parameters_by_part()["llm"]  # vision tower and resampler stay frozen by default
    assert eight.optimizer == 12 * n_train // 8 and two.optimizer == 12 * n_train // 2
    offload = tmp_path / "offload.json"
    offload.write_text(json.dumps({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"},
                                                         "offload_param": {"device": "cpu"}}}))
    off = make_plan(load_config(None, base + [f"train.deepspeed={offload}"]), "cuda", 2, summary=summary).estimate
    assert off.optimizer == 0 and off.weights < two.weights


def test_a_hub_id_fetches_config_files_only_and_fails_clearly_offline(tmp_path, monkeypatch):
    """The hub cannot be reached from the tests: a stand-in records the request and fails as offline."""
    import huggingface_hub

    from vlmtune.errors import VlmtuneError
    from vlmtune.plan import config_folder

    asked = {}

    def offline(repo_id, **kwargs):
        asked.update(kwargs, repo_id=repo_id)
        raise huggingface_hub.errors.LocalEntryNotFoundError("outgoing traffic has been disabled")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(VlmtuneError, match="could not fetch the config of 'Qwen/Qwen2-VL-2B-Instruct'.*config.json"):
        config_folder("Qwen/Qwen2-VL-2B-Instruct")
    assert asked["repo_id"] == "Qwen/Qwen2-VL-2B-Instruct"
    assert "config.json" in asked["allow_patterns"] and not any("safetensors" in p for p in asked["allow_patterns"])
    assert config_folder(str(tmp_path)) == tmp_path  # a local folder is used as it is


def test_unknown_model_type_and_bad_memory_size_are_clear_errors(tmp_path):
    from vlmtune.errors import ConfigError, VlmtuneError

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(VlmtuneError, match="model_type 'llava'"):
        summarize(tmp_path)
    with pytest.raises(ConfigError, match="expected a size"):
        parse_memory("lots")
    assert parse_memory("24GB") == parse_memory("24GiB") == 24 * 2 ** 30
