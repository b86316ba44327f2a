"""MiniCPM-V 2.0 / 2.6 / MiniCPM-o 2.6 through the same commands as every family: the seeds' shipped
configs (000, 001, 004) train on the tiny variant of their architecture, the pre-flight check lists
records the chat format cannot take, `max_slice_nums` reaches the processor and the saved config,
and eval / chat run on the trained adapter. No code from a model folder runs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, read_jsonl, run_cli, write_json
from vlmtune.config import load_config
from vlmtune.errors import DataError
from vlmtune.models import family_for
from vlmtune.models.load import load_model, load_processor
from vlmtune.train import train

SEED_CONFIGS = {  # shipped config -> the architecture it fine-tunes
    "minicpmo_2_6_latex_ocr.yaml": "minicpmo2_6",
    "minicpmv2_lora.yaml": "minicpmv2",
    "minicpmv2_6_lora.yaml": "minicpmv2_6",
    "minicpmv2_6_full.yaml": "minicpmv2_6",
}


def tiny_run_overrides(model, data: str, out, *extra: str) -> list[str]:
    """What a CPU test changes in a real config: the model, the data, the length, no DeepSpeed."""
    return [f"model.name_or_path={model}", "model.hub=hf", "model.dtype=fp32", f"data.train={data}",
            "data.val=null", f"train.output_dir={out}", "train.max_steps=2", "train.batch_size=2",
            "train.grad_accum=1", "train.learning_rate=0.01", "train.warmup_ratio=0.0", "train.deepspeed=null",
            "train.report_to=[]", "train.save_steps=1000", "eval.num_samples=0", *extra]


@pytest.mark.parametrize("name", sorted(SEED_CONFIGS))
def test_seed_config_trains_its_tiny_architecture(tiny_model_dir, caption_data, tmp_path, name):
    arch = SEED_CONFIGS[name]
    model = tiny_model_dir(arch)
    config = load_config(ROOT / "configs" / name, tiny_run_overrides(model, caption_data["train"], tmp_path / "run",
                                                                     "lora.r=4"))
    assert family_for(model).name == arch
    before = load_model(model, torch.float32).state_dict()
    out = train(config)

    losses = [r["loss"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert losses and all(math.isfinite(v) for v in losses)
    saved = load_config(out / "final" / "vlmtune.yaml")
    assert saved.data.max_slice_nums == 9 and saved.train.adam_beta2 == 0.95
    if config.train.method == "full":
        after = load_file(out / "final" / "model.safetensors")
        assert after.keys() == before.keys()  # the official weight names, nothing renamed
        assert all(not torch.equal(after[k], before[k]) for k in before if k.startswith(("vpm.", "resampler.")))
        assert any(not torch.equal(after[k], before[k]) for k in before if k.startswith("llm."))
        # the run's max_slice_nums is written where this version keeps it, so the folder loads with its processor
        written = json.loads((out / "final" / "config.json").read_text())
        assert (written.get("slice_config") or written)["max_slice_nums"] == 9
        assert load_processor(out / "final", family_for(out / "final")).image_processor.max_slice_nums == 9
        return
    adapter = load_file(out / "final" / "adapter_model.safetensors")
    lora = [k for k in adapter if "lora_" in k]
    # the seeds' regex: attention projections of the language model's layers, nothing else
    assert lora and all(k.startswith("base_model.model.llm.model.layers.") and ".self_attn." in k for k in lora)
    targets = {k.split(".self_attn.")[1].split(".")[0] for k in lora}
    assert targets == ({"q_proj", "k_proj", "v_proj", "o_proj"} if arch == "minicpmo2_6" else {"q_proj", "k_proj", "v_proj"})
    # tune_vision + trained resampler + embed_tokens: stored whole beside the adapter, and trained
    # (peft stores such a module whole under its own name)
    whole = {k.removeprefix("base_model.model."): v for k, v in adapter.items() if "lora_" not in k}
    for part in ("vpm.", "resampler.", "llm.model.embed_tokens."):
        names = [k for k in whole if k.startswith(part)]
        assert names, f"{part} is not saved with the adapter"
        assert any(not torch.equal(whole[k], before[k]) for k in names), f"{part} did not train"


def test_system_turns_are_listed_by_the_preflight_check_for_minicpmv2(tiny_model_dir, caption_data, tmp_path):
    records = json.loads(open(caption_data["train"]).read())
    records[1]["conversations"].insert(0, {"role": "system", "content": "Be brief."})
    for r in records:
        r["image"] = str((ROOT / caption_data["folder"] / r["image"]).resolve())
    data = write_json(tmp_path / "train.json", records)
    config = load_config(None, tiny_run_overrides(tiny_model_dir("minicpmv2"), data, tmp_path / "run", "lora.r=4"))
    with pytest.raises(DataError) as err:
        train(config)
    assert f"{data}:1" in str(err.value) and "has no system turn" in str(err.value)
    # skip: trained on the rest, the record kept aside with its reason
    train(load_config(None, tiny_run_overrides(tiny_model_dir("minicpmv2"), data, tmp_path / "skip", "lora.r=4",
                                               "data.on_bad_sample=skip")))
    rejected = read_jsonl(tmp_path / "skip" / "rejected_train.jsonl")
    assert len(rejected) == 1 and "system" in json.dumps(rejected[0], ensure_ascii=False)


def test_eval_and_chat_commands_on_a_minicpm_adapter(tiny_model_dir, caption_data, tmp_path):
    model = tiny_model_dir("minicpmv2_6")
    out = train(load_config(None, tiny_run_overrides(model, caption_data["train"], tmp_path / "run", "lora.r=4",
                                                     f"data.val={caption_data['val']}", "data.max_slice_nums=2")))
    from vlmtune.generation import load_target, resolve_target

    _, processor, _ = load_target(resolve_target(str(out), None, None))
    assert processor.image_processor.max_slice_nums == 2  # the run's setting, not the checkpoint's 4
    result = run_cli(["eval", str(out), "--compare-base", "--max-new-tokens", "3"], HOME=str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    compare = json.loads((out / "eval" / "compare.json").read_text())
    assert set(compare) >= {"before", "after"}
    rows = read_jsonl(out / "eval" / "final" / "predictions.jsonl")
    assert len(rows) == 2 and all("prediction" in r for r in rows)

    image = json.loads(open(caption_data["val"]).read())[0]["image"]
    image = str((ROOT / caption_data["folder"] / image).resolve())
    chat = run_cli(["chat", str(out), "--image", image, "--prompt", "What is in the image?", "--max-new-tokens", "3"],
                   HOME=str(tmp_path))
    assert chat.returncode == 0, chat.stderr[-3000:]


def test_data_check_counts_tokens_with_the_runs_max_slice_nums(tiny_model_dir, caption_data, capsys):
    """`vlmtune data check --max-slice-nums` measures what `train` with data.max_slice_nums will: a 112 px
    image is cut into 2x2 slices by the tiny checkpoint (4 allowed), and not at all with 1."""
    from vlmtune import cli
    from vlmtune.data.encode import Encoder
    from vlmtune.data.formats import load_samples

    model = tiny_model_dir("minicpmv2_6")
    family = family_for(model)
    sample = load_samples(caption_data["train"])[0]
    sliced = Encoder(load_processor(model, family), family).count_tokens(sample)
    whole = Encoder(load_processor(model, family, max_slice_nums=1), family).count_tokens(sample)
    assert whole < sliced
    limit = str((whole + sliced) // 2)
    assert cli.main(["data", "check", caption_data["train"], "--model", str(model), "--max-length", limit]) == 1
    assert "too long" in capsys.readouterr().out
    assert cli.main(["data", "check", caption_data["train"], "--model", str(model), "--max-length", limit,
                     "--max-slice-nums", "1"]) == 0
