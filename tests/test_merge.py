"""`vlmtune merge`: a real LoRA run (and one with a fully trained projector, peft's
modules_to_save) is merged, reloaded with plain transformers, and must give the adapter's logits;
a corrupted merge is caught and leaves nothing behind; bad folders are refused with clear errors."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from vlmtune import cli
from vlmtune import merge as merge_module
from vlmtune.config import load_config
from vlmtune.errors import VlmtuneError
from vlmtune.merge import merge
from vlmtune.models.tiny import build_tiny_model
from vlmtune.train import train

TOL = 1e-4
SHAPES = [("red", "circle"), ("blue", "square"), ("green", "triangle"), ("yellow", "circle")]


@pytest.fixture(scope="session")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A tiny qwen2_vl model, a 4-sample dataset, and two short training runs with a high
    learning rate so the adapters are far from zero: LoRA only, and LoRA + trained projector."""
    root = tmp_path_factory.mktemp("merge")
    tiny = build_tiny_model("qwen2_vl", root / "tiny")
    (root / "data" / "images").mkdir(parents=True)
    records = []
    for i, (colour, shape) in enumerate(SHAPES):
        image = Image.new("RGB", (112, 112), "white")
        ImageDraw.Draw(image).ellipse((20, 20, 90, 90), fill=colour)
        image.save(root / "data" / "images" / f"{i}.png")
        records.append({"id": str(i), "image": f"images/{i}.png", "conversations": [
            {"role": "user", "content": "<image>\nCOCO Yes:"},
            {"role": "assistant", "content": f"a {colour} {shape}"}]})
    data = root / "data" / "train.json"
    data.write_text(json.dumps(records))
    out = {"tiny": tiny, "data": data, "root": root}
    for name, extra in (("lora", []), ("projector", ["train.freeze_projector=false"])):
        out[name] = train(load_config(None, [
            f"model.name_or_path={tiny}", f"data.train={data}", "train.max_steps=3", "train.batch_size=2",
            "train.grad_accum=1", "lora.r=4", "eval.num_samples=0", f"train.output_dir={root / name}",
            "train.learning_rate=0.01", "train.save_steps=100", *extra]))
    return out


@pytest.fixture(scope="session")
def merged(runs) -> dict[str, tuple[Path, dict]]:
    """Each run merged once (from the run folder, so its final/ is used), in fp32."""
    return {name: (runs["root"] / f"merged_{name}", merge(runs[name], runs["root"] / f"merged_{name}"))
            for name in ("lora", "projector")}


