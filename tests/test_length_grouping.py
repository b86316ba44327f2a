"""Length-grouped batching: batches of mixed-length samples carry less padding than in random
order, every sample comes once per epoch, the order is reproducible under the seed and the same on
every rank (accelerate shards it by whole batches under DDP), and the lengths the sampler groups by
are the pre-flight check's, also when bad samples are skipped."""

from __future__ import annotations

import pytest
import torch
from accelerate.data_loader import BatchSamplerShard
from torch.utils.data import BatchSampler
from transformers import TrainerCallback

from conftest import base_overrides, draw, write_json
from vlmtune.config import load_config
from vlmtune.data.check import apply_policy, check_samples
from vlmtune.data.collate import LengthGroupedSampler
from vlmtune.data.encode import Encoder
from vlmtune.data.formats import load_samples
from vlmtune.train import kept_lengths, train

BATCH = 4


def padding_fraction(order: list[int], lengths: list[int], batch: int = BATCH) -> float:
    """Pad tokens / all tokens when `order` is cut into batches padded to their longest sample."""
    batches = [order[i: i + batch] for i in range(0, len(order), batch)]
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    return 1 - sum(lengths) / padded


def mixed_lengths(n: int = 400, seed: int = 0) -> list[int]:
    return torch.randint(20, 400, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_grouped_order_has_less_padding_and_every_sample_once():
    lengths = mixed_lengths()
    order = list(LengthGroupedSampler(lengths, BATCH, seed=42))
    assert sorted(order) == list(range(len(lengths)))
    random_order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(42)).tolist()
    grouped, shuffled = padding_fraction(order, lengths), padding_fraction(random_order, lengths)
    assert shuffled > 0.25  # lengths 20-400: random batches waste a lot
    assert grouped < shuffled / 5


def test_order_is_reproducible_and_changes_with_seed_and_epoch():
    lengths = mixed_lengths(100)
    first = list(LengthGroupedSampler(lengths, BATCH, seed=1))
    assert list(LengthGroupedSampler(lengths, BATCH, seed=1)) == first
    assert list(LengthGroupedSampler(lengths, BATCH, seed=2)) != first

    sampler = LengthGroupedSampler(lengths, BATCH, seed=1)
    assert list(sampler) == first
    second = list(sampler)  # a full pass moves on to the next epoch by itself (DDP never calls set_epoch)
    assert second != first and sorted(second) == sorted(first)
    sampler.set_epoch(1)
    assert list(sampler) == second
    sampler.set_epoch(0)
    assert list(sampler) == first


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_get_disjoint_whole_batches_that_cover_the_epoch(world):
    # What accelerate does under DDP: every rank builds the same order and keeps every world-th batch.
    lengths = mixed_lengths(BATCH * world * 10)
    shards = [list(BatchSamplerShard(BatchSampler(LengthGroupedSampler(lengths, BATCH, seed=7), BATCH, False),
                                     num_processes=world, process_index=rank)) for rank in range(world)]
    seen = [i for shard in shards for batch in shard for i in batch]
    assert sorted(seen) == list(range(len(lengths)))
    # each rank's batches are still grouped
    for shard in shards:
        assert padding_fraction([i for b in shard for i in b], lengths) < 0.1


def test_lengths_of_kept_samples_are_the_encoded_lengths(tiny_qwen2_vl, qwen2_vl_parts, tmp_path):
    records = mixed_records(tmp_path, 6)
    records.insert(2, {"image": "images/missing.png", "conversations": records[0]["conversations"]})
    records.insert(4, {"image": records[1]["image"], "conversations": [
        {"role": "user", "content": "<image>\nWhat?"}, {"role": "assistant", "content": "red " * 200}]})
    samples = load_samples(write_json(tmp_path / "train.json", records))
    encoder = Encoder(*qwen2_vl_parts)
    report = check_samples(samples, encoder, max_length=150, progress=False)
    assert {p.kind for p in report.problems} == {"missing image", "too long"}
    kept = apply_policy(samples, report, "skip", tmp_path / "rejected.jsonl")
    assert len(kept) == 6
    assert kept_lengths(report) == [len(encoder.encode(s)["input_ids"]) for s in kept]


# --- through `vlmtune train` ---------------------------------------------------------------

def mixed_records(folder, n: int) -> list[dict]:
    """`n` records whose images (1 to 16 image tokens) and answers (1 to 24 words) vary in size."""
    sides = [(28, 28), (56, 56), (112, 56), (112, 112)]
    records = []
    for i in range(n):
        size = sides[(i * 7) % len(sides)]
        image = draw(folder / "images" / f"m{i}.png", size=size)
        records.append({"id": f"m{i}", "image": image, "conversations": [
            {"role": "user", "content": "<image>\nWhat is in the image?"},
            {"role": "assistant", "content": f"{i} " + "red " * ((i * 5) % 24)}]})
    return records


class BatchRecorder(TrainerCallback):
    """Records the (input_ids, attention_mask) of every training forward."""

    def __init__(self):
        self.batches = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        model.register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs):
        if module.training:
            self.batches.append((kwargs["input_ids"].clone(), kwargs["attention_mask"].clone()))


def one_epoch(model, data: str, out, grouped: bool, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    recorder = BatchRecorder()
    config = load_config(None, base_overrides(model, data, out, f"train.batch_size={BATCH}",
                                              f"train.max_steps={n // BATCH}",
                                              f"data.group_by_length={str(grouped).lower()}"))
    train(config, callbacks=[recorder])
    return recorder.batches


@pytest.mark.long
def test_vlmtune_train_groups_batches_by_length(tiny_qwen2_vl, qwen2_vl_parts, tmp_path):
    n = 64  # with batch 4, transformers' grouping sorts mega-batches of 4 batches
    data = write_json(tmp_path / "train.json", mixed_records(tmp_path, n))
    encoder = Encoder(*qwen2_vl_parts)
    index = {tuple(encoder.encode(s)["input_ids"].tolist()): i for i, s in enumerate(load_samples(data))}
    assert len(index) == n

    def seen(batches) -> list[int]:
        return [index[tuple(ids[row][mask[row].bool()].tolist())] for ids, mask in batches for row in range(len(ids))]

    def padding(batches) -> float:
        return 1 - sum(int(mask.sum()) for _, mask in batches) / sum(mask.numel() for _, mask in batches)

    grouped = one_epoch(tiny_qwen2_vl, data, tmp_path / "grouped", True, n)
    again = one_epoch(tiny_qwen2_vl, data, tmp_path / "again", True, n)
    shuffled = one_epoch(tiny_qwen2_vl, data, tmp_path / "shuffled", False, n)

    assert sorted(seen(grouped)) == sorted(seen(shuffled)) == list(range(n))  # each sample once per epoch
    assert seen(again) == seen(grouped)  # same seed, same order
    assert padding(shuffled) > 0.15  # about 0.21, and 0.06 grouped
    assert padding(grouped) < padding(shuffled) / 2
