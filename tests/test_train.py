"""Training on the tiny Qwen2-VL: which parameters train for every freeze/LoRA combination (each
trainable one changed, each frozen one bit-identical to the checkpoint on disk, the saved weights
being the trained ones), configurations that must be refused, resume after an interrupted run,
and `vlmtune train` end to end as a real command (checkpoints, final/, metrics, trackers)."""

from __future__ import annotations

import json
import math
import re
from itertools import product

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, TrainerCallback

import vlmtune.train as train_module
from conftest import base_overrides, read_jsonl
from vlmtune.config import load_config
from vlmtune.errors import ConfigError, VlmtuneError
from vlmtune.models import family_for
from vlmtune.train import train
from vlmtune.tuning import PARTS, param_groups, prepare_model

HIGH_LR = "train.learning_rate=0.01"


def base_name(name: str) -> str:
    """The bare model's name of a (possibly peft-wrapped) parameter."""
    name = name.removeprefix("base_model.model.")
    return name.replace(".base_layer.", ".").replace(".original_module.", ".").replace(".modules_to_save.default.", ".")


def saved_name(name: str) -> str:
    """How peft names a trainable parameter in adapter_model.safetensors."""
    name = name.replace(".lora_magnitude_vector.default.weight", ".lora_magnitude_vector")  # DoRA
    return name.replace(".default.", ".").replace(".modules_to_save.", ".")


