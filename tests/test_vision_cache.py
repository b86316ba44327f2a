"""`train.cache_vision_features`: with the cache, loss and gradients of the trainable parameters
equal the uncached model's on the same batches (Qwen2-VL, Qwen2.5-VL, and Qwen3-VL with its
DeepStack features); over 2 epochs the vision tower sees each distinct image once; evaluation and
generation still work and checkpoints hold the same parameter names; configurations where cached
features would be wrong are refused; the memory bound and the disk copy work."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, TrainerCallback

from conftest import base_overrides, caption_records, read_jsonl, write_json
from vlmtune.config import load_config
from vlmtune.data.collate import Collator, EncodedDataset, hash_images
from vlmtune.data.encode import Encoder
from vlmtune.data.formats import load_samples
from vlmtune.errors import ConfigError
from vlmtune.fileio import parse_tensors
from vlmtune.models import family_for, generic
from vlmtune.models.load import load_processor
from vlmtune.train import train
from vlmtune.tuning import prepare_model
from vlmtune.vision_cache import VisionFeatureCache, check_config, check_model


@pytest.fixture(scope="module")
def five_samples(tmp_path_factory):
    """Five one-image samples whose pictures all differ."""
    folder = tmp_path_factory.mktemp("vc_data")
    return load_samples(write_json(folder / "train.json", caption_records(5, folder)))


@pytest.fixture(scope="module")
def distinct_split(tmp_path_factory) -> dict[str, str]:
    """4 training and 2 validation samples, all six pictures different (conftest's caption_data
    repeats two training pictures in its validation file, which the cache would rightly reuse)."""
    folder = tmp_path_factory.mktemp("vc_split")
    records = caption_records(6, folder)
    return {"train": write_json(folder / "train.json", records[:4]),
            "val": write_json(folder / "val.json", records[4:])}


def lora_model(path, family, *overrides):
    config = load_config(None, ["lora.r=4", "lora.alpha=8", "lora.dropout=0.0", *overrides])
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    model = prepare_model(model, family, config.train, config.lora)
    model.train()
    return model, config


def loss_and_grads(model, inputs: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = model(**inputs).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


class CountImages(torch.nn.Module):
    """Counts the images the vision tower encodes, through a forward pre-hook on it."""

    def __init__(self, visual: torch.nn.Module):
        super().__init__()
        self.calls: list[tuple[bool, int]] = []  # (training mode, images)
        visual.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        self.calls.append((module.training, len(kwargs["grid_thw"])))

    def images(self, training: bool) -> int:
        return sum(n for mode, n in self.calls if mode == training)


@pytest.mark.parametrize("family_name", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_cached_features_give_the_same_loss_and_gradients(tiny_model_dir, five_samples, tmp_path, family_name):
    path = tiny_model_dir(family_name)
    family = family_for(path)
    processor = load_processor(path, family)
    dataset = EncodedDataset(five_samples, Encoder(processor, family), image_keys=True)
    collate = Collator(processor.tokenizer.pad_token_id, concat_dims=family.concat_dims)
    model, config = lora_model(path, family)
    counter = CountImages(model.base_model.model.model.visual)
    cache = VisionFeatureCache.for_model(model, family, config.train, tmp_path)

    # batch 1: both images computed; batch 2: one reused, one new; batch 1 again: both reused
    for step, indices in enumerate([[0, 1], [1, 2], [0, 1]]):
        batch = collate([dataset[i] for i in indices])
        plain = {k: v for k, v in batch.items() if k != "image_keys"}
        expected_loss, expected_grads = loss_and_grads(model, plain)
        before = counter.images(True)
        swapped = cache.swap_pixels(model, batch)
        assert "pixel_values" not in swapped and "image_keys" not in swapped
        loss, grads = loss_and_grads(model, swapped)
        assert counter.images(True) - before == [2, 1, 0][step]  # only images the cache lacked ran
        torch.testing.assert_close(loss, expected_loss, rtol=1e-6, atol=1e-7)
        assert set(grads) == set(expected_grads)
        for name in grads:
            torch.testing.assert_close(grads[name], expected_grads[name], rtol=1e-5, atol=1e-7, msg=name)
        assert any(g.abs().sum() > 0 for g in grads.values())
    assert (cache.computed, cache.hits) == (3, 3)
    assert len(cache.memory) == 3
    if family_name == "qwen3_vl":  # DeepStack features are cached beside the image features
        assert all(len(entry) == 1 + len(model.config.vision_config.deepstack_visual_indexes)
                   for entry in cache.memory.values())


def test_image_keys_follow_the_pixels_and_the_grid(qwen2_vl_parts, five_samples):
    processor, family = qwen2_vl_parts
    encoder = Encoder(processor, family)
    a, b = encoder.encode(five_samples[0]), encoder.encode(five_samples[1])
    key_a = hash_images(a["pixel_values"], a["image_grid_thw"])
    assert torch.equal(key_a, hash_images(a["pixel_values"].clone(), a["image_grid_thw"]))
    assert not torch.equal(key_a, hash_images(b["pixel_values"], b["image_grid_thw"]))
    nudged = a["pixel_values"].clone()
    nudged[-1, -1] += 1e-3
    assert not torch.equal(key_a, hash_images(nudged, a["image_grid_thw"]))
    both = hash_images(torch.cat([a["pixel_values"], b["pixel_values"]]),
                       torch.cat([a["image_grid_thw"], b["image_grid_thw"]]))
    assert torch.equal(both, torch.cat([key_a, hash_images(b["pixel_values"], b["image_grid_thw"])]))


class HookVision(TrainerCallback):
    def __init__(self):
        self.counter = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.counter = CountImages(model.base_model.model.model.visual)


def test_two_epochs_run_the_vision_tower_once_per_image_and_match_the_uncached_run(tiny_qwen2_vl, distinct_split,
                                                                                    tmp_path):
    runs = {}
    for cached in (False, True):
        hook = HookVision()
        overrides = base_overrides(
            tiny_qwen2_vl, distinct_split["train"], tmp_path / f"run_{cached}", f"data.val={distinct_split['val']}",
            "train.max_steps=-1", "train.epochs=2", "train.learning_rate=0.01", "eval.num_samples=2",
            "eval.max_new_tokens=3", f"train.cache_vision_features={str(cached).lower()}")
        out = train(load_config(None, overrides), callbacks=[hook])
        runs[cached] = (hook.counter, read_jsonl(out / "metrics.jsonl"), out)

    (plain_count, plain_log, plain_out), (count, log, out) = runs[False], runs[True]
    # 4 training images, 2 epochs: 8 encodings without the cache, 4 with it.
    assert plain_count.images(True) == 8
    assert count.images(True) == 4
    # Eval mode: validation loss at each epoch's end (2 images) and generation (2 images) each time;
    # the cache spares the second validation loss only, generation runs the model as it is.
    assert plain_count.images(False) == 8
    assert count.images(False) == 6

    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    assert losses == pytest.approx([r["loss"] for r in plain_log if "loss" in r], rel=1e-5)
    evals = [r for r in log if "eval_loss" in r]
    assert len(evals) == 2
    assert sum("val_exact_match" in r for r in log) == 2  # generation ran at both evaluations
    assert [r["eval_loss"] for r in evals] == pytest.approx(
        [r["eval_loss"] for r in plain_log if "eval_loss" in r], rel=1e-5)
    # The checkpoint holds the same parameter names, and the same trained values.
    saved, plain_saved = (load_file(o / "final" / "adapter_model.safetensors") for o in (out, plain_out))
    assert set(saved) == set(plain_saved)
    for name in saved:
        torch.testing.assert_close(saved[name], plain_saved[name], rtol=1e-4, atol=1e-6)
    assert not (out / "vision_features").exists()  # memory only unless asked


@pytest.mark.parametrize("flag", ["train.freeze_vision=false", "train.freeze_projector=false"])
def test_refused_when_the_vision_tower_or_projector_trains(tiny_qwen2_vl, caption_data, tmp_path, flag):
    config = load_config(None, base_overrides(tiny_qwen2_vl, caption_data["train"], tmp_path / "run", flag,
                                              "train.cache_vision_features=true"))
    name = flag.split("=")[0]
    with pytest.raises(ConfigError, match=rf"needs a frozen vision tower and projector .* {name} is false"):
        train(config)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_refused_for_trainable_modules_dropout_and_other_families(tiny_qwen2_vl):
    family = family_for(tiny_qwen2_vl)
    model, _ = lora_model(tiny_qwen2_vl, family, "lora.modules_to_save=[model.visual.merger]")
    with pytest.raises(ConfigError, match=r"parameter\(s\) of the vision tower or projector would train .*merger"):
        check_model(model, family)

    model, _ = lora_model(tiny_qwen2_vl, family)
    check_model(model, family)  # the default LoRA leaves them frozen
    model.base_model.model.model.visual.blocks[1].attn.attention_dropout = 0.1
    with pytest.raises(ConfigError, match=r"visual\.blocks\.1\.attn applies dropout \(p=0.1\)"):
        check_model(model, family)

    config = load_config(None, ["train.cache_vision_features=true"])
    with pytest.raises(ConfigError, match="works for qwen2_vl, qwen2_5_vl, qwen3_vl; this model is generic"):
        check_config(config, generic.FAMILY)


def test_memory_bound_and_disk_copy(tiny_qwen2_vl, five_samples, tmp_path):
    family = family_for(tiny_qwen2_vl)
    processor = load_processor(tiny_qwen2_vl, family)
    dataset = EncodedDataset(five_samples, Encoder(processor, family), image_keys=True)
    collate = Collator(processor.tokenizer.pad_token_id)
    model, config = lora_model(tiny_qwen2_vl, family, "train.vision_cache_on_disk=true")
    cache = VisionFeatureCache.for_model(model, family, config.train, tmp_path / "run")
    cache.swap_pixels(model, collate([dataset[0]]))
    one_image = cache.bytes
    assert one_image > 0 and cache.computed == 1
    cache.max_bytes = 2 * one_image  # room for two images

    cache.swap_pixels(model, collate([dataset[1], dataset[2]]))
    assert len(cache.memory) == 2 and cache.bytes == 2 * one_image and cache.evicted == 1
    files = sorted((tmp_path / "run" / "vision_features").glob("*/*.safetensors"))
    assert len(files) == 3  # every computed image is on disk
    assert str(tmp_path / "run" / "vision_features") in cache.summary()

    # image 0 left memory; it comes back from disk, not from the vision tower
    expected = loss_and_grads(model, {k: v for k, v in collate([dataset[0]]).items() if k != "image_keys"})[0]
    loss = loss_and_grads(model, cache.swap_pixels(model, collate([dataset[0]])))[0]
    assert cache.computed == 3
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)

    # a damaged disk entry is reported and computed again
    key = hash_images(dataset[3]["pixel_values"], dataset[3]["image_grid_thw"])[0].numpy().tobytes().hex()
    cache.swap_pixels(model, collate([dataset[3]]))
    entry = next(f for f in files[0].parent.glob(f"{key}.safetensors"))
    entry.write_bytes(entry.read_bytes()[:100])
    cache.memory.clear()
    cache.bytes = 0
    with pytest.warns(UserWarning, match="damaged vision-feature cache entry"):
        cache.swap_pixels(model, collate([dataset[3]]))
    assert cache.computed == 5
    assert parse_tensors(entry.read_bytes(), key)["features"].shape[0] == 16  # rewritten whole: 16 image tokens


def test_a_different_model_does_not_read_another_models_disk_features(tiny_qwen2_vl, tmp_path):
    family = family_for(tiny_qwen2_vl)
    model, config = lora_model(tiny_qwen2_vl, family, "train.vision_cache_on_disk=true")
    first = VisionFeatureCache.for_model(model, family, config.train, tmp_path).folder
    with torch.no_grad():
        model.base_model.model.model.visual.merger.mlp[0].weight.add_(1e-3)
    second = VisionFeatureCache.for_model(model, family, config.train, tmp_path).folder
    assert first != second and first.parent == second.parent == Path(tmp_path) / "vision_features"


def test_refused_when_the_forward_does_not_take_encoder_outputs(tiny_qwen2_vl, five_samples, tmp_path):
    """A kernel library that swaps in a forward without `mm_encoder_outputs` is caught at the first batch."""
    family = family_for(tiny_qwen2_vl)
    processor = load_processor(tiny_qwen2_vl, family)
    batch = Collator(processor.tokenizer.pad_token_id)([EncodedDataset(five_samples, Encoder(processor, family))[0]])
    model, config = lora_model(tiny_qwen2_vl, family)
    base = model.get_base_model()

    def older_forward(input_ids=None, attention_mask=None, pixel_values=None, image_grid_thw=None, labels=None,
                      **kwargs):
        raise AssertionError("not reached")

    base.forward = older_forward  # on this instance only, as an instance-level kernel patch would
    with pytest.raises(ConfigError, match=r"forward \(.*older_forward.*\) does not take mm_encoder_outputs"):
        VisionFeatureCache.for_model(model, family, config.train, tmp_path).swap_pixels(model, batch)
