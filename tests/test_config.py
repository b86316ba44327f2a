"""Run configuration: YAML plus dotted overrides, unknown keys and wrong types refused with the
valid choices named, the resolved config saved beside every set of weights, every shipped
config parsed (subfolders included)."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import ROOT
from vlmtune.config import CONFIG_NAME, RunConfig, config_to_dict, load_config
from vlmtune.errors import ConfigError


def write_yaml(path, data) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_yaml_then_dotted_overrides(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {
        "model": {"name_or_path": "Qwen/Qwen2-VL-2B-Instruct"},
        "data": {"train": "data/train.json", "image_size": [280, 280]},
        "lora": {"r": 64, "targets": ["q_proj", "v_proj"]},
        "train": {"learning_rate": 1e-4, "max_steps": 100, "report_to": ["swanlab"]},
    })
    config = load_config(path, ["train.max_steps=5", "lora.r=8", "train.learning_rate=3e-4", "train.resume=true",
                                "lora.targets=.*language_model.*q_proj", "train.run_name=001",
                                "train.report_to=[tensorboard, swanlab]", "data.val_size=0.1",
                                "model.hub=modelscope", "train.deepspeed=configs/deepspeed/zero2.json"])
    assert isinstance(config, RunConfig)
    assert config.model.name_or_path == "Qwen/Qwen2-VL-2B-Instruct" and config.model.hub == "modelscope"
    assert config.data.train == "data/train.json" and config.data.image_size == [280, 280]
    assert config.train.max_steps == 5 and config.lora.r == 8
    assert config.train.learning_rate == 3e-4 and isinstance(config.train.learning_rate, float)
    assert config.train.resume is True
    assert config.lora.targets == ".*language_model.*q_proj"  # a string: a regex
    assert config.train.run_name == "001"  # stays a string, not the number 1
    assert config.train.report_to == ["tensorboard", "swanlab"]
    assert config.data.val_size == 0.1
    # Untouched fields keep their defaults.
    assert config.train.freeze_vision is True and config.data.on_bad_sample == "error"
    # An int where a float is expected is fine (YAML writes 1 for 1.0).
    assert load_config(None, ["train.epochs=3"]).train.epochs == 3.0
    # The resolved config reads back to itself.
    assert load_config(write_yaml(tmp_path / "again.yaml", config_to_dict(config))) == config


def test_learning_rates_in_scientific_notation(tmp_path):
    """PyYAML reads `1e-4` (no dot) as a string; the seeds and every tutorial write rates that way."""
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  learning_rate: 1e-4\n  vision_lr: 2E-6\n  weight_decay: 0.1\n")
    config = load_config(path, ["train.projector_lr=5e-5"])
    assert (config.train.learning_rate, config.train.vision_lr, config.train.projector_lr) == (1e-4, 2e-6, 5e-5)
    with pytest.raises(ConfigError, match="train.learning_rate: expected float"):
        load_config(None, ["train.learning_rate=fast"])
    with pytest.raises(ConfigError, match="train.max_steps: expected int"):
        load_config(None, ["train.max_steps=1e3"])  # only float fields read scientific notation


@pytest.mark.parametrize("source, where, wrong, valid", [
    ({"trian": {"max_steps": 3}}, "", "trian", ["data", "eval", "lora", "model", "train"]),
    ({"train": {"max_step": 3}}, "train", "max_step", ["max_steps", "learning_rate", "freeze_vision"]),
    ({"lora": {"rank": 8}}, "lora", "rank", ["r", "alpha", "targets", "modules_to_save"]),
])
def test_unknown_keys_are_refused_with_the_valid_ones_listed(tmp_path, source, where, wrong, valid):
    path = write_yaml(tmp_path / "c.yaml", source)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert path in message and f"unknown key(s) {wrong}" in message
    listed = message.split("valid keys: ")[1]
    assert all(key in listed.split(", ") for key in valid)
    if where:
        assert f"{where}: unknown" in message
    # The same mistake on the command line.
    dotted = f"{where}.{wrong}=1" if where else f"{wrong}.x=1"
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(None, [dotted])


@pytest.mark.parametrize("override, expected", [
    ("train.max_steps=abc", "train.max_steps: expected int, got 'abc'"),
    ("train.max_steps=1.5", "train.max_steps: expected int, got 1.5"),
    ("train.freeze_vision=maybe", "train.freeze_vision: expected true or false, got 'maybe'"),
    ("train.method=sgd", "train.method: 'sgd' is not one of lora, dora, qlora, full"),
    ("data.image_size=280", "data.image_size"),
    ("train.report_to=tensorboard", "train.report_to: expected a list"),
    ("train=5", "train: expected a mapping"),
    ("max_steps", "expected key=value"),
])
def test_wrong_types_are_refused(override, expected):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert expected in str(info.value)


def test_unreadable_config_files(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping of sections"):
        load_config(bad)


def test_resolved_config_is_in_the_run_folder_every_checkpoint_and_final(cli_run):
    result, out = cli_run["result"], cli_run["out"]
    assert result.returncode == 0, result.stderr[-3000:]
    expected = load_config(cli_run["config"], cli_run["overrides"])
    folders = [out, out / "checkpoint-2", out / "checkpoint-4", out / "final"]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    for folder in folders:
        saved = folder / CONFIG_NAME
        assert saved.is_file(), saved
        # Overrides are applied, and the file is a valid config that later commands can load as is.
        assert load_config(saved) == expected
        assert yaml.safe_load(saved.read_text())["train"]["output_dir"] == str(out)


# --- shipped configs ------------------------------------------------------------------------

SHIPPED = sorted((ROOT / "configs").rglob("*.yaml")) + sorted((ROOT / "configs").rglob("*.yml"))
# DeepSpeed JSON configs (configs/fsdp/ holds FSDP ones: tests/test_vision_pass.py checks those)
DEEPSPEED = sorted(p for p in (ROOT / "configs").rglob("*.json") if "fsdp" not in p.relative_to(ROOT).parts)


def test_every_shipped_yaml_config_parses():
    """Every `configs/**/*.yaml`, subfolders included; at least one must exist."""
    assert SHIPPED, f"no YAML config found under {ROOT / 'configs'}"
    failures = []
    for path in SHIPPED:
        try:
            config = load_config(path)
        except ConfigError as e:
            failures.append(str(e))
            continue
        # A config that points at a DeepSpeed file must ship that file.
        ds = config.train.deepspeed
        if ds and not ((ROOT / ds).is_file() or (path.parent / ds).is_file()):
            failures.append(f"{path}: train.deepspeed={ds} does not exist")
    assert not failures, "\n".join(failures)


def test_the_example_configs_of_the_issue_are_shipped():
    names = {p.relative_to(ROOT / "configs").as_posix() for p in SHIPPED}
    for name in ("demo.yaml", "qwen2_vl_latex_ocr.yaml", "qwen2_vl_coco_caption.yaml"):
        assert name in names, f"configs/{name} is missing"
    stages = set()
    for path in DEEPSPEED:
        stages.add(json.loads(path.read_text())["zero_optimization"]["stage"])
    assert {2, 3} <= stages, f"DeepSpeed ZeRO-2 and ZeRO-3 configs expected under configs/, found stages {stages}"


@pytest.mark.parametrize("path", DEEPSPEED, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_deepspeed_configs_are_valid_json_with_a_zero_stage(path):
    data = json.loads(path.read_text())
    assert isinstance(data, dict)
    stage = data["zero_optimization"]["stage"]
    assert stage in (0, 1, 2, 3)