def probe_batch(processor, image_path: Path) -> dict:
    """Built here with the processor alone, independently of vlmtune's encoder."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "a blue square"}]}]
    text = processor.apply_chat_template(messages, tokenize=False)
    return dict(processor(text=[text], images=[Image.open(image_path).convert("RGB")], return_tensors="pt"))


@torch.inference_mode()
def logits(model, batch: dict) -> torch.Tensor:
    return model.eval()(**batch, use_cache=False).logits.float()


def plain(folder: Path):
    return AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)


@pytest.mark.parametrize("name", ["lora", "projector"])
def test_round_trip_with_plain_transformers(runs, merged, name):
    out, record = merged[name]
    final = runs[name] / "final"
    files = {p.name for p in out.iterdir()}
    assert "model.safetensors" in files and "generation_config.json" in files and "merge.json" in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle"))]
    assert not [f for f in files if f.startswith("adapter_")]  # a plain model, no peft files

    processor = AutoProcessor.from_pretrained(out)
    assert processor.chat_template and "<|im_start|>" in processor.chat_template
    batch = probe_batch(processor, runs["data"].parent / "images" / "1.png")
    got = logits(plain(out), batch)
    base = plain(runs["tiny"])
    untrained = logits(base, batch)
    reference = logits(PeftModel.from_pretrained(base, final), batch)
    assert (got - reference).abs().max().item() <= TOL
    assert (got - untrained).abs().max().item() > 0.05  # the adapter mattered, and it is in the weights

    assert record["checkpoint"] == str(final.resolve())
    assert record["max_abs_logit_diff"] <= record["tolerance"] == TOL
    assert record["n_tokens"] > 0 and record["verify_dtype"] == "fp32" and record["dtype"] == "fp32"
    assert "data.train" in record["batch"]
    assert record["adapter_effect"] > 0.05
    assert json.loads((out / "merge.json").read_text())["max_abs_logit_diff"] == record["max_abs_logit_diff"]
    config = load_config(out / "vlmtune.yaml")  # still a valid run config (the merge note is a comment)
    assert config.model.name_or_path == str(runs["tiny"])
    assert "merged by `vlmtune merge`" in (out / "vlmtune.yaml").read_text().splitlines()[0]


def test_modules_to_save_end_up_in_the_plain_weights(runs, merged):
    final = runs["projector"] / "final"
    saved = json.loads((final / "adapter_config.json").read_text())["modules_to_save"]
    assert saved and any("merger" in m for m in saved)
    # peft stores a modules_to_save module whole, under its own name
    adapter = {k.removeprefix("base_model.model."): v for k, v in
               load_file(final / "adapter_model.safetensors").items() if ".merger." in k}
    assert adapter
    weights = plain(merged["projector"][0]).state_dict()
    base = plain(runs["tiny"]).state_dict()
    for name, value in adapter.items():
        assert torch.equal(weights[name], value), name
    assert any(not torch.equal(base[name], value) for name, value in adapter.items())  # it was trained


def test_bf16_output_is_the_cast_of_the_verified_weights(runs, merged, tmp_path):
    record = merge(runs["lora"], tmp_path / "bf16", dtype="bf16")
    assert record["dtype"] == "bf16" and record["verify_dtype"] == "fp32" and record["max_abs_logit_diff"] <= TOL
    assert record["cast_logit_diff"] > 0  # measured and reported, not held to the fp32 tolerance
    fp32 = load_file(merged["lora"][0] / "model.safetensors")
    bf16 = load_file(tmp_path / "bf16" / "model.safetensors")
    assert bf16.keys() == fp32.keys()
    assert all(v.dtype == torch.bfloat16 and torch.equal(v, fp32[k].to(torch.bfloat16)) for k, v in bf16.items())
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    assert AutoModelForImageTextToText.from_pretrained(tmp_path / "bf16").dtype == torch.bfloat16


def copy_checkpoint(runs, tmp_path, name="lora") -> Path:
    folder = tmp_path / "ckpt"
    shutil.copytree(runs[name] / "final", folder)
    return folder


def test_synthetic_batch_when_the_data_is_gone(runs, tmp_path, capsys):
    ckpt = copy_checkpoint(runs, tmp_path)
    config = yaml.safe_load((ckpt / "vlmtune.yaml").read_text())
    config["data"]["train"] = str(tmp_path / "gone.json")
    (ckpt / "vlmtune.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "empty"
    out.mkdir()  # an existing empty folder is fine
    assert cli.main(["merge", str(ckpt), "--out", str(out)]) == 0
    record = json.loads((out / "merge.json").read_text())
    assert "synthetic" in record["batch"] and record["max_abs_logit_diff"] <= TOL and record["adapter_effect"] > 0.05
    printed = capsys.readouterr().out
    assert "max |logit difference|" in printed and f"merged model: {out}" in printed


def test_a_corrupted_merge_is_caught_and_leaves_nothing(runs, tmp_path, monkeypatch):
    real_save = merge_module.save_merged

    def save_then_corrupt(model, processor, folder):
        # what a buggy merge or a bad write would do: one merged LoRA weight is off on disk
        real_save(model, processor, folder)
        weights = load_file(folder / "model.safetensors")
        name = next(k for k in weights if k.endswith("layers.0.self_attn.q_proj.weight"))
        weights[name][0, 0] += 0.5
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})

    monkeypatch.setattr(merge_module, "save_merged", save_then_corrupt)
    out = tmp_path / "sub" / "merged"
    with pytest.raises(VlmtuneError, match=r"differ from base\+adapter by up to") as err:
        merge(runs["lora"], out)
    measured = float(re.search(r"by up to (\S+) \(tolerance", str(err.value)).group(1))
    assert measured > TOL
    assert not out.exists()
    assert list(out.parent.iterdir()) == []  # no temporary folder left beside it


def test_full_weights_folder_has_nothing_to_merge(runs, capsys):
    with pytest.raises(VlmtuneError, match=r"nothing to merge: .*tiny holds full weights \(model.safetensors\)"):
        merge(runs["tiny"], runs["root"] / "never")
    assert cli.main(["merge", str(runs["tiny"]), "--out", str(runs["root"] / "never")]) == 2
    assert "error: nothing to merge" in capsys.readouterr().err
    assert not (runs["root"] / "never").exists()


@pytest.mark.parametrize("missing", ["adapter_model.safetensors", "adapter_config.json", "vlmtune.yaml"])
def test_missing_files_are_named(runs, tmp_path, missing):
    ckpt = copy_checkpoint(runs, tmp_path)
    (ckpt / missing).unlink()
    with pytest.raises(VlmtuneError, match=rf"{re.escape(str(ckpt))}: missing {re.escape(missing)}"):
        merge(ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_run_folder_without_final_names_its_checkpoints(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs["lora"] / "final", run / "checkpoint-3")
    with pytest.raises(VlmtuneError, match=r"neither an adapter .* nor a final/ folder.*checkpoint-3"):
        merge(run, tmp_path / "out")


def test_existing_non_empty_out_is_never_overwritten(runs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(VlmtuneError, match=rf"{re.escape(str(out))}: exists and is not empty"):
        merge(runs["lora"], out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.long
@pytest.mark.parametrize("family", ["minicpmv4_6", "minicpmv4_7"])
def test_minicpm_v4_merges_through_plain_transformers(runs, tmp_path, family):
    """MiniCPM-V 4.6 / 4.7 are transformers' own classes: LoRA with a trained merger, merge, reload."""
    tiny = build_tiny_model(family, tmp_path / "tiny")
    run = train(load_config(None, [
        f"model.name_or_path={tiny}", f"data.train={runs['data']}", "train.max_steps=3", "train.batch_size=2",
        "train.grad_accum=1", "lora.r=4", "eval.num_samples=0", f"train.output_dir={tmp_path / 'run'}",
        "train.learning_rate=0.01", "train.save_steps=100", "train.freeze_projector=false"]))
    record = merge(run, tmp_path / "merged")
    assert record["max_abs_logit_diff"] <= TOL and record["adapter_effect"] > 0.05

    processor = AutoProcessor.from_pretrained(tmp_path / "merged")
    batch = probe_batch(processor, runs["data"].parent / "images" / "1.png")
    assert batch["pixel_values"].shape[0] == 1  # every patch packed in one row, as the model expects
    got = logits(plain(tmp_path / "merged"), batch)
    reference = logits(PeftModel.from_pretrained(plain(tiny), run / "final"), batch)
    assert (got - reference).abs().max().item() <= TOL
    assert (got - logits(plain(tiny), batch)).abs().max().item() > 0.05


