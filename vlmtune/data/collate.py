"""Lazy dataset, length-grouped sampler and padding collator.

Samples are encoded when the DataLoader asks for them (in its worker processes when
`data.num_workers > 0`), not up front: training starts at once and memory holds one batch of
pixels, not the whole dataset's.
"""

from __future__ import annotations

import hashlib

import torch
from torch.utils.data import Dataset, Sampler
from transformers.trainer_pt_utils import get_length_grouped_indices

from vlmtune.data.encode import IGNORE_INDEX, TOKEN_KEYS, Encoder
from vlmtune.data.encode_cache import EncodeCache
from vlmtune.data.sample import Sample


def hash_images(pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
    """One 128-bit key per image, as an int64 tensor [n_images, 2]: a hash of the image's rows of
    `pixel_values` (grid t*h*w rows each, in order), their dtype and shape, and its grid.

    The vision feature cache (`vlmtune.vision_cache`) stores features under these keys; they are
    computed here so that the DataLoader workers do the hashing, not the training loop."""
    pixels = pixel_values.detach().cpu().contiguous()
    keys, start = [], 0
    for grid in image_grid_thw.detach().cpu().tolist():
        rows = grid[0] * grid[1] * grid[2]
        h = hashlib.sha256()
        h.update(f"{pixels.dtype}|{tuple(pixels.shape[1:])}|{grid};".encode())
        h.update(pixels[start: start + rows].reshape(-1).view(torch.uint8).numpy().data)
        keys.append(torch.frombuffer(bytearray(h.digest()[:16]), dtype=torch.int64))
        start += rows
    return torch.stack(keys) if keys else torch.zeros(0, 2, dtype=torch.int64)


class EncodedDataset(Dataset):
    """`samples[i]` encoded by `encoder` on access. `prompt_only` gives generation inputs.

    Args:
        cache: an on-disk `EncodeCache` (data.cache_dir) to read encoded samples from and fill.
        image_keys: add `image_keys` [n_images, 2], a hash of each image's pixels and grid, computed
            here in the DataLoader workers for the vision feature cache (train.cache_vision_features).
    """

    def __init__(self, samples: list[Sample], encoder: Encoder, prompt_only: bool = False,
                 cache: EncodeCache | None = None, image_keys: bool = False):
        self.samples = samples
        self.encoder = encoder
        self.prompt_only = prompt_only
        self.cache = cache
        self.image_keys = image_keys

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        sample = self.samples[i]
        if self.cache is not None:
            item = self.cache.encode(sample, self.prompt_only)
        else:
            item = self.encoder.encode_prompt(sample) if self.prompt_only else self.encoder.encode(sample)
        if self.image_keys and "image_grid_thw" in item:
            item["image_keys"] = hash_images(item["pixel_values"], item["image_grid_thw"])
        return item


class LengthGroupedSampler(Sampler[int]):
    """A random order in which every `batch_size` consecutive samples have similar token lengths, so
    padded batches carry little padding (transformers' `get_length_grouped_indices`: shuffle, cut
    into mega-batches of up to 50 batches, sort each by length, longest batch first).

    The shuffle is seeded by `seed + epoch`, so the order is reproducible and the same in every
    process: under DDP, accelerate's `BatchSamplerShard` gives each rank different whole batches of
    this one order. The Trainer calls `set_epoch` in single-process runs; under DDP it cannot reach
    this sampler, so each full pass also moves to the next epoch by itself.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int = 0):
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        indices = get_length_grouped_indices(self.lengths, self.batch_size, generator=generator)
        yield from indices
        self.epoch += 1


class Collator:
    """Pads token-level tensors to the longest sample and concatenates image tensors.

    Training pads on the right. Generation pads on the left, because `generate` appends new
    tokens on the right and every row's prompt must end at the same position.

    A batch of two Qwen2-VL samples (16 image tokens each) looks like:
        input_ids [2, 57], attention_mask [2, 57], labels [2, 57] (-100 on prompts and padding),
        mm_token_type_ids [2, 57], pixel_values [128, 1176], image_grid_thw [2, 3]
    """

    def __init__(self, pad_token_id: int, padding_side: str = "right", concat_dims: tuple[tuple[str, int], ...] = ()):
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side
        self.concat_dims = dict(concat_dims)  # the family's exceptions to concatenating along dim 0

    def __call__(self, batch: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        longest = max(len(item["input_ids"]) for item in batch)
        keys = dict.fromkeys(key for item in batch for key in item)  # union, in first-seen order
        out: dict[str, torch.Tensor] = {}
        for key in keys:
            if key in TOKEN_KEYS:
                fill = {"input_ids": self.pad_token_id, "labels": IGNORE_INDEX}.get(key, 0)
                # a text-only sample has no mm_token_type_ids: zeros, i.e. "text" everywhere
                values = [item.get(key, torch.zeros_like(item["input_ids"])) for item in batch]
                out[key] = torch.stack([self._pad(v, longest, fill) for v in values])
            else:
                out[key] = torch.cat([item[key] for item in batch if key in item], dim=self.concat_dims.get(key, 0))
        return out

    def _pad(self, value: torch.Tensor, length: int, fill: int) -> torch.Tensor:
        pad = torch.full((length - len(value),), fill, dtype=value.dtype)
        return torch.cat([value, pad] if self.padding_side == "right" else [pad, value])
