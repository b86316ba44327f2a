"""Padding-free packing: the packs hold every sample once and fit, M-RoPE positions per sample equal
the models' own `get_rope_index`, a packed row gives the same logits, loss and gradients as the
same samples padded (and as them one by one, weighted by their answer tokens) on CPU attention,
packed samples cannot see each other (with negative controls showing what breaks that), families
and attention implementations that cannot isolate samples are refused, and `vlmtune train` with
`data.packing=true` sees every sample once per epoch in rows with no padding and trains."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch
from transformers import AutoModelForImageTextToText, TrainerCallback

from conftest import base_overrides, draw, read_jsonl, write_json
from vlmtune.config import load_config
from vlmtune.data.collate import Collator
from vlmtune.data.encode import IGNORE_INDEX, Encoder
from vlmtune.data.formats import load_samples
from vlmtune.data.packing import (PackingCollator, check_packable, check_packing_attention, mrope_positions,
                                  pack_by_length, pack_length)
from vlmtune.errors import ConfigError, DataError
from vlmtune.models import family_for
from vlmtune.models.load import load_processor
from vlmtune.train import train

SIDES = [(28, 28), (56, 56), (112, 56), (56, 112), (112, 112)]


def records(folder, n: int) -> list[dict]:
    """`n` MiniCPM-style records of varied length: one or two images of 1-16 image tokens, one or two
    turns, answers of 1-12 words."""
    out = []
    for i in range(n):
        first = draw(folder / "images" / f"a{i}.png", "red", "circle", SIDES[i % len(SIDES)])
        words = " ".join(["blue"] * (1 + (i * 5) % 12))
        if i % 3 == 2:  # two images and two turns
            second = draw(folder / "images" / f"b{i}.png", "green", "square", SIDES[(i + 2) % len(SIDES)])
            out.append({"id": f"s{i}", "image": {"<image_00>": first, "<image_01>": second}, "conversations": [
                {"role": "user", "content": "<image_00>\nand\n<image_01>\nWhat is in the images?"},
                {"role": "assistant", "content": f"{i} {words}"},
                {"role": "user", "content": "And on the left?"},
                {"role": "assistant", "content": "a red circle"}]})
        else:
            out.append({"id": f"s{i}", "image": first, "conversations": [
                {"role": "user", "content": "<image>\nWhat is in the image?"},
                {"role": "assistant", "content": f"{i} {words}"}]})
    return out


@pytest.fixture(scope="module")
def sample_file(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("packing_data")
    return write_json(folder / "train.json", records(folder, 6))


def setup(model_dir, data: str, attn: str | None = None):
    family = family_for(model_dir)
    processor = load_processor(model_dir, family)
    encoder = Encoder(processor, family)
    items = [encoder.encode(s) for s in load_samples(data)]
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attn)
    model.train()  # as the Trainer runs it: the config's use_cache=true still applies in train mode
    return model, processor, items


# --- packs ---------------------------------------------------------------------------------

def test_packs_hold_every_sample_once_fit_and_are_reproducible():
    lengths = torch.randint(20, 400, (500,), generator=torch.Generator().manual_seed(0)).tolist()
    packs = pack_by_length(lengths, 1024, seed=3)
    assert sorted(i for p in packs for i in p) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in p) <= 1024 for p in packs)
    fill = sum(lengths) / (len(packs) * 1024)
    assert fill > 0.95  # best-fit decreasing on these lengths: 99%; one sample per pack would be 20%
    assert pack_by_length(lengths, 1024, seed=3) == packs
    # a sample as long as the pack gets a pack of its own
    assert sorted(map(sorted, pack_by_length([100, 40, 60, 100, 100], 100))) == [[0], [1, 2], [3], [4]]
    with pytest.raises(DataError, match="pack_length"):
        pack_by_length([10, 101], 100)


def test_pack_length_defaults_to_max_length_and_may_not_be_shorter():
    data = load_config(None, ["data.packing=true", "data.max_length=512"]).data
    assert pack_length(data) == 512
    assert pack_length(load_config(None, ["data.max_length=512", "data.pack_length=2048"]).data) == 2048
    with pytest.raises(ConfigError, match="pack_length=256 is shorter than data.max_length=512"):
        pack_length(load_config(None, ["data.max_length=512", "data.pack_length=256"]).data)


# --- positions -----------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_mrope_positions_equal_the_models_get_rope_index(tiny_model_dir, sample_file, family):
    model, processor, items = setup(tiny_model_dir(family), sample_file)
    merge = processor.image_processor.merge_size
    assert merge == model.config.vision_config.spatial_merge_size
    assert any(len(item["image_grid_thw"]) == 2 for item in items)  # two-image samples are covered
    compressed = 0
    for item in items:
        expected, _ = model.model.get_rope_index(item["input_ids"][None], item["mm_token_type_ids"][None],
                                                 image_grid_thw=item["image_grid_thw"])
        ours = mrope_positions(item["mm_token_type_ids"], item["image_grid_thw"], merge)
        assert torch.equal(ours, expected[:, 0])
        compressed += int(ours.max() < len(item["input_ids"]) - 1)
    assert compressed >= 4  # images of several tokens: M-RoPE positions are not a plain count


# --- a packed row against the same samples padded and one by one ---------------------------

def forward(model, batch: dict, names: list[str]):
    model.zero_grad()
    out = model(**batch)
    out.loss.backward()
    params = dict(model.named_parameters())
    return out, {n: params[n].grad.clone() for n in names}


def checked_params(model) -> list[str]:
    """A few parameters across the model: LM layers 0 and 1, the head, the vision tower's projector."""
    names = [n for n, _ in model.named_parameters()]
    picks = ["model.language_model.layers.0.self_attn.q_proj.weight",
             "model.language_model.layers.1.mlp.down_proj.weight", "lm_head.weight",
             next(n for n in names if n.startswith("model.visual.merger."))]
    assert all(p in names for p in picks)
    return picks


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_a_packed_row_gives_the_loss_and_gradients_of_the_padded_batch(tiny_model_dir, sample_file, family):
    model, processor, items = setup(tiny_model_dir(family), sample_file)
    names = checked_params(model)
    padded = Collator(processor.tokenizer.pad_token_id)(items)
    packed = PackingCollator(processor.image_processor.merge_size)(items)
    assert "attention_mask" not in packed and packed["input_ids"].shape == (1, sum(len(i["input_ids"]) for i in items))

    out_pad, grads_pad = forward(model, padded, names)
    out_pack, grads_pack = forward(model, packed, names)
    assert out_pack.loss.item() == pytest.approx(out_pad.loss.item(), rel=1e-5)
    for n in names:
        assert grads_pack[n].abs().sum() > 0
        torch.testing.assert_close(grads_pack[n], grads_pad[n], rtol=1e-4, atol=1e-6, msg=n)

    # ... and of the samples one by one: their losses weighted by their answer tokens
    losses, weights, grads_one = [], [], {n: 0 for n in names}
    for item in items:
        out, grads = forward(model, Collator(processor.tokenizer.pad_token_id)([item]), names)
        n_targets = int((item["labels"][1:] != IGNORE_INDEX).sum())
        losses.append(out.loss.item() * n_targets)
        weights.append(n_targets)
        for n in names:
            grads_one[n] = grads_one[n] + grads[n] * n_targets
    assert out_pack.loss.item() == pytest.approx(sum(losses) / sum(weights), rel=1e-5)
    for n in names:
        torch.testing.assert_close(grads_pack[n], grads_one[n] / sum(weights), rtol=1e-4, atol=1e-6, msg=n)