@pytest.mark.parametrize("family", ["minicpmv2", "minicpmv2_6", "minicpmo2_6"])
def test_native_minicpm_merge_keeps_the_official_layout(runs, tmp_path, family):
    """The seeds' MiniCPM setup (LoRA on the LLM attention, vision tower and resampler trained fully,
    tune_vision) merged: same weight names and config keys as the base folder, its remote-code files
    carried over (never run), and the merged model reproduces base + adapter."""
    from vlmtune.models import family_for as family_of
    from vlmtune.models.load import load_model, load_processor

    tiny = build_tiny_model(family, tmp_path / "tiny")
    (tiny / "modeling_minicpmv.py").write_text("raise RuntimeError('remote code must not run')\n")
    run = train(load_config(None, [
        f"model.name_or_path={tiny}", f"data.train={runs['data']}", "train.max_steps=3", "train.batch_size=2",
        "train.grad_accum=1", "lora.r=4", "eval.num_samples=0", f"train.output_dir={tmp_path / 'run'}",
        "train.learning_rate=0.01", "train.save_steps=100", "train.freeze_projector=false",
        "train.freeze_vision=false", "data.max_slice_nums=2"]))  # the tiny checkpoints say 4
    out = tmp_path / "merged"
    record = merge(run, out)
    assert record["max_abs_logit_diff"] <= TOL and record["adapter_effect"] > 0.05
    assert record["remote_code_copied"] == ["modeling_minicpmv.py"]

    assert load_file(out / "model.safetensors").keys() == load_file(tiny / "model.safetensors").keys()
    assert json.loads((out / "config.json").read_text()).keys() == json.loads((tiny / "config.json").read_text()).keys()
    assert family_of(out).name == family
    processor = load_processor(out, family_of(out))  # config.json and preprocessor_config.json must agree
    assert processor.image_processor.max_slice_nums == 2
    batch = probe_batch(processor, runs["data"].parent / "images" / "1.png")
    got = logits(load_model(out, torch.float32), batch)
    reference = logits(PeftModel.from_pretrained(load_model(tiny, torch.float32), run / "final"), batch)
    assert (got - reference).abs().max().item() <= TOL
    assert (got - logits(load_model(tiny, torch.float32), batch)).abs().max().item() > 0.05
