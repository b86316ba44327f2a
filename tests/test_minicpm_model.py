"""MiniCPM-V 2.0 / 2.6 and MiniCPM-o 2.6 modeling: names, loading, forward, generation, training.

Tiny models are built in-process from `tiny_minicpm_config`; inputs are made by hand following the
model-input contract (see vlmtune/models/minicpmv/modeling.py). The full-size parameter names and
shapes are compared with tests/data/minicpm/*_params.json, recorded once from the official remote code
(scripts/record_minicpm_params.py).
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vlmtune.errors import VlmtuneError
from vlmtune.models.minicpmv import detect_arch
from vlmtune.models.minicpmv.modeling import MiniCPMVForConditionalGeneration, config_class_for
from vlmtune.models.minicpmv.tiny import build_tiny_minicpm_model, tiny_minicpm_config

DATA = Path(__file__).parent / "data" / "minicpm"
ARCHS = ["minicpmv2", "minicpmv2_6", "minicpmo2_6"]
PUBLISHED = json.loads((DATA / "published_configs.json").read_text())["configs"]
LORA_REGEX = r"llm\..*layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)"
VOCAB = 64
P = 14


def tiny(arch: str, seed: int = 0) -> MiniCPMVForConditionalGeneration:
    return build_tiny_minicpm_model(tiny_minicpm_config(arch, vocab_size=VOCAB), seed=seed)


def make_batch(query_num: int = 4, left_pad: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    """Two rows: row 0 holds an image of two slices (overview 2x3 patches + one 3x2 slice), row 1 one 2x2
    image; row 1 is shorter and padded (right, or left for generation)."""
    gen = torch.Generator().manual_seed(seed)
    rows = [[5, 6] + [1] * query_num + [7] + [1] * query_num + [8, 9, 10], [11] + [1] * query_num + [12, 13]]
    length = max(map(len, rows))
    input_ids = torch.zeros(2, length, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    mm = torch.zeros_like(input_ids)
    for i, row in enumerate(rows):
        span = slice(length - len(row), length) if left_pad else slice(0, len(row))
        ids = torch.tensor(row)
        ids[ids == 1] = torch.randint(14, VOCAB, (int((ids == 1).sum()),), generator=gen)  # placeholder ids vary
        input_ids[i, span] = ids
        attention_mask[i, span] = 1
        mm[i, span] = torch.tensor([1 if t == 1 else 0 for t in row])
    tgt_sizes = torch.tensor([[2, 3], [3, 2], [2, 2]])
    n_patches = int((tgt_sizes[:, 0] * tgt_sizes[:, 1]).sum())
    return {"input_ids": input_ids, "attention_mask": attention_mask, "mm_token_type_ids": mm,
            "pixel_values": torch.randn(n_patches, 3 * P * P, generator=gen), "tgt_sizes": tgt_sizes}


# ---------------------------------------------------------------- architecture detection and names


@pytest.mark.parametrize("arch", ARCHS)
def test_detect_arch_from_published_config(arch):
    assert detect_arch(PUBLISHED[arch]) == arch


@pytest.mark.parametrize("config, words", [
    ({"model_type": "minicpmv", "hidden_size": 4096, "query_num": 96}, "Llama3-V 2.5"),
    ({"model_type": "minicpmv", "version": 4.5}, "version 4.5"),
    ({"model_type": "minicpmo", "version": 4.5}, "version 4.5"),
    ({"model_type": "qwen2_vl"}, "not a MiniCPM-V"),
])
def test_detect_arch_refuses_unsupported(config, words):
    with pytest.raises(VlmtuneError, match=words) as err:
        detect_arch(config)
    assert "MiniCPM-V 2.6" in str(err.value)  # the message says what is supported


@pytest.mark.parametrize("arch", ARCHS)
def test_full_size_names_and_shapes_equal_official(arch):
    recorded = json.loads((DATA / f"{arch}_params.json").read_text())["params"]
    config = config_class_for(PUBLISHED[arch]["model_type"])(**PUBLISHED[arch])
    with torch.device("meta"):
        model = MiniCPMVForConditionalGeneration(config)
    ours = {name: list(t.shape) for name, t in model.state_dict().items()}
    assert sorted(set(recorded) - set(ours)) == []
    assert sorted(set(ours) - set(recorded)) == []
    assert {n: s for n, s in ours.items() if recorded[n] != s} == {}


@pytest.mark.parametrize("arch", ARCHS)
def test_config_saves_back_in_the_official_layout(arch, tmp_path):
    published = PUBLISHED[arch]
    config_class_for(published["model_type"])(**published).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    ignored = {"transformers_version", "_name_or_path"}
    assert set(saved) - ignored == set(published) - ignored
    assert {k: saved[k] for k in published if k not in ignored and saved[k] != published[k]} == {}


# ---------------------------------------------------------------- forward


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_loss_finite_and_images_reach_the_text(arch):
    model = tiny(arch)
    batch = make_batch()
    labels = batch["input_ids"].masked_fill(batch["mm_token_type_ids"].bool() | ~batch["attention_mask"].bool(), -100)
    out = model(**batch, labels=labels)
    assert out.logits.shape == (2, batch["input_ids"].shape[1], VOCAB)
    assert torch.isfinite(out.loss)
    # Other pixels change the logits after the first image position, never before it (causal LM, images
    # placed at the marked positions).
    other = dict(batch, pixel_values=batch["pixel_values"] + 1.0)
    changed = (model(**other).logits - out.logits).abs().amax(-1) > 1e-4
    first = int(batch["mm_token_type_ids"][0].nonzero()[0])
    assert not changed[0, :first].any()
    assert changed[0, first:].all()


@pytest.mark.parametrize("arch", ARCHS)
def test_image_queries_fill_marked_positions_in_order(arch):
    model = tiny(arch)
    batch = make_batch()
    embeds = model.embed_inputs(batch["input_ids"], batch["pixel_values"], batch["tgt_sizes"], batch["mm_token_type_ids"])
    features = model.get_image_features(batch["pixel_values"], batch["tgt_sizes"])  # [3 slices, 4, hidden]
    slots = batch["mm_token_type_ids"].bool()
    torch.testing.assert_close(embeds[slots], features.reshape(-1, features.shape[-1]))
    scale = model.config.scale_emb if arch == "minicpmv2" else 1.0
    text = model.get_input_embeddings()(batch["input_ids"]) * scale
    torch.testing.assert_close(embeds[~slots], text[~slots])
    # each slice is encoded on its own: slice 2 alone gives the same queries as in the batch
    pixels_of_slice_2 = batch["pixel_values"][12:16]
    alone = model.get_image_features(pixels_of_slice_2, torch.tensor([[2, 2]]))
    torch.testing.assert_close(alone[0], features[2], atol=1e-5, rtol=1e-5)


def test_mismatched_placeholders_are_an_error():
    model = tiny("minicpmv2_6")
    batch = make_batch()
    batch["mm_token_type_ids"][1, 2] = 0  # one image position too few
    with pytest.raises(ValueError, match="do not match"):
        model(**batch)
    batch = make_batch()
    with pytest.raises(ValueError, match="no pixel_values"):
        model(input_ids=batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"])


# ---------------------------------------------------------------- generation


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generate_equals_stepwise_argmax(arch):
    model = tiny(arch, seed=1)
    batch = make_batch(left_pad=True)
    new = 5
    out = model.generate(**batch, max_new_tokens=new, do_sample=False, pad_token_id=0, eos_token_id=None)
    generated = out[:, batch["input_ids"].shape[1]:]
    assert generated.shape == (2, new)
    ids, mask, mm = batch["input_ids"], batch["attention_mask"], batch["mm_token_type_ids"]
    with torch.no_grad():
        for step in range(new):  # full forwards without a cache, one token at a time
            logits = model(input_ids=ids, attention_mask=mask, mm_token_type_ids=mm,
                           pixel_values=batch["pixel_values"], tgt_sizes=batch["tgt_sizes"]).logits
            token = logits[:, -1].argmax(-1, keepdim=True)
            assert torch.equal(token[:, 0], generated[:, step]), f"step {step}"
            ids = torch.cat([ids, token], 1)
            mask = torch.cat([mask, torch.ones_like(token)], 1)
            mm = torch.cat([mm, torch.zeros_like(token)], 1)


def test_left_padding_does_not_change_a_row():
    model = tiny("minicpmv2_6")
    right, left = make_batch(), make_batch(left_pad=True)
    with torch.no_grad():
        a = model(**right).logits[1, :7]   # row 1 is 7 tokens long
        b = model(**left).logits[1, -7:]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- training


def _train_step(model, batch, steps: int = 1):
    """Names of the parameters that changed after `steps` optimizer steps on `batch`."""
    labels = batch["input_ids"].masked_fill(batch["mm_token_type_ids"].bool() | ~batch["attention_mask"].bool(), -100)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # Adam moves every parameter whose gradient is not exactly zero, however small (no weight decay)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        model(**batch, labels=labels).loss.backward()
        opt.step()
    return {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_on_the_seed_regex_trains_only_llm_attention_adapters(arch):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny(arch), LoraConfig(r=4, lora_alpha=8, target_modules=LORA_REGEX, lora_dropout=0.0))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    layers = model.base_model.model.config.num_hidden_layers
    expected = {f"base_model.model.llm.model.layers.{i}.self_attn.{proj}.lora_{ab}.default.weight"
                for i in range(layers) for proj in ("q_proj", "k_proj", "v_proj", "o_proj") for ab in "AB"}
    assert trainable == expected
    # lora_B starts at zero, so lora_A only gets a gradient from the second step on
    assert _train_step(model, make_batch(), steps=2) == expected


@pytest.mark.parametrize("arch", ARCHS)
def test_full_training_changes_every_part(arch):
    model = tiny(arch)
    changed = _train_step(model, make_batch())
    unchanged = {n for n, _ in model.named_parameters()} - changed
    assert unchanged == set()  # vpm, resampler and llm all learn


def test_frozen_vision_stays_frozen():
    model = tiny("minicpmv2")
    model.vpm.requires_grad_(False)
    model.resampler.requires_grad_(False)
    changed = _train_step(model, make_batch())
    assert changed and all(n.startswith("llm.") for n in changed)


@pytest.mark.parametrize("arch", ARCHS)
def test_text_only_batch_still_gives_vision_gradients(arch):
    # DDP needs a gradient for every trainable parameter on every rank, also for batches without images.
    model = tiny(arch).train()
    batch = make_batch()
    out = model(input_ids=batch["input_ids"][:, :3], labels=batch["input_ids"][:, :3])
    out.loss.backward()
    assert all(p.grad is not None for p in model.resampler.parameters())
    assert all(p.grad is not None for p in model.vpm.parameters())


@pytest.mark.parametrize("arch", ARCHS)
def test_gradient_checkpointing_gives_the_same_gradients(arch):
    batch = make_batch()
    labels = batch["input_ids"].masked_fill(batch["mm_token_type_ids"].bool(), -100)
    grads = []
    for checkpointing in (False, True):
        model = tiny(arch).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
            layers = [m for m in model.modules() if type(m).__name__ in
                      ("TimmBlock", "Idefics2EncoderLayer", "MiniCPMDecoderLayer", "Qwen2DecoderLayer")]
            assert len(layers) == 4 and all(m.gradient_checkpointing for m in layers)  # 2 vision + 2 LM layers
        model(**batch, labels=labels).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5, msg=name)


# ---------------------------------------------------------------- saving and loading


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip(arch, tmp_path):
    model = tiny(arch)
    batch = make_batch()
    model.save_pretrained(tmp_path)
    names = set(load_file(str(tmp_path / "model.safetensors")))
    assert names == set(model.state_dict())  # official names, nothing renamed
    loaded = MiniCPMVForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert loaded.arch == arch
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == PUBLISHED[arch]["model_type"]
    assert torch.equal(_logits(model, batch), _logits(loaded, batch))


def test_sharded_checkpoint_with_index(tmp_path):
    model = tiny("minicpmv2_6")
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    loaded = MiniCPMVForConditionalGeneration.from_pretrained(tmp_path).eval()
    batch = make_batch()
    assert torch.equal(_logits(model, batch), _logits(loaded, batch))


def test_auto_map_folder_loads_without_running_its_code(tmp_path):
    model = tiny("minicpmv2_6")
    model.save_pretrained(tmp_path)
    assert "auto_map" in json.loads((tmp_path / "config.json").read_text())
    for name in ("modeling_minicpmv.py", "configuration_minicpm.py"):  # what auto_map points at
        (tmp_path / name).write_text("raise RuntimeError('remote code was imported')\n")
    loaded = MiniCPMVForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert not any(m.endswith(("modeling_minicpmv", "configuration_minicpm")) for m in sys.modules)
    batch = make_batch()
    assert torch.equal(_logits(model, batch), _logits(loaded, batch))


def test_minicpmo_audio_and_tts_weights_are_skipped_with_one_line(tmp_path, caplog):
    model = tiny("minicpmo2_6")
    model.save_pretrained(tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    weights.update({"apm.layers.0.fc1.weight": torch.zeros(4, 4), "apm.conv1.bias": torch.zeros(4),
                    "audio_projection_layer.linear1.weight": torch.zeros(4, 4), "tts.emb_text.weight": torch.zeros(4, 4)})
    save_file(weights, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with caplog.at_level(logging.WARNING, logger="vlmtune.models.minicpmv.modeling"):
        loaded = MiniCPMVForConditionalGeneration.from_pretrained(tmp_path).eval()
    lines = [r.getMessage() for r in caplog.records if r.name == "vlmtune.models.minicpmv.modeling"]
    assert len(lines) == 1 and "skipped 4 weights" in lines[0] and "apm, audio_projection_layer, tts" in lines[0]
    assert not any(n.startswith(("apm.", "tts.", "audio_projection_layer.")) for n in loaded.state_dict())
    batch = make_batch()
    assert torch.equal(_logits(model, batch), _logits(loaded, batch))


def test_resized_vocabulary_is_saved_in_the_official_key(tmp_path):
    model = tiny("minicpmv2")
    model.resize_token_embeddings(VOCAB + 8)
    batch = make_batch()
    assert model(**batch, labels=batch["input_ids"]).logits.shape[-1] == VOCAB + 8
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["vocab_size"] == VOCAB + 8


def test_tiny_minicpmv2_needs_a_square_query_num():
    with pytest.raises(VlmtuneError, match="square"):
        tiny_minicpm_config("minicpmv2", vocab_size=VOCAB, query_num=6)
    assert math.isqrt(tiny_minicpm_config("minicpmv2", vocab_size=VOCAB)["query_num"]) ** 2 == 4
