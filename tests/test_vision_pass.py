"""The zero-contribution vision pass (vlmtune/distributed.py) in one process, and train.fsdp's checks.

For each family whose `dummy_vision_pass` is "hook" (Qwen2-VL, Qwen2.5-VL, Qwen3-VL and MiniCPM-V 4.6
through transformers' classes; the generic path on a tiny LLaVA), with the vision tower and projector trained fully beside LoRA:
- a batch with images: loss and every gradient are bit-identical with and without the pass (it
  does not run);
- a text-only batch: the loss is bit-identical, the gradients of everything else too, and every
  trainable vision and projector parameter gets a gradient of zero, where without the pass it gets
  none (the missing gradient that stops DDP).
The two-process runs that this makes possible are in tests/test_distributed_mixed.py.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import caption_records, write_json
from vlmtune.config import load_config
from vlmtune.data.collate import Collator
from vlmtune.data.encode import Encoder
from vlmtune.data.formats import load_samples
from vlmtune.distributed import DISABLE_ENV, VisionPass, fsdp_settings, install_vision_pass
from vlmtune.errors import ConfigError
from vlmtune.models import FAMILIES, family_for
from vlmtune.models.load import load_model, load_processor
from vlmtune.tuning import prepare_model

HOOK_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "minicpmv4_6")
TEXT_ONLY = {"conversations": [{"role": "user", "content": "Name a shape with three sides."},
                               {"role": "assistant", "content": "a triangle"}]}


@pytest.fixture(scope="module")
def batches(tmp_path_factory):
    """(records file) two one-image samples and one text-only sample."""
    folder = tmp_path_factory.mktemp("vision_pass")
    return write_json(folder / "data.json", caption_records(2, folder, "p") + [TEXT_ONLY])


def build(model_dir, vision_trains: bool = True):
    family = family_for(model_dir)
    processor = load_processor(model_dir, family)
    config = load_config(None, [f"train.freeze_vision={not vision_trains}",
                                f"train.freeze_projector={not vision_trains}", "lora.r=4", "lora.dropout=0.0"])
    torch.manual_seed(0)
    model = prepare_model(load_model(model_dir, torch.float32, None, False, None), family, config.train, config.lora)
    model.train()
    return model, family, processor


def encode(data, processor, family, which):
    encoder = Encoder(processor, family)
    samples = load_samples(data)
    collator = Collator(processor.tokenizer.pad_token_id, concat_dims=family.concat_dims)
    return collator([encoder.encode(samples[i]) for i in which])


def step(model, batch):
    """(loss, {name: grad or None}) of one forward and backward."""
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: (None if p.grad is None else p.grad.clone())
                           for n, p in model.named_parameters() if p.requires_grad}


def vision_names(model, family):
    return [n for n, p in model.named_parameters()
            if p.requires_grad and family.part_of(n) in ("vision", "projector")]


@pytest.mark.parametrize("name", HOOK_FAMILIES)
def test_pass_changes_no_loss_or_gradient_and_gives_vision_zero_gradients(name, tiny_model_dir, batches):
    model, family, processor = build(tiny_model_dir(name))
    assert family.dummy_vision_pass == "hook"
    vision = vision_names(model, family)
    assert vision
    with_images = encode(batches, processor, family, [0, 1, 2])  # two images and the text-only sample
    text_only = encode(batches, processor, family, [2])
    assert "pixel_values" not in text_only

    plain = {"images": step(model, with_images), "text": step(model, text_only)}
    vision_pass = install_vision_pass(model, family, processor)
    assert vision_pass is not None and vision_pass.problem is None, vision_pass and vision_pass.problem
    hooked = {"images": step(model, with_images), "text": step(model, text_only)}
    assert vision_pass.runs == 1  # on the text-only batch only

    for kind in ("images", "text"):
        (loss0, grads0), (loss1, grads1) = plain[kind], hooked[kind]
        assert torch.equal(loss0, loss1), kind
        for n, g in grads0.items():
            if kind == "text" and n in vision:
                continue
            assert (g is None and grads1[n] is None) or torch.equal(g, grads1[n]), (kind, n)
    # the text-only batch: no vision gradient without the pass, a zero one with it
    assert all(plain["text"][1][n] is None for n in vision)
    assert all(hooked["text"][1][n] is not None and not hooked["text"][1][n].any() for n in vision)
    # with images, every vision parameter has a gradient anyway (the tower really ran)
    assert all(hooked["images"][1][n] is not None for n in vision)
    assert sum(bool(hooked["images"][1][n].any()) for n in vision) > len(vision) // 2

    vision_pass.remove()
    model.eval()  # generation and evaluation: never
    vision_pass = install_vision_pass(model, family, processor)
    with torch.no_grad():
        model(**text_only)
    assert vision_pass.runs == 0


def test_generic_path_on_a_tiny_llava():
    # The generic family (any AutoModelForImageTextToText): a LLaVA with a CLIP tower and its real image
    # processor. With the pass, a text-only batch gives a gradient to every vision parameter an image
    # batch gives one to.
    from types import SimpleNamespace

    from PIL import Image
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration,
                              Qwen2Config)

    from vlmtune.models.generic import FAMILY

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=28, patch_size=14, projection_dim=32)
    text = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, layer_types=["full_attention"] * 2)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, image_token_id=63))
    config = load_config(None, ["train.freeze_vision=false", "train.freeze_projector=false", "lora.r=4",
                                "lora.dropout=0.0", "lora.targets=[q_proj,v_proj]"])
    model = prepare_model(model, FAMILY, config.train, config.lora)
    model.train()
    image_processor = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    pixels = image_processor(images=[Image.new("RGB", (28, 28), "red")], return_tensors="pt")["pixel_values"]
    text_only = {"input_ids": torch.tensor([[1, 2, 3, 4, 5, 6]])}
    with_image = {"input_ids": torch.tensor([[1, 63, 63, 63, 63, 5, 6]]), "pixel_values": pixels}
    for batch in (text_only, with_image):
        batch["labels"] = batch["input_ids"]
    vision = vision_names(model, FAMILY)

    plain_loss, plain = step(model, text_only)
    vision_pass = VisionPass(model, FAMILY, SimpleNamespace(image_processor=image_processor))
    assert vision_pass.problem is None and set(vision_pass.inputs) == {"pixel_values"}
    loss, hooked = step(model, text_only)
    _, imaged = step(model, with_image)
    assert vision_pass.runs == 1 and torch.equal(loss, plain_loss)
    assert all(plain[n] is None for n in vision)
    # every vision parameter an image batch reaches gets a (zero) gradient from the pass; the pass may reach
    # more (it sums every output of get_image_features, the last layer's too, which LLaVA does not read)
    reached = {n for n in vision if imaged[n] is not None}
    assert reached and reached <= {n for n in vision if hooked[n] is not None}
    assert all(not hooked[n].any() for n in vision if hooked[n] is not None)


def test_frozen_vision_on_one_process_needs_no_pass(tiny_qwen2_vl, batches):
    model, family, processor = build(tiny_qwen2_vl, vision_trains=False)
    vision_pass = install_vision_pass(model, family, processor)
    assert not vision_pass.vision_trains
    step(model, encode(batches, processor, family, [2]))
    assert vision_pass.runs == 0  # several processes would run it: ZeRO-3 and FSDP gather frozen weights too


def test_who_installs_it(tiny_qwen2_vl, monkeypatch):
    model, family, processor = build(tiny_qwen2_vl)
    monkeypatch.setenv(DISABLE_ENV, "1")  # the negative control's switch
    assert install_vision_pass(model, family, processor) is None
    monkeypatch.delenv(DISABLE_ENV)
    assert isinstance(install_vision_pass(model, family, processor), VisionPass)
    # MiniCPM-V 2.x's own model code runs its pass itself (vlmtune/models/minicpmv/modeling.py)
    assert {f.dummy_vision_pass for k, f in FAMILIES.items() if f.own_implementation} == {"model"}
    assert install_vision_pass(model, FAMILIES["minicpmv2_6"], processor) is None
    # every family has one way or the other
    assert all(f.dummy_vision_pass in ("model", "hook") for f in FAMILIES.values())


def test_a_model_it_cannot_run_is_said_not_hidden(tiny_qwen2_vl, batches):
    # A processor without an image processor gives no blank image: the pass records why, and one process
    # trains on without it (under several processes a text-only batch then stops the run with that reason)
    model, family, processor = build(tiny_qwen2_vl)
    vision_pass = VisionPass(model, family, processor.tokenizer)
    assert vision_pass.problem and "image processor" in vision_pass.problem
    loss, grads = step(model, encode(batches, processor, family, [2]))
    assert torch.isfinite(loss) and vision_pass.runs == 0


# --- train.fsdp ------------------------------------------------------------------------------

@pytest.mark.parametrize("name,reshard,offload", [("full_shard", True, False), ("shard_grad_op", False, False),
                                                  ("full_shard_offload", True, True)])
def test_shipped_fsdp_configs_reach_accelerate(name, reshard, offload, tmp_path):
    from transformers import TrainingArguments

    from conftest import ROOT

    config = load_config(None, [f"train.fsdp={ROOT / 'configs' / 'fsdp' / (name + '.json')}"])
    settings = fsdp_settings(config.train, cuda=True)
    args = TrainingArguments(output_dir=str(tmp_path), fsdp=True, fsdp_config=settings, report_to="none")
    plugin = args.fsdp_plugin_args
    assert plugin["fsdp_version"] == 2 and plugin["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert plugin["reshard_after_forward"] is reshard and plugin.get("cpu_offload", False) is offload
    assert plugin["state_dict_type"] == "FULL_STATE_DICT"  # final/ and checkpoints hold whole tensors
    assert fsdp_settings(load_config(None, []).train) is None  # no train.fsdp: no FSDP


def test_bad_fsdp_settings_are_refused_with_what_to_do(tmp_path):
    from conftest import ROOT

    shipped = str(ROOT / "configs" / "fsdp" / "full_shard.json")

    def error(cuda=True, **train) -> str:
        config = load_config(None, [f"train.{k}={v}" for k, v in train.items()])
        with pytest.raises(ConfigError) as e:
            fsdp_settings(config.train, cuda=cuda)
        return str(e.value)

    assert "FSDP needs GPUs" in error(cuda=False, fsdp=shipped) and "Remove train.fsdp" in error(cuda=False, fsdp=shipped)
    assert "choose one engine" in error(fsdp=shipped, deepspeed="configs/deepspeed/zero3.json")
    assert "QLoRA" in error(fsdp=shipped, method="qlora")
    assert "no such file" in error(fsdp=str(tmp_path / "missing.json"))
    (tmp_path / "list.json").write_text(json.dumps(["full_shard"]))
    assert "expected a JSON object" in error(fsdp=str(tmp_path / "list.json"))
    (tmp_path / "broken.json").write_text("{")
    assert "not valid JSON" in error(fsdp=str(tmp_path / "broken.json"))
    (tmp_path / "v3.json").write_text(json.dumps({"version": 3}))
    assert "versions are 1 and 2" in error(fsdp=str(tmp_path / "v3.json"))