def test_collator_lays_samples_end_to_end_and_never_trains_across_a_boundary():
    # Text-only items written out by hand: the second one's first token is a label, which chat
    # templates never produce (they start with a prompt), but a packed row must still not train the
    # first sample's last token to predict it.
    items = [{"input_ids": torch.tensor([5, 6, 7]), "attention_mask": torch.ones(3, dtype=torch.long),
              "labels": torch.tensor([-100, 6, 7])},
             {"input_ids": torch.tensor([8, 9]), "attention_mask": torch.ones(2, dtype=torch.long),
              "labels": torch.tensor([8, 9])}]
    batch = PackingCollator(merge_size=2)([[items[0]], items[1]])  # a pack and a single sample
    assert set(batch) == {"input_ids", "labels", "position_ids", "use_cache"}
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9]]
    assert batch["position_ids"][:, 0].tolist() == [[0, 1, 2, 0, 1]] * 4  # text only: all four rows count


def per_sample_logits(logits: torch.Tensor, items) -> list[torch.Tensor]:
    out, start = [], 0
    for item in items:
        n = len(item["input_ids"])
        out.append(logits[0, start: start + n])
        start += n
    return out


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_samples_do_not_see_each_other(tiny_qwen2_vl, sample_file, attn):
    model, processor, items = setup(tiny_qwen2_vl, sample_file, attn)
    assert model.config._attn_implementation == attn
    collate = PackingCollator(processor.image_processor.merge_size)
    packed = collate(items)
    with torch.no_grad():
        alone = [model(**collate([item])).logits[0] for item in items]
        together = per_sample_logits(model(**packed).logits, items)
        # Negative controls, to show this test sees a leak: (1) positions running on across the
        # row, as if it were one sequence; (2) a KV cache, with which transformers 5.23 skips the
        # packed-sequence mask (why the collator says use_cache=False).
        running = dict(packed, position_ids=packed["position_ids"].clone())
        running["position_ids"][0, 0] = torch.arange(packed["input_ids"].shape[1])
        leaked_positions = per_sample_logits(model(**running).logits, items)
        leaked_cache = per_sample_logits(model(**dict(packed, use_cache=True)).logits, items)
    for a, b in zip(alone, together):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    for leaked in (leaked_positions, leaked_cache):
        torch.testing.assert_close(leaked[0], alone[0], rtol=1e-5, atol=1e-5)  # the first sample has nothing before it
        assert all((b - a).abs().max() > 1e-3 for a, b in zip(alone[1:], leaked[1:]))