@pytest.fixture
def captured(monkeypatch) -> dict:
    """The model `train()` trains, and a copy of its parameters just before training.

    Wraps vlmtune's own `prepare_model` (the real one runs), so nothing of transformers or peft
    is replaced."""
    box: dict = {}
    real = train_module.prepare_model

    def recording(model, *args, **kwargs):
        model = real(model, *args, **kwargs)
        box["model"] = model
        box["before"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        return model

    monkeypatch.setattr(train_module, "prepare_model", recording)
    return box


def full_case(fv: bool, fp: bool, fl: bool):
    flags = [f"train.freeze_vision={str(fv).lower()}", f"train.freeze_projector={str(fp).lower()}",
             f"train.freeze_llm={str(fl).lower()}"]
    parts = {p for p, frozen in zip(PARTS, (fv, fp, fl)) if not frozen}
    return pytest.param(["train.method=full", *flags], parts, None, 0, id=f"full-fv{int(fv)}-fp{int(fp)}-fl{int(fl)}")


LLM_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# (overrides, parts that train, names of the adapted linear layers, number of adapted layers)
CASES = [
    *(full_case(*flags) for flags in product([True, False], repeat=3) if not all(flags)),
    pytest.param(["train.method=lora"], {"llm"}, LLM_LINEAR, 14, id="lora"),
    pytest.param(["train.method=lora", "train.freeze_vision=false"], {"llm", "vision"}, LLM_LINEAR, 14,
                 id="lora-vision-tower"),
    pytest.param(["train.method=lora", "train.freeze_projector=false"], {"llm", "projector"}, LLM_LINEAR, 14,
                 id="lora-projector"),
    pytest.param(["train.method=dora"], {"llm"}, LLM_LINEAR, 14, id="dora"),
    pytest.param(["train.method=lora", "lora.targets=[q_proj, v_proj]"], {"llm"}, ("q_proj", "v_proj"), 4,
                 id="lora-target-list"),
    pytest.param(["train.method=lora", r"lora.targets=.*language_model\.layers\.1\..*(o_proj|down_proj)"], {"llm"},
                 ("o_proj", "down_proj"), 2, id="lora-target-regex"),
]


@pytest.mark.parametrize("overrides, trainable_parts, adapted, n_adapted", CASES)
def test_trainable_parameters_change_and_frozen_ones_do_not(tiny_qwen2_vl, caption_data, tmp_path, captured,
                                                           overrides, trainable_parts, adapted, n_adapted):
    out = train(load_config(None, base_overrides(tiny_qwen2_vl, caption_data["train"], tmp_path / "run",
                                                 HIGH_LR, *overrides)))
    family = family_for(tiny_qwen2_vl)
    model, before = captured["model"], captured["before"]
    params = dict(model.named_parameters())
    disk = dict(AutoModelForImageTextToText.from_pretrained(tiny_qwen2_vl, dtype=torch.float32).named_parameters())

    trainable = {n for n, p in params.items() if p.requires_grad}
    assert trainable
    # Which parts train is exactly what the flags say; every parameter belongs to a known part.
    assert {family.part_of(n) for n in params} == set(PARTS)
    assert {family.part_of(n) for n in trainable} == trainable_parts
    fully_trained = trainable_parts - {"llm"} if adapted else trainable_parts  # with LoRA the llm has adapters
    for part in fully_trained:
        # a part trained fully has all its parameters trainable (no half-frozen vision tower)
        whole = {n for n in params if family.part_of(n) == part and ".original_module." not in n}
        assert whole <= trainable, sorted(whole - trainable)[:5]

    # Every trainable parameter moved; every frozen one is bit-identical to the base checkpoint.
    unchanged = [n for n in trainable if torch.equal(params[n].detach(), before[n])]
    assert not unchanged, f"trainable but unchanged after 2 steps: {unchanged[:5]}"
    frozen = [n for n in params if n not in trainable]
    assert all(base_name(n) in disk for n in frozen)
    moved = [n for n in frozen if not torch.equal(params[n].detach(), disk[base_name(n)].detach())]
    assert not moved, f"frozen but changed: {moved[:5]}"

    if adapted is None:  # full: final/ holds the whole model, trained parts as trained, the rest as on disk
        final = dict(AutoModelForImageTextToText.from_pretrained(out / "final", dtype=torch.float32).named_parameters())
        assert set(final) == set(params)
        assert all(torch.equal(final[n].detach(), params[n].detach()) for n in params)
        return

    # LoRA: adapters exactly on the linear layers asked for, inside the language model only.
    lora_modules = {n.split(".lora_A.")[0].removeprefix("base_model.model.") for n in trainable if ".lora_A." in n}
    assert lora_modules
    assert {m.rsplit(".", 1)[-1] for m in lora_modules} == set(adapted)
    assert all(family.part_of(m + ".weight") == "llm" for m in lora_modules)
    assert len(lora_modules) == n_adapted  # the regex picks layer 1 only; names pick both layers
    if "train.method=dora" in overrides:
        assert any("lora_magnitude_vector" in n for n in trainable)
    # final/ holds exactly the trained tensors (adapters and fully trained modules), as trained.
    saved = load_file(out / "final" / "adapter_model.safetensors")
    assert set(saved) == {saved_name(n) for n in trainable}
    assert all(torch.equal(saved[saved_name(n)], params[n].detach()) for n in trainable)


def test_per_part_learning_rates(tiny_qwen2_vl):
    family = family_for(tiny_qwen2_vl)
    config = load_config(None, ["train.method=full", "train.freeze_vision=false", "train.freeze_projector=false",
                                "train.learning_rate=1e-4", "train.vision_lr=1e-6", "train.projector_lr=1e-5",
                                "train.weight_decay=0.1"])
    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen2_vl, dtype=torch.float32)
    model = prepare_model(model, family, config.train, config.lora)
    decay = {n for n, _ in model.named_parameters() if n.endswith("weight") and "norm" not in n}
    groups = param_groups(model, family, config.train, decay)
    lr_of = {"vision": 1e-6, "projector": 1e-5, "llm": 1e-4}
    names = {id(p): n for n, p in model.named_parameters()}
    seen = 0
    for group in groups:
        for p in group["params"]:
            name = names[id(p)]
            assert group["lr"] == lr_of[family.part_of(name)], name
            assert group["weight_decay"] == (0.1 if name in decay else 0.0), name
            seen += 1
    assert seen == sum(1 for p in model.parameters() if p.requires_grad)


# --- refused configurations -------------------------------------------------------------------


def test_full_training_with_everything_frozen_is_refused(tiny_qwen2_vl, caption_data, tmp_path):
    with pytest.raises(ConfigError, match="all true: nothing would train"):
        train(load_config(None, base_overrides(tiny_qwen2_vl, caption_data["train"], tmp_path / "run",
                                               "train.method=full", "train.freeze_llm=true")))


