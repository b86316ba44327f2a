"""Padding-free packing: several samples laid end to end in one row, each attending only to itself.

    vlmtune train CONFIG data.packing=true [data.pack_length=4096]

Samples are grouped into packs of at most `data.pack_length` tokens (best-fit decreasing on the
lengths the pre-flight check measured; a sample is never split). A batch holds `train.batch_size`
packs, and the collator lays all their samples end to end in one row: no padding token at all.

How the samples are kept apart, in transformers 5.23 (read from its source):
  - the collator gives no `attention_mask` and `position_ids` of shape (4, 1, T): row 0 counts
    0, 1, 2, ... from the start of each sample, rows 1-3 are that sample's M-RoPE positions
    (temporal, height, width), computed for the sample alone as the model's `get_rope_index` does;
  - the Qwen-VL text models split the 4 rows: rows 1-3 rotate queries and keys, row 0 goes to the
    mask and to the attention function. `masking_utils.find_packed_sequence_indices` starts a new
    sequence wherever row 0 does not go up by one, and the sdpa / eager masks become
    block-diagonal causal masks; flash-attention (`_flash_attention_forward`) sees batch size 1
    with restarting positions and calls the varlen kernel with `cu_seqlens` from row 0;
  - `pixel_values` and `image_grid_thw` are concatenated in sample order, as in a padded batch; the
    vision towers already attend within each image only;
  - the batch says `use_cache=False`: with a KV cache transformers does not build the packed mask;
  - the first label of every sample is -100, so the previous sample's last token is not trained
    to predict it (unpacked, position 0 is never a target either).
So a packed batch gives the loss and gradients of the same samples in a padded batch
(tests/test_packing.py checks both with sdpa and eager; its flash-attention test needs a GPU).
With sdpa or eager the mask is a full T x T matrix, so the attention costs grow with the square
of the row length; flash-attention computes only the blocks.
"""

from __future__ import annotations

import bisect
import itertools

import torch
from torch.utils.data import Dataset

from vlmtune.data.collate import EncodedDataset
from vlmtune.data.encode import IGNORE_INDEX, TOKEN_KEYS
from vlmtune.errors import ConfigError, DataError
from vlmtune.models import FAMILIES

# Attention implementations that keep packed samples apart in transformers 5.23: eager and sdpa
# through the packed-sequence mask (tested on CPU), flash-attention 2 through its varlen kernel.
# Others are refused: the Qwen-VL models do not take flex_attention, and paged or hub kernels
# have not been checked.
ISOLATING_ATTENTION = ("eager", "sdpa", "flash_attention_2")


def check_packable(family_name: str) -> None:
    """Raises ConfigError when the family cannot be trained with `data.packing` (`Family.packable`)."""
    family = FAMILIES.get(family_name)
    if family is None or not family.packable:
        packable = ", ".join(name for name, f in FAMILIES.items() if f.packable)
        raise ConfigError(
            f"data.packing=true is not supported for the {family_name} model family: vlmtune can keep packed "
            f"samples apart only for {packable} (their position ids mark where each sample "
            "starts). Set data.packing=false; data.group_by_length=true still keeps padding low.")


def pack_length(data) -> int:
    """`data.pack_length`, or `data.max_length` when unset (a `DataConfig`).

    Raises:
        ConfigError: a pack shorter than the longest sample the pre-flight check lets through.
    """
    length = data.pack_length or data.max_length
    if length < data.max_length:
        raise ConfigError(f"data.pack_length={length} is shorter than data.max_length={data.max_length}: a sample "
                          "that passes the pre-flight check might not fit in a pack (samples are never split). "
                          "Leave data.pack_length unset or set it to at least data.max_length.")
    return length


