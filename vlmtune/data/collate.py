"""Lazy dataset and padding collator.

Samples are encoded when the DataLoader asks for them (in its worker processes when
`data.num_workers > 0`), not up front: training starts at once and memory holds one batch of
pixels, not the whole dataset's.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from vlmtune.data.encode import IGNORE_INDEX, TOKEN_KEYS, Encoder
from vlmtune.data.sample import Sample


class EncodedDataset(Dataset):
    """`samples[i]` encoded by `encoder` on access. `prompt_only` gives generation inputs."""

    def __init__(self, samples: list[Sample], encoder: Encoder, prompt_only: bool = False):
        self.samples = samples
        self.encoder = encoder
        self.prompt_only = prompt_only

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        sample = self.samples[i]
        return self.encoder.encode_prompt(sample) if self.prompt_only else self.encoder.encode(sample)


class Collator:
    """Pads token-level tensors to the longest sample and concatenates image tensors.

    Training pads on the right. Generation pads on the left, because `generate` appends new
    tokens on the right and every row's prompt must end at the same position.

    A batch of two Qwen2-VL samples (16 image tokens each) looks like:
        input_ids [2, 57], attention_mask [2, 57], labels [2, 57] (-100 on prompts and padding),
        mm_token_type_ids [2, 57], pixel_values [128, 1176], image_grid_thw [2, 3]
    """

    def __init__(self, pad_token_id: int, padding_side: str = "right"):
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side

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
                out[key] = torch.cat([item[key] for item in batch if key in item])
        return out

    def _pad(self, value: torch.Tensor, length: int, fill: int) -> torch.Tensor:
        pad = torch.full((length - len(value),), fill, dtype=value.dtype)
        return torch.cat([value, pad] if self.padding_side == "right" else [pad, value])