# --- refused where it cannot be correct ----------------------------------------------------

def test_packing_is_refused_for_families_and_attention_that_cannot_isolate(tmp_path, caption_data):
    check_packable("qwen2_5_vl")
    with pytest.raises(ConfigError, match="not supported for the generic model family"):
        check_packable("generic")
    # through `vlmtune train`: a model folder of a family vlmtune does not pack (LLaVA: generic) is
    # refused before its processor or weights are read
    folder = tmp_path / "llava"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(ConfigError, match="data.packing=true is not supported for the generic"):
        train(load_config(None, base_overrides(folder, caption_data["train"], tmp_path / "run", "data.packing=true")))
    for attn in ("sdpa", "eager", "flash_attention_2"):
        check_packing_attention(attn)
    with pytest.raises(ConfigError, match="keeps packed samples apart"):
        check_packing_attention("paged|sdpa")


# --- through `vlmtune train` ---------------------------------------------------------------

class RowRecorder(TrainerCallback):
    """Records every training forward's inputs, and the trainable parameters before and after."""

    def __init__(self):
        self.rows, self.before, self.model = [], {}, None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.model = model
        self.before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        model.register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs):
        if module.training:
            self.rows.append({k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()})


def test_vlmtune_train_with_packing(tiny_qwen2_vl, qwen2_vl_parts, tmp_path, capsys):
    n = 12
    data = write_json(tmp_path / "train.json", records(tmp_path, n))
    val = write_json(tmp_path / "val.json", records(tmp_path / "val", 2))
    encoder = Encoder(*qwen2_vl_parts)
    encoded = [encoder.encode(s)["input_ids"].tolist() for s in load_samples(data)]
    assert len({tuple(e) for e in encoded}) == n and max(map(len, encoded)) < 150
    recorder = RowRecorder()
    config = load_config(None, base_overrides(
        tiny_qwen2_vl, data, tmp_path / "run", "data.packing=true", "data.max_length=150", "data.pack_length=200",
        f"data.val={val}", "train.max_steps=-1", "train.epochs=2", "train.batch_size=2", "train.learning_rate=0.01"))
    out = train(config, callbacks=[recorder])
    log = capsys.readouterr().out
    assert "attention: sdpa (auto: transformers' default, since" in log
    assert f"packing: {n} samples into" in log

    seen, per_row = [], []
    for row in recorder.rows:
        assert "attention_mask" not in row and row["use_cache"] is False
        ids, positions = row["input_ids"], row["position_ids"]
        assert ids.shape[0] == 1 and positions.shape == (4, 1, ids.shape[1])
        starts = (positions[0, 0] == 0).nonzero().flatten().tolist() + [ids.shape[1]]
        assert starts[0] == 0
        for a, b in zip(starts, starts[1:]):  # the row is samples end to end, nothing else: no padding
            seen.append(encoded.index(ids[0, a:b].tolist()))
            assert row["labels"][0, a] == IGNORE_INDEX
        assert ids.shape[1] <= 2 * 200  # batch_size packs of at most pack_length tokens
        per_row.append(len(starts) - 1)
    assert sorted(seen[:n]) == sorted(seen[n:]) == list(range(n))  # every sample once in each epoch
    assert len(per_row) < n and max(per_row) > 2  # fewer steps than batches of 2 samples: packs of several

    metrics = read_jsonl(out / "metrics.jsonl")
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert losses and all(math.isfinite(x) for x in losses)
    assert [m["eval_loss"] for m in metrics if "eval_loss" in m] and all(
        math.isfinite(m["eval_loss"]) for m in metrics if "eval_loss" in m)
    params = dict(recorder.model.named_parameters())
    unchanged = [k for k, v in recorder.before.items() if torch.equal(params[k].detach(), v)]
    assert recorder.before and not unchanged


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and importlib.util.find_spec("flash_attn")),
                    reason="needs a CUDA device and flash-attn")
def test_flash_attention_varlen_isolates_packed_samples(tiny_qwen2_vl, sample_file):
    family = family_for(tiny_qwen2_vl)
    processor = load_processor(tiny_qwen2_vl, family)
    items = [Encoder(processor, family).encode(s) for s in load_samples(sample_file)]
    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen2_vl, dtype=torch.bfloat16,
                                                        attn_implementation="flash_attention_2").cuda().train()
    collate = PackingCollator(processor.image_processor.merge_size)

    def run(batch):
        with torch.no_grad():
            return model(**{k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()})

    together = per_sample_logits(run(collate(items)).logits.float(), items)
    for item, packed in zip(items, together):
        torch.testing.assert_close(packed, run(collate([item])).logits[0].float(), rtol=2e-2, atol=2e-2)
    padded = run(Collator(processor.tokenizer.pad_token_id)(items)).loss.item()
    assert run(collate(items)).loss.item() == pytest.approx(padded, rel=2e-2)