def test_a_lora_regex_that_matches_nothing_is_refused(tiny_qwen2_vl, caption_data, tmp_path):
    with pytest.raises(ConfigError) as info:
        train(load_config(None, base_overrides(tiny_qwen2_vl, caption_data["train"], tmp_path / "run",
                                               r"lora.targets=.*\.no_such_proj")))
    assert r"lora.targets '.*\\.no_such_proj' matches no linear layer" in str(info.value)
    # A list of names that exist only in the frozen vision tower is refused the same way.
    with pytest.raises(ConfigError, match="matches no linear layer outside the frozen parts"):
        train(load_config(None, base_overrides(tiny_qwen2_vl, caption_data["train"], tmp_path / "run2",
                                               "lora.targets=[qkv, fc1]")))


@pytest.mark.skipif(torch.cuda.is_available(), reason="QLoRA runs where CUDA is available")
def test_qlora_without_cuda_is_a_clear_error(tiny_qwen2_vl, caption_data, tmp_path):
    with pytest.raises(VlmtuneError) as info:
        train(load_config(None, base_overrides(tiny_qwen2_vl, caption_data["train"], tmp_path / "run",
                                               "train.method=qlora")))
    assert "needs a CUDA device" in str(info.value) and "method: lora" in str(info.value)


# --- resume ------------------------------------------------------------------------------------


class StopAfter(TrainerCallback):
    """Kills the run as step `step + 1` begins, as Ctrl-C or a lost machine would."""

    def __init__(self, step: int):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


def resume_overrides(tiny, data, out, *extra):
    return base_overrides(tiny, data, out, "train.max_steps=6", "train.save_steps=2", "train.lr_scheduler=linear",
                          "train.learning_rate=0.001", *extra)


@pytest.mark.long
def test_resume_continues_an_interrupted_run(tiny_qwen2_vl, caption_data, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(load_config(None, resume_overrides(tiny_qwen2_vl, caption_data["train"], out)), callbacks=[StopAfter(4)])
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert not (out / "final").exists()
    first = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in first if "loss" in r] == [1, 2, 3, 4]

    # Without resume, the folder is not silently trained over.
    with pytest.raises(ConfigError) as info:
        train(load_config(None, resume_overrides(tiny_qwen2_vl, caption_data["train"], out)))
    assert "checkpoint-4" in str(info.value) and "train.resume=true" in str(info.value)

    train(load_config(None, resume_overrides(tiny_qwen2_vl, caption_data["train"], out, "train.resume=true")))
    state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    second = read_jsonl(out / "metrics.jsonl")[len(first):]
    assert [r["step"] for r in second if "loss" in r] == [5, 6]  # continued, not restarted
    assert all(math.isfinite(r["loss"]) for r in second if "loss" in r)
    assert (out / "final" / "adapter_model.safetensors").is_file()

    # The resumed run is the run that was never interrupted: same losses, same final adapter.
    straight = tmp_path / "straight"
    train(load_config(None, resume_overrides(tiny_qwen2_vl, caption_data["train"], straight)))
    reference = {r["step"]: r["loss"] for r in read_jsonl(straight / "metrics.jsonl") if "loss" in r}
    for r in second:
        if "loss" in r:
            assert r["loss"] == pytest.approx(reference[r["step"]], rel=1e-4, abs=1e-5)
    a = load_file(out / "final" / "adapter_model.safetensors")
    b = load_file(straight / "final" / "adapter_model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_resume_true_in_an_empty_folder_starts_from_the_beginning(tiny_qwen2_vl, caption_data, tmp_path, capsys):
    out = tmp_path / "run"
    train(load_config(None, base_overrides(tiny_qwen2_vl, caption_data["train"], out, "train.resume=true")))
    assert "holds no checkpoint yet: starting from the beginning" in capsys.readouterr().out
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r] == [1, 2]


def test_resume_from_a_missing_checkpoint_path_is_refused(tiny_qwen2_vl, caption_data, tmp_path):
    with pytest.raises(ConfigError, match="no such checkpoint folder"):
        train(load_config(None, base_overrides(tiny_qwen2_vl, caption_data["train"], tmp_path / "run",
                                               f"train.resume={tmp_path / 'run' / 'checkpoint-9'}")))


# --- `vlmtune train` as a command --------------------------------------------------------------