def check_packing_attention(attn_implementation: str | None) -> None:
    """Raises ConfigError when the loaded model's attention cannot isolate packed samples."""
    if attn_implementation not in ISOLATING_ATTENTION:
        raise ConfigError(
            f"data.packing=true needs an attention implementation that keeps packed samples apart "
            f"({', '.join(ISOLATING_ATTENTION)}); the model uses {attn_implementation!r}. Set "
            "model.attn_implementation to one of them (auto picks flash_attention_2 or sdpa), or data.packing=false.")


def pack_by_length(lengths: list[int], capacity: int, seed: int = 0) -> list[list[int]]:
    """Sample indices grouped into packs whose lengths add up to at most `capacity`.

    Best-fit decreasing: longest sample first, each into the fullest pack that still has room
    (a new pack when none has). Ties between equal lengths are broken by a seeded shuffle, so the
    packs are reproducible. Every index appears in exactly one pack.

    Raises:
        DataError: a sample longer than `capacity`.
    """
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()
    order.sort(key=lambda i: -lengths[i])  # stable: equal lengths keep the shuffled order
    packs: list[list[int]] = []
    # (room left, pack index), sorted: the first entry with room >= n is the best fit
    rooms: list[tuple[int, int]] = []
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise DataError(f"sample {i} has {n} tokens, more than data.pack_length={capacity}; "
                            "set data.pack_length to at least data.max_length")
        at = bisect.bisect_left(rooms, (n, -1))
        if at == len(rooms):
            packs.append([i])
            room, pack = capacity - n, len(packs) - 1
        else:
            room, pack = rooms.pop(at)
            packs[pack].append(i)
            room -= n
        bisect.insort(rooms, (room, pack))
    return packs


class PackedDataset(Dataset):
    """Item `i` is pack `i`: the items of `samples` listed in `packs[i]`. `samples` is the
    `EncodedDataset` of the training samples, so encoding stays lazy (in DataLoader workers when
    `data.num_workers > 0`) and goes through whatever caches it reads."""

    def __init__(self, samples: Dataset, packs: list[list[int]]):
        self.samples = samples
        self.packs = packs

    def __len__(self) -> int:
        return len(self.packs)

    def __getitem__(self, i: int) -> list[dict[str, torch.Tensor]]:
        # None: a sample skipped under data.on_bad_sample=skip (vlmtune/run_guard.py); the pack goes without it
        items = [item for item in (self.samples[j] for j in self.packs[i]) if item is not None]
        if not items:
            raise DataError(f"pack {i}: none of its {len(self.packs[i])} samples can be loaded")
        return items


def mrope_positions(token_types: torch.Tensor, image_grid_thw: torch.Tensor | None, merge_size: int,
                    source: str = "sample") -> torch.Tensor:
    """The (3, n) M-RoPE position ids of one sample, as the Qwen-VL models' `get_rope_index` gives
    them for a batch of that sample alone (images only; videos are not packed).

    Text tokens count up on all three rows. An image of grid (t, h, w) patches, i.e. t x h/m x w/m
    tokens after the m x m merge, starts at the next position p: temporal p + frame, height
    p + row, width p + column; the text after it continues at p + max(h, w) / m.

    Args:
        token_types: `mm_token_type_ids` of the sample: 0 text, 1 image.
        image_grid_thw: (images, 3) patch grids of the sample's images, in order.
        merge_size: the vision tower's spatial merge (2 in every Qwen-VL).
    """
    grids = iter(image_grid_thw.tolist() if image_grid_thw is not None else [])
    pieces, start = [], 0
    for kind, run in itertools.groupby(token_types.tolist()):
        n = sum(1 for _ in run)
        if kind == 0:
            pieces.append(torch.arange(start, start + n).expand(3, n))
            start += n
            continue
        if kind != 1:
            raise DataError(f"{source}: video tokens cannot be packed; set data.packing=false")
        grid = next(grids, None)
        if grid is None:
            raise DataError(f"{source}: more image token runs than images (image_grid_thw)")
        t, h, w = grid[0], grid[1] // merge_size, grid[2] // merge_size
        if n != t * h * w:
            # the models' get_rope_index reads one image per run of image tokens, too
            raise DataError(f"{source}: a run of {n} image tokens does not match its image grid {grid} "
                            f"({t * h * w} tokens); images must be separated by text tokens to be packed")
        frame = torch.arange(t).repeat_interleave(h * w)
        row = torch.arange(h).repeat_interleave(w).repeat(t)
        col = torch.arange(w).repeat(t * h)
        pieces.append(torch.stack([frame, row, col]) + start)
        start += max(h, w)
    if next(grids, None) is not None:
        raise DataError(f"{source}: more images (image_grid_thw) than runs of image tokens")
    return torch.cat(pieces, dim=1) if pieces else torch.zeros(3, 0, dtype=torch.long)


