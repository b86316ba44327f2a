"""Faults in what a user gives vlmtune, met as a user meets them: through the command line, in a
subprocess, with real tiny models. Each ends in exit code 2 and one clear message, never a
traceback, and before anything heavy loads.

- config values out of range (`train.batch_size=-3`, a negative learning rate, ...);
- a text-only language model given where a vision-language model is needed, in every command;
- an `--adapter` that is missing or holds no adapter;
- remote code: only `--trust-remote-code` enables it, never a config; it lists what will run;
- merge: the temporary folder a killed merge leaves is removed by the next one; a full disk is
  reported as such;
- data files with no records; MiniCPM `<image_NN>` placeholders that do not match the record's
  images; MiniCPM-V 4.x image ids numbered over the whole conversation, as the processor does.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import base_overrides, draw, run_cli, start_cli, trained_runs, write_json
from vlmtune.config import ConfigError, load_config


def assert_clean_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit code 2, every fragment in the message, and no traceback."""
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)


def write_config(path: Path, model: Path | str, data: str, out: Path, **model_keys) -> str:
    """A small YAML run config (what a user passes to `vlmtune train` or `vlmtune plan`)."""
    path.write_text(yaml.safe_dump({
        "model": {"name_or_path": str(model), **model_keys},
        "data": {"train": data},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"output_dir": str(out), "max_steps": 1, "batch_size": 2, "grad_accum": 1, "save_steps": 1000},
        "eval": {"num_samples": 0}}))
    return str(path)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_qwen2_vl, caption_data) -> Path:
    """A finished one-step LoRA run of the tiny Qwen2-VL (its final/ is an adapter)."""
    from vlmtune.train import train

    out = tmp_path_factory.mktemp("faults_inputs") / "run"
    return train(load_config(None, base_overrides(tiny_qwen2_vl, caption_data["train"], out, "train.max_steps=1",
                                                  "train.learning_rate=0.01")))


def rebased_run(lora_run: Path, folder: Path, model: Path, **model_keys) -> Path:
    """A copy of `lora_run` whose saved config names `model` as the base (and `model_keys`)."""
    shutil.copytree(lora_run, folder)
    for config in folder.rglob("vlmtune.yaml"):
        data = yaml.safe_load(config.read_text())
        data["model"].update(name_or_path=str(model), **model_keys)
        config.write_text(yaml.safe_dump(data))
    return folder


# -- config values ---------------------------------------------------------------------------

