"""Model families on tiny random-weight checkpoints of each: detection from config.json (never
the folder name), the part map covering every parameter, forward/generate/LoRA training, hub ids
without network, and remote code refused unless trusted."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, base_overrides, clean_env, draw, read_jsonl
from vlmtune.config import load_config
from vlmtune.data.collate import Collator, EncodedDataset
from vlmtune.data.encode import IGNORE_INDEX, Encoder
from vlmtune.data.sample import IMAGE, Sample, Turn
from vlmtune.errors import VlmtuneError
from vlmtune.models import FAMILIES, family_for
from vlmtune.models.load import load_model, load_model_and_processor, load_processor, resolve_model_path
from vlmtune.models.tiny import TINY_FAMILIES
from vlmtune.train import train
from vlmtune.tuning import PARTS

FAMILY_NAMES = list(TINY_FAMILIES)


def test_every_family_has_a_tiny_model():
    assert set(FAMILY_NAMES) == set(FAMILIES)


def test_family_comes_from_config_json_not_the_folder_name(tiny_model_dir, tmp_path):
    misleading = tmp_path / "Qwen2-VL-2B-Instruct-qwen2_vl"
    shutil.copytree(tiny_model_dir("qwen2_5_vl"), misleading)
    assert family_for(misleading).name == "qwen2_5_vl"
    # and it loads and runs as what its config says
    model, processor, family, path = load_model_and_processor(str(misleading), dtype="fp32")
    assert family.name == "qwen2_5_vl" and type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"

    other = tmp_path / "qwen2_vl"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llava"}))
    assert family_for(other).name == "generic"
    empty = tmp_path / "qwen3_vl_empty"
    empty.mkdir()
    with pytest.raises(VlmtuneError, match="config.json: not found"):
        family_for(empty)
    (empty / "config.json").write_text(json.dumps({"architectures": ["X"]}))
    with pytest.raises(VlmtuneError, match="cannot read model_type"):
        family_for(empty)


@pytest.fixture(scope="module")
def two_samples(tmp_path_factory) -> list[Sample]:
    folder = tmp_path_factory.mktemp("family_samples")
    return [
        Sample(images=[draw(folder / "a.png")], turns=[Turn("user", IMAGE + "What is in the image?"),
                                                       Turn("assistant", "a red circle")]),
        Sample(images=[draw(folder / "b.png", "blue", "square", (56, 112))],
               turns=[Turn("system", "Be brief."), Turn("user", "Look: " + IMAGE), Turn("assistant", "a blue square"),
                      Turn("user", "Sure?"), Turn("assistant", "yes")]),
    ]


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_family_parts_cover_every_parameter(tiny_model_dir, name):
    path = tiny_model_dir(name)
    family = family_for(path)
    assert family.name == name
    model = load_model(path, torch.float32)
    parts = {}
    for n, p in model.named_parameters():
        parts.setdefault(family.part_of(n), []).append(n)
    assert set(parts) == set(PARTS), f"parameters outside the known parts: {parts.get('other', [])[:5]}"
    projector = {"minicpmv4_6": ("model.merger.",), "minicpmv4_7": ("model.merger.",)}.get(
        name, ("resampler.",) if family.own_implementation else ("model.visual.merger", "model.visual.deepstack"))
    assert all(n.startswith(projector) for n in parts["projector"])
    # MiniCPM-V 4.x's window merger sits between vision blocks: part of the tower, not the projector
    assert not any("merger" in n.replace("vit_merger", "") for n in parts["vision"])


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_forward_generate_and_exact_labels(tiny_model_dir, two_samples, name):
    path = tiny_model_dir(name)
    family = family_for(path)
    if name == "minicpmv2":  # MiniCPM-V 2.0's chat format has no system turn (see test_minicpm_processor.py)
        two_samples = [replace(s, turns=[t for t in s.turns if t.role != "system"]) for s in two_samples]
    processor = load_processor(path, family)
    encoder = Encoder(processor, family)
    tok = processor.tokenizer
    items = [encoder.encode(s) for s in two_samples]
    # Labels: each answer and its <|im_end|>, nothing else, whatever the family.
    im_end = tok.convert_tokens_to_ids(family.end_of_turn)
    for sample, item in zip(two_samples, items):
        answers = [t.text for t in sample.turns if t.role == "assistant"]
        trained = item["labels"][item["labels"] != IGNORE_INDEX].tolist()
        assert trained == sum((tok(a, add_special_tokens=False)["input_ids"] + [im_end] for a in answers), [])
        assert encoder.count_tokens(sample) == len(item["input_ids"])

    model = load_model(path, torch.float32).eval()
    batch = Collator(tok.pad_token_id, concat_dims=family.concat_dims)(items)
    with torch.no_grad():
        out = model(**batch)
    assert torch.isfinite(out.loss) and out.loss > 0
    assert out.logits.shape[:2] == batch["input_ids"].shape

    prompts = Collator(tok.pad_token_id, padding_side="left", concat_dims=family.concat_dims)(
        [EncodedDataset(two_samples, encoder, prompt_only=True)[i] for i in range(2)])
    with torch.no_grad():
        generated = model.generate(**prompts, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    width = prompts["input_ids"].shape[1]
    assert generated.shape[0] == 2 and width < generated.shape[1] <= width + 3
    assert torch.equal(generated[:, :width], prompts["input_ids"])


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_lora_training_steps(tiny_model_dir, caption_data, tmp_path, name):
    out = train(load_config(None, base_overrides(tiny_model_dir(name), caption_data["train"], tmp_path / "run",
                                                 "train.learning_rate=0.01")))
    losses = [r["loss"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    adapter = load_file(out / "final" / "adapter_model.safetensors")
    b = [v for k, v in adapter.items() if k.endswith("lora_B.weight")]
    assert b and all(v.abs().sum() > 0 for v in b)  # zero at init: trained
    assert all("language_model" in k or ".llm." in k for k in adapter)  # default targets: the language model only


# --- hub ids and remote code ------------------------------------------------------------------


def test_hub_id_without_network_is_a_clear_error(tmp_path):
    code = ("from vlmtune.models.load import resolve_model_path\n"
            "from vlmtune.errors import VlmtuneError\n"
            "try:\n    resolve_model_path('vlmtune-test/no-such-model')\n"
            "except VlmtuneError as e:\n    print('VLMTUNE_ERROR', e)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=90,
                            env=clean_env(HF_HOME=str(tmp_path / "hf"), HF_HUB_DISABLE_TELEMETRY="1"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "VLMTUNE_ERROR could not fetch model 'vlmtune-test/no-such-model' from hf" in result.stdout
    assert "pass the local folder as model.name_or_path" in result.stdout


def test_paths_that_are_not_folders_or_hub_ids(tmp_path):
    for bad in (str(tmp_path / "missing"), "./missing-model", "a/b/c", "no-slash"):
        with pytest.raises(VlmtuneError, match="no such folder, and it is not a hub id"):
            resolve_model_path(bad)
    assert resolve_model_path(str(tmp_path)) == tmp_path


def test_modelscope_hub_needs_its_package():
    try:
        import modelscope  # noqa: F401
    except ImportError:
        with pytest.raises(VlmtuneError, match="needs the modelscope package"):
            resolve_model_path("qwen/Qwen2-VL-2B-Instruct", hub="modelscope")
    else:
        pytest.skip("modelscope is installed: the call would go to the network")


@pytest.fixture
def remote_code_model(tiny_qwen2_vl, tmp_path):
    """A model folder like the many remote-code VLMs on the hub: a model_type transformers does not
    know (and vlmtune does not implement), an auto_map naming Python files in the folder, and a
    processor that is remote code too. The Python files leave a marker if anything imports them."""
    folder = tmp_path / "Acme-VL-2B"
    shutil.copytree(tiny_qwen2_vl, folder)
    marker = tmp_path / "remote_code_ran"
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="acme_vl", auto_map={"AutoConfig": "configuration_acme.AcmeVLConfig",
                                                  "AutoModel": "modeling_acme.AcmeVL"})
    (folder / "config.json").write_text(json.dumps(config))
    processor = json.loads((folder / "processor_config.json").read_text())
    processor.update(processor_class="AcmeVLProcessor",
                     auto_map={"AutoProcessor": "processing_acme.AcmeVLProcessor"})
    (folder / "processor_config.json").write_text(json.dumps(processor))
    for name in ("configuration_acme.py", "modeling_acme.py", "processing_acme.py"):
        (folder / name).write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    return folder, marker


def test_remote_code_is_refused_unless_trusted(remote_code_model, caption_data, tmp_path):
    folder, marker = remote_code_model
    assert family_for(folder).name == "generic"
    with pytest.raises(VlmtuneError, match="model.trust_remote_code=true"):
        train(load_config(None, base_overrides(folder, caption_data["train"], tmp_path / "run")))
    with pytest.raises(VlmtuneError, match="not built into transformers"):
        load_model(folder, torch.float32)
    with pytest.raises(VlmtuneError, match="model.trust_remote_code=true"):
        load_processor(folder, family_for(folder))
    assert not marker.exists()


@pytest.mark.parametrize("name", [n for n in TINY_FAMILIES if FAMILIES[n].pixel_budget])
def test_the_pixel_budget_is_the_image_processors_size_and_every_call_is_warning_free(tiny_model_dir, tmp_path, name):
    import warnings

    from PIL import Image

    model = tiny_model_dir(name)
    family = family_for(model)
    processor = load_processor(model, family, min_pixels=40 * 40, max_pixels=64 * 64)
    size = processor.image_processor.size
    assert (size["shortest_edge"], size["longest_edge"]) == (40 * 40, 64 * 64)
    encoder = Encoder(processor, family)
    sample = Sample(turns=[Turn("user", f"{IMAGE}\nwhat is this?"), Turn("assistant", "a square")],
                    images=[draw(tmp_path / "big.png", "blue", "square", (400, 300))])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # transformers' deprecated call-time min_pixels/max_pixels route warns
        encoded = encoder.encode(sample)
    patch = processor.image_processor.patch_size
    t, h, w = encoded["image_grid_thw"][0].tolist()
    assert h * w * patch * patch <= 64 * 64  # the 400x300 image was shrunk to the budget
    processor.save_pretrained(tmp_path / "saved")  # what a checkpoint keeps
    reloaded = load_processor(tmp_path / "saved", family)
    assert (reloaded.image_processor.size["shortest_edge"], reloaded.image_processor.size["longest_edge"]) == (1600, 4096)