def test_cli_train_writes_complete_checkpoints_and_final(cli_run, tiny_qwen2_vl):
    result, out = cli_run["result"], cli_run["out"]
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"done: run folder {out}" in result.stdout
    template = (tiny_qwen2_vl / "chat_template.jinja").read_text()
    for name in ("checkpoint-2", "checkpoint-4", "final"):
        folder = out / name
        for file in ("adapter_model.safetensors", "adapter_config.json", "processor_config.json", "tokenizer.json",
                     "tokenizer_config.json", "chat_template.jinja", "vlmtune.yaml"):
            assert (folder / file).is_file(), f"{name}/{file} missing"
        assert (folder / "chat_template.jinja").read_text() == template
        assert json.loads((folder / "adapter_config.json").read_text())["r"] == 4
        assert not (folder / "model.safetensors").exists()  # LoRA: the adapter only
    for name in ("checkpoint-2", "checkpoint-4"):
        assert (out / name / "trainer_state.json").is_file() and (out / name / "optimizer.pt").is_file()
    # The adapter really is trained: B matrices, zero at initialisation, are not zero any more.
    adapter = load_file(out / "final" / "adapter_model.safetensors")
    assert any(k.endswith("lora_B.weight") for k in adapter)
    assert all(v.abs().sum() > 0 for k, v in adapter.items() if k.endswith("lora_B.weight"))


def test_cli_train_metrics_are_finite_and_complete(cli_run):
    assert cli_run["result"].returncode == 0, cli_run["result"].stderr[-3000:]
    records = read_jsonl(cli_run["out"] / "metrics.jsonl")
    losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    assert sorted(losses) == [1, 2, 3, 4] and all(math.isfinite(v) for v in losses.values())
    evals = {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}
    assert sorted(evals) == [2, 4] and all(math.isfinite(v) for v in evals.values())
    generated = [r for r in records if any(k.startswith("val_") for k in r)]
    assert sorted(r["step"] for r in generated) == [2, 4]
    assert all(isinstance(r["time"], float) and r["epoch"] is not None for r in records)


def test_cli_train_writes_tracker_files_and_prediction_samples(cli_run):
    out = cli_run["out"]
    assert cli_run["result"].returncode == 0, cli_run["result"].stderr[-3000:]
    # TensorBoard: an event file in the run folder, holding the training loss.
    events = list((out / "tensorboard").rglob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for e in events:
        acc = EventAccumulator(str(e))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert "train/loss" in tags and "eval/loss" in tags
    # SwanLab, local mode (no API key): a run folder under RUN/swanlog with the logged data and config.
    runs = [p for p in (out / "swanlog").glob("run-*") if p.is_dir()]
    assert len(runs) == 1
    assert list(runs[0].glob("*.swanlab")) and (runs[0] / "files" / "config.yaml").is_file()
    assert "swanlab watch" in cli_run["result"].stdout + cli_run["result"].stderr
    # Predictions on the validation samples at each evaluation (eval.num_samples=2).
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-000002.jsonl", "step-000004.jsonl"]
    for path in (out / "samples").iterdir():
        rows = read_jsonl(path)
        assert len(rows) == 2
        assert all({"prediction", "reference", "images"} <= set(r) for r in rows)
        assert {r["reference"] for r in rows} == {"a red circle", "a green square"}
        assert all(re.fullmatch(r".*\.png", r["images"][0]) for r in rows)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_fp16_runs_train_fp32_weights_and_keep_frozen_ones_fp16(tiny_model_dir, method):
    """fp16 mixed precision: what trains (adapters, the tuned vision tower, a full model's unfrozen
    parts) is upcast to fp32, the frozen weights stay fp16; a 1e-6 step then moves every trained
    weight, which in fp16 it mostly would not."""
    from vlmtune.config import LoraConfig, TrainConfig
    from vlmtune.models import family_for
    from vlmtune.models.load import load_model
    from vlmtune.tuning import prepare_model, upcast_trainable

    path = tiny_model_dir("minicpmv2_6")
    family = family_for(path)
    model = load_model(path, torch.float16)
    model = prepare_model(model, family, TrainConfig(method=method, freeze_vision=False), LoraConfig(r=4))
    assert upcast_trainable(model) > 0
    trained = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)
    assert frozen and all(p.dtype == torch.float16 for p in frozen)
    weight = next(p for n, p in model.named_parameters() if p.requires_grad and n.endswith("weight") and p.dim() == 2)
    assert ((weight.data - 1e-6) != weight.data).float().mean() > 0.99  # fp16 would keep most weights as they are
    assert ((weight.data.half() - 1e-6).half() == weight.data.half()).float().mean() > 0.5