def test_an_out_of_range_config_value_stops_train_before_the_model_loads(tiny_qwen2_vl, caption_data, tmp_path):
    config = write_config(tmp_path / "c.yaml", tiny_qwen2_vl, caption_data["train"], tmp_path / "run")
    result = run_cli(["train", config, "train.batch_size=-3"])
    assert_clean_error(result, f"{config}: train.batch_size=-3: must be >= 1")
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, message", [
    ("train.grad_accum=0", "train.grad_accum=0: must be >= 1"),
    ("train.learning_rate=-1e-4", "train.learning_rate=-0.0001: must be > 0"),
    ("train.learning_rate=0", "train.learning_rate=0.0: must be > 0"),
    ("train.learning_rate=.nan", "train.learning_rate=nan: must be > 0"),
    ("train.vision_lr=-1e-5", "train.vision_lr=-1e-05: must be > 0"),
    ("train.projector_lr=0", "train.projector_lr=0.0: must be > 0"),
    ("train.epochs=0", "train.epochs=0.0: must be > 0 (or set train.max_steps > 0)"),
    ("train.max_steps=0", "train.max_steps=0: must be -1 (train for train.epochs) or > 0"),
    ("train.logging_steps=0", "train.logging_steps=0: must be >= 1"),
    ("train.save_steps=-1", "train.save_steps=-1: must be >= 1"),
    ("train.eval_steps=0", "train.eval_steps=0: must be >= 1"),
    ("train.warmup_ratio=1", "train.warmup_ratio=1.0: must be in [0, 1)"),
    ("train.weight_decay=-0.1", "train.weight_decay=-0.1: must be >= 0"),
    ("train.adam_beta2=1.5", "train.adam_beta2=1.5: must be in [0, 1)"),
    ("train.max_grad_norm=-1", "train.max_grad_norm=-1.0: must be >= 0"),
    ("train.save_total_limit=0", "train.save_total_limit=0: must be >= 1"),
    ("train.vision_cache_mb=0", "train.vision_cache_mb=0: must be >= 1"),
    ("lora.r=0", "lora.r=0: must be >= 1"),
    ("lora.alpha=0", "lora.alpha=0: must be > 0"),
    ("lora.dropout=1", "lora.dropout=1.0: must be in [0, 1)"),
    ("data.max_length=0", "data.max_length=0: must be >= 1"),
    ("data.max_pixels=0", "data.max_pixels=0: must be > 0"),
    ("data.min_pixels=-5", "data.min_pixels=-5: must be > 0 and <= data.max_pixels"),
    ("data.max_slice_nums=0", "data.max_slice_nums=0: must be >= 1"),
    ("data.image_size=[280]", "data.image_size=[280]: must be two positive whole numbers"),
    ("data.image_size=[280, 0]", "data.image_size=[280, 0]: must be two positive whole numbers"),
    ("data.val_size=-1", "data.val_size=-1.0: must be >= 0"),
    ("data.num_workers=-2", "data.num_workers=-2: must be >= 0"),
    ("data.pack_length=0", "data.pack_length=0: must be >= 1"),
    ("eval.batch_size=0", "eval.batch_size=0: must be >= 1"),
    ("eval.num_samples=-1", "eval.num_samples=-1: must be >= 0"),
    ("eval.max_new_tokens=0", "eval.max_new_tokens=0: must be >= 1"),
])
def test_every_numeric_setting_has_a_range(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert str(info.value).startswith(f"config: {message}")


def test_values_at_the_edges_of_their_ranges_are_accepted():
    config = load_config(None, [
        "train.epochs=0", "train.max_steps=5", "train.warmup_ratio=0", "train.weight_decay=0", "train.max_grad_norm=0",
        "lora.dropout=0", "data.val_size=0", "data.num_workers=0", "eval.num_samples=0", "data.min_pixels=3136",
        "data.max_pixels=3136", "data.image_size=[28, 28]", "train.vision_lr=1e-6", "train.save_total_limit=1"])
    assert config.train.max_steps == 5 and config.data.min_pixels == config.data.max_pixels
    with pytest.raises(ConfigError, match=r"data.min_pixels=6272: must be > 0 and <= data.max_pixels"):
        load_config(None, ["data.min_pixels=6272", "data.max_pixels=3136"])


# -- text-only models ------------------------------------------------------------------------

def build_text_only_model(folder: Path, model_type: str) -> Path:
    """A tiny random-weight text-only LLM (Qwen2 or Llama) with a tokenizer, as a hub folder holds it."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from vlmtune.models.tiny import build_tokenizer

    config_class, model_class = {"qwen2": (Qwen2Config, Qwen2ForCausalLM),
                                 "llama": (LlamaConfig, LlamaForCausalLM)}[model_type]
    tokenizer = build_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    config = config_class(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=2)
    torch.manual_seed(0)
    model_class(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def text_only(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("text_only")
    return {t: build_text_only_model(root / t, t) for t in ("qwen2", "llama")}


def command_for(name: str, model: Path, data: str, tmp: Path, lora_run: Path) -> list[str]:
    """The command line of `name` with `model` as its (base) model."""
    config = lambda: write_config(tmp / "c.yaml", model, data, tmp / "run")  # noqa: E731
    return {
        "train": lambda: ["train", config()],
        "plan": lambda: ["plan", config()],
        "eval": lambda: ["eval", "--model", str(model), "--data", data, "--out", str(tmp / "eval")],
        "predict": lambda: ["predict", "--model", str(model), "--data", data, "--out", str(tmp / "p.jsonl")],
        "chat": lambda: ["chat", "--model", str(model), "--prompt", "Hello?", "--no-stream"],
        "merge": lambda: ["merge", str(rebased_run(lora_run, tmp / "rebased", model)), "--out", str(tmp / "merged")],
        "data check": lambda: ["data", "check", data, "--model", str(model)],
        "data stats": lambda: ["data", "stats", data, "--model", str(model)],
    }[name]()


@pytest.mark.parametrize("command, model_type", [
    ("train", "qwen2"), ("plan", "qwen2"), ("eval", "llama"), ("predict", "qwen2"), ("chat", "qwen2"),
    ("merge", "qwen2"), ("data check", "llama"), ("data stats", "qwen2"),
])
def test_a_text_only_model_is_named_as_such(text_only, caption_data, lora_run, tmp_path, command, model_type):
    model = text_only[model_type]
    result = run_cli(command_for(command, model, caption_data["train"], tmp_path, lora_run))
    assert_clean_error(result, f"{model}: not a vision-language model (model_type {model_type}); "
                               "vlmtune fine-tunes image+text models such as Qwen2-VL")
    assert not (tmp_path / "merged").exists()


# -- missing adapters ------------------------------------------------------------------------

@pytest.mark.parametrize("command, adapter, message", [
    ("eval", "missing", "no such folder; pass the folder holding adapter_config.json"),
    ("predict", "empty", "holds no adapter_config.json, so it is not a LoRA adapter"),
    ("chat", "run", "holds no adapter_config.json, so it is not a LoRA adapter; it has "),
])
def test_a_bad_adapter_is_refused_before_the_model_loads(tiny_qwen2_vl, caption_data, lora_run, tmp_path,
                                                         command, adapter, message):
    folder = {"missing": tmp_path / "nope", "empty": tmp_path / "empty", "run": lora_run}[adapter]
    (tmp_path / "empty").mkdir()
    args = {"eval": ["--data", caption_data["val"], "--out", str(tmp_path / "eval")],
            "predict": ["--data", caption_data["val"], "--out", str(tmp_path / "p.jsonl")],
            "chat": ["--prompt", "Hello?", "--no-stream"]}[command]
    result = run_cli([command, "--model", str(tiny_qwen2_vl), "--adapter", str(folder), *args])
    assert_clean_error(result, f"--adapter {folder}: {message}")


def test_merge_of_a_folder_without_adapter_is_refused(tiny_qwen2_vl, tmp_path):
    result = run_cli(["merge", str(tiny_qwen2_vl), "--out", str(tmp_path / "merged")])
    assert_clean_error(result, "nothing to merge", "holds full weights")


# -- remote code -----------------------------------------------------------------------------

@pytest.fixture
def remote_code_model(tiny_qwen2_vl, tmp_path) -> tuple[Path, Path]:
    """A model folder that exists only as remote code (a model_type transformers does not know, an
    auto_map); its Python files leave a marker file if anything imports them."""
    folder = tmp_path / "Acme-VL"
    shutil.copytree(tiny_qwen2_vl, folder)
    marker = tmp_path / "remote_code_ran"
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="acme_vl", auto_map={"AutoConfig": "configuration_acme.AcmeConfig",
                                                  "AutoModelForImageTextToText": "modeling_acme.AcmeVL"})
    (folder / "config.json").write_text(json.dumps(config))
    for name in ("configuration_acme.py", "modeling_acme.py"):
        (folder / name).write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    return folder, marker


def test_train_refuses_a_config_that_enables_remote_code_without_the_flag(tiny_qwen2_vl, caption_data, tmp_path):
    config = write_config(tmp_path / "c.yaml", tiny_qwen2_vl, caption_data["train"], tmp_path / "run",
                          trust_remote_code=True)
    result = run_cli(["train", config])
    assert_clean_error(result, f"{config}: model.trust_remote_code is true, but only the command line enables "
                               "remote code", "pass --trust-remote-code")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", ["chat", "merge"])
def test_a_run_folder_cannot_enable_remote_code(lora_run, remote_code_model, tmp_path, command):
    """A shared run folder whose config says trust_remote_code: true, based on a remote-code model:
    without the flag, the saved value is ignored (and said so), and no code from the folder runs."""
    model, marker = remote_code_model
    run = rebased_run(lora_run, tmp_path / "shared_run", model, trust_remote_code=True)
    args = {"chat": ["chat", str(run), "--prompt", "Hello?", "--no-stream"],
            "merge": ["merge", str(run), "--out", str(tmp_path / "merged")]}[command]
    result = run_cli(args)
    assert_clean_error(result, "ignoring model.trust_remote_code=true saved in", "pass --trust-remote-code",
                       "not built into transformers")
    assert not marker.exists()


def test_the_flag_lists_the_python_files_that_may_run(tiny_qwen2_vl, caption_data, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_qwen2_vl, model)
    (model / "helpers.py").write_text("VALUE = 1\n")
    result = run_cli(["data", "check", caption_data["train"], "--model", str(model), "--trust-remote-code"])
    assert result.returncode == 0, result.stderr
    assert f"warning: --trust-remote-code: these Python files of {model} may run: helpers.py" in result.stderr


# -- merge: killed mid-write, full disk -----------------------------------------------------

def hidden_beside(out: Path) -> list[Path]:
    return sorted(p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


@pytest.mark.long
def test_a_killed_merge_leaves_a_temp_folder_the_next_merge_removes(lora_run, tmp_path):
    out = tmp_path / "merged"
    proc = start_cli(["merge", str(lora_run), "--out", str(out)])
    try:
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:
            temps = hidden_beside(out)
            if temps and any(temps[0].iterdir()):  # the write has begun
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the merge finished before the test saw it write"
    left = hidden_beside(out)
    assert left and not out.exists()

    result = run_cli(["merge", str(lora_run), "--out", str(out)])
    assert result.returncode == 0, result.stderr
    assert f"removed {left[0]}: left by a process that no longer runs" in result.stdout
    assert hidden_beside(out) == [] and (out / "model.safetensors").is_file() and (out / "merge.json").is_file()


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB file system (tmpfs), smaller than the tiny merged model, where the test may mount one (root)."""
    folder = tmp_path / "small"
    folder.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(folder)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small file system needs root")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_a_full_disk_during_the_merge_says_so_and_leaves_nothing(lora_run, small_disk):
    result = run_cli(["merge", str(lora_run), "--out", str(small_disk / "merged")])
    assert_clean_error(result, f"no space left on {small_disk}", "while writing the merged model; it needs about",
                       "nothing half-written was kept")
    assert list(small_disk.iterdir()) == []


def test_data_synth_and_tiny_model_on_a_full_disk_say_so_and_leave_nothing(small_disk):
    synth = run_cli(["data", "synth", "caption", "--out", str(small_disk / "shapes"), "--n", "300", "--val", "10"])
    assert_clean_error(synth, f"no space left on {small_disk}", f"while writing the dataset {small_disk / 'shapes'}",
                       "nothing half-written was kept")
    tiny = run_cli(["tiny-model", "--out", str(small_disk / "tiny")])
    assert_clean_error(tiny, f"no space left on {small_disk}", f"while writing the tiny model {small_disk / 'tiny'}")
    assert list(small_disk.iterdir()) == []


def test_data_split_on_a_full_disk_keeps_the_previous_pair_whole(small_disk, tmp_path):
    images = [draw(tmp_path / f"shape{i}.png", colour, shape) for i, (colour, shape) in
              enumerate((c, s) for c in ("red", "green", "blue", "yellow", "purple") for s in ("circle", "square"))]
    records = [{"id": str(i), "image": str(images[i % 10]), "conversations": [
        {"role": "user", "content": f"<image>\nQuestion {i}: what is drawn here, in a few words?"},
        {"role": "assistant", "content": "a red circle " * 20}]} for i in range(300)]
    data = write_json(tmp_path / "all.json", records)
    out = small_disk / "split"
    out.mkdir()
    old = {name: write_json(out / f"{name}.json", records[:1]) for name in ("train", "val")}
    before = {name: Path(path).read_bytes() for name, path in old.items()}
    free = shutil.disk_usage(small_disk).free
    (small_disk / "filler").write_bytes(b"x" * (free - 48 * 1024))  # room for one new file, not two
    # val holds 9 of the 10 images: the small train file is written, then the big val file fails
    result = run_cli(["data", "split", data, "--val", "0.9", "--out", str(out)])
    assert_clean_error(result, f"no space left on {out}", "nothing half-written was kept")
    assert {name: Path(path).read_bytes() for name, path in old.items()} == before  # old train and val, untouched
    assert sorted(p.name for p in out.iterdir()) == ["train.json", "val.json"]


def test_tiny_model_replaces_its_own_folder_and_refuses_any_other(tmp_path):
    out = tmp_path / "tiny"
    assert run_cli(["tiny-model", "--out", str(out)]).returncode == 0
    first = (out / "model.safetensors").read_bytes()
    again = run_cli(["tiny-model", "--out", str(out), "--seed", "1"])
    assert again.returncode == 0 and (out / "model.safetensors").read_bytes() != first
    assert json.loads((out / "vlmtune_tiny.json").read_text())["seed"] == 1
    other = tmp_path / "data"
    other.mkdir()
    (other / "train.json").write_text("[]")
    assert_clean_error(run_cli(["tiny-model", "--out", str(other)]), f"{other} exists and is not a tiny model folder")
    assert [p.name for p in other.iterdir()] == ["train.json"]
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


# -- data files ------------------------------------------------------------------------------

@pytest.mark.parametrize("name, text, held", [
    ("empty_list.json", "[]\n", "an empty list"),
    ("zero_bytes.json", "", "the file is empty (0 bytes)"),
    ("no_lines.jsonl", "\n\n", "no record lines"),
    ("header_only.csv", "image_path,text\n", "a header row and no rows"),
])
def test_a_data_file_without_records_is_an_error(tmp_path, name, text, held):
    path = tmp_path / name
    path.write_text(text)
    assert_clean_error(run_cli(["data", "check", str(path)]), f"{path}: holds no records ({held})")


def test_train_refuses_an_empty_training_file_before_the_model_loads(tiny_qwen2_vl, tmp_path):
    data = write_json(tmp_path / "train.json", [])
    config = write_config(tmp_path / "c.yaml", tiny_qwen2_vl, data, tmp_path / "run")
    assert_clean_error(run_cli(["train", config]), f"{data}: holds no records (an empty list)")


def minicpm_record(images: dict, text: str) -> dict:
    return {"id": "0", "image": images, "conversations": [{"role": "user", "content": text},
                                                         {"role": "assistant", "content": "Two shapes."}]}


@pytest.mark.parametrize("images, text, message", [
    ({"<image_00>": "a.png", "<image_01>": "b.png"}, "<image_00>\n<image_02>\nCompare.",
     "placeholder <image_02> names no image of this record (named images: <image_00>, <image_01>)"),
    ({"<image_00>": "a.png", "<image_01>": "b.png"}, "<image_00>\nWhat is this?",
     "image <image_01> (b.png) is used by no placeholder in the text"),
])
def test_numbered_placeholders_must_match_the_records_images(tmp_path, images, text, message):
    draw(tmp_path / "a.png")
    draw(tmp_path / "b.png", "blue", "square")
    data = write_json(tmp_path / "d.json", [minicpm_record({"<image_00>": "a.png"}, "<image_00>\nWhat?"),
                                            minicpm_record(images, text)])
    assert_clean_error(run_cli(["data", "check", data]), f"{data}:1: {message}")


# -- MiniCPM-V 4.x image ids ------------------------------------------------------------------

@pytest.mark.parametrize("family", ["minicpmv4_6", "minicpmv4_7"])
def test_minicpmv4_numbers_images_over_the_whole_conversation(tiny_model_dir, tmp_path, family):
    """Two turns with one image each, encoded for training turn by turn, equal the processor applied
    to the whole rendered conversation (the second image is <image_id>1</image_id>); the prompt
    vlmtune generates from numbers it the same way; only the answers are trained."""
    from vlmtune.data.encode import Encoder, load_image
    from vlmtune.data.sample import Sample, Turn
    from vlmtune.models import family_for
    from vlmtune.models.load import load_processor

    model = tiny_model_dir(family)
    processor = load_processor(model, family_for(model))
    images = [draw(tmp_path / "a.png"), draw(tmp_path / "b.png", "blue", "square")]
    sample = Sample(images, [Turn("user", "<image>\nWhat is this?"), Turn("assistant", "a red circle"),
                             Turn("user", "<image>\nAnd this?"), Turn("assistant", "a blue square")], source="t:0")
    encoder = Encoder(processor, family_for(model))
    encoded = encoder.encode(sample)
    whole = processor(text=[encoder.render(encoder.messages(sample))], images=[load_image(p) for p in images],
                      add_special_tokens=False, return_tensors="pt")
    assert encoded["input_ids"].tolist() == whole["input_ids"][0].tolist()
    assert torch.equal(encoded["pixel_values"], whole["pixel_values"])
    assert "<image_id>1</image_id>" in processor.tokenizer.decode(encoded["input_ids"])

    prompt = encoder.encode_prompt(sample)["input_ids"].tolist()
    assert encoded["input_ids"].tolist()[:len(prompt)] == prompt
    tok = processor.tokenizer
    assert trained_runs(encoded["labels"]) == [tok(a + "<|im_end|>", add_special_tokens=False)["input_ids"]
                                               for a in ("a red circle", "a blue square")]