class PackingCollator:
    """Lays every sample of a batch end to end in one row: no padding, no attention mask, and
    position ids that restart at each sample (see the module docstring for why that isolates them).

    A batch item is a pack (a list of encoded samples, from `PackedDataset`) or one encoded sample
    (evaluation uses `EncodedDataset`). Two packs holding three Qwen2-VL samples of 57, 40 and 61
    tokens (16 image tokens each) give:
        input_ids [1, 158], labels [1, 158] (-100 on prompts and on each sample's first token),
        mm_token_type_ids [1, 158], position_ids [4, 1, 158], pixel_values [192, 1176], image_grid_thw [3, 3],
        use_cache False
    """

    def __init__(self, merge_size: int):
        self.merge_size = merge_size

    def __call__(self, batch: list) -> dict[str, torch.Tensor]:
        samples = [s for item in batch for s in (item if isinstance(item, list) else [item])]
        token_keys = [k for k in TOKEN_KEYS if k != "attention_mask" and any(k in s for s in samples)]
        other_keys = dict.fromkeys(k for s in samples for k in s if k not in TOKEN_KEYS)
        tokens: dict[str, list[torch.Tensor]] = {k: [] for k in token_keys}
        positions, vision = [], {k: [] for k in other_keys}
        for number, s in enumerate(samples):
            n = len(s["input_ids"])
            for key in token_keys:
                # a text-only sample has no mm_token_type_ids: zeros, i.e. "text" everywhere
                value = s.get(key, torch.zeros(n, dtype=torch.long))
                if key == "labels":
                    value = value.clone()
                    value[0] = IGNORE_INDEX
                tokens[key].append(value)
            types = s.get("mm_token_type_ids", torch.zeros(n, dtype=torch.long))
            mrope = mrope_positions(types, s.get("image_grid_thw"), self.merge_size, f"batch sample {number}")
            positions.append(torch.cat([torch.arange(n)[None], mrope]))
            for key in other_keys:
                if key in s:
                    vision[key].append(s[key])
        out = {key: torch.cat(values)[None] for key, values in tokens.items()}
        out["position_ids"] = torch.cat(positions, dim=1)[:, None, :]
        out.update({key: torch.cat(values) for key, values in vision.items() if values})
        # With a KV cache, transformers skips the packed-sequence mask (masking_utils builds it only
        # when past_key_values is None) and the samples would see each other; the configs of the
        # Qwen-VL checkpoints say use_cache=true, and training never needs the cache.
        out["use_cache"] = False
        return out


def packed_dataset(samples: EncodedDataset, lengths: list[int] | None, pack_length: int,
                   seed: int) -> tuple[PackedDataset, str]:
    """The training samples in packs, and a line for the log saying how full the packs are.

    `lengths` are the pre-flight check's token counts; None measures them here."""
    if lengths is None:
        lengths = [samples.encoder.count_tokens(s) for s in samples.samples]
    packs = pack_by_length(lengths, pack_length, seed)
    fill = sum(lengths) / (len(packs) * pack_length) if packs else 0.0
    return PackedDataset(samples, packs), (
        f"packing: {len(lengths)} samples into {len(packs)} packs of at most {pack_length} tokens "
        f"({fill:.0%} full on average), laid end to end in one row per batch (no padding)")
