"""The two SigLIP vision towers of MiniCPM-V, fed with flattened patches.

Both take the model-input contract's `pixel_values` [P_total, 3*p*p] (each slice's p x p patches in
row-major order, each patch flattened as channel, row, column) and `tgt_sizes` [n_slices, 2] (patch rows,
patch cols), and return padded features [n_slices, L_max, width] with a mask [n_slices, L_max] that is
True on real patches. Patch embedding is the checkpoint's p x p / stride p convolution, applied as the
equivalent matrix product on the flattened patches.

- `NavitSiglip` (2.6 / o-2.6): the NaViT SigLIP of the official `modeling_navit_siglip.py`: learned
  position embeddings of a 70 x 70 grid, looked up through bucketized fractional coordinates of each
  slice's own grid. The transformer layers are transformers' Idefics2 vision encoder, which has the same
  parameters and computation (checked against the reference by scripts/minicpm_parity.py); the position
  ids are computed here because Idefics2 rounds its fractional coordinates differently.
- `TimmSiglip` (2.0): timm's `vit_so400m_patch14_siglip_384` as the official code builds it
  (`dynamic_img_size=True`, no pooling head, last block dropped): its 27 x 27 position embedding is
  resampled to each slice's grid with timm's bicubic, antialiased interpolation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Idefics2VisionConfig
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.idefics2.modeling_idefics2 import Idefics2Encoder


def _split_and_pad(flat: torch.Tensor, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """[sum(lengths), D] -> padded [n, max(lengths), D] and a mask True on real rows."""
    longest = max(lengths)
    out = flat.new_zeros(len(lengths), longest, flat.shape[-1])
    mask = torch.zeros(len(lengths), longest, dtype=torch.bool, device=flat.device)
    for i, piece in enumerate(flat.split(lengths)):
        out[i, : len(piece)] = piece
        mask[i, : len(piece)] = True
    return out, mask


def _check_inputs(pixel_values: torch.Tensor, tgt_sizes: torch.Tensor, patch: int, channels: int) -> list[int]:
    if pixel_values.ndim != 2 or pixel_values.shape[1] != channels * patch * patch:
        raise ValueError(f"pixel_values must be [patches, {channels}*{patch}*{patch}] flattened patches, "
                         f"got shape {tuple(pixel_values.shape)}")
    if tgt_sizes.ndim != 2 or tgt_sizes.shape[1] != 2:
        raise ValueError(f"tgt_sizes must be [slices, 2] (patch rows, patch cols), got shape {tuple(tgt_sizes.shape)}")
    lengths = [int(h) * int(w) for h, w in tgt_sizes.tolist()]
    if sum(lengths) != pixel_values.shape[0]:
        raise ValueError(f"tgt_sizes cover {sum(lengths)} patches but pixel_values holds {pixel_values.shape[0]}")
    return lengths


class PatchEmbedding(nn.Conv2d):
    """The checkpoint's patch convolution, applied to already-cut patches as a matrix product."""

    def embed(self, patches: torch.Tensor) -> torch.Tensor:
        return F.linear(patches.to(self.weight.dtype), self.weight.flatten(1), self.bias)


class NavitEmbeddings(nn.Module):
    def __init__(self, config: Idefics2VisionConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.num_patches_per_side = config.image_size // config.patch_size
        self.patch_embedding = PatchEmbedding(config.num_channels, config.hidden_size, config.patch_size,
                                              config.patch_size)
        self.position_embedding = nn.Embedding(self.num_patches_per_side ** 2, config.hidden_size)
        self._ids_cache: dict[tuple[int, int], torch.Tensor] = {}

    def position_ids(self, rows: int, cols: int) -> torch.Tensor:
        """Row-major ids into the side x side table for a rows x cols grid.

        Written as the reference writes it (float32 step 1/n from an integer tensor, arange up to
        1 - 1e-6, bucketize against multiples of 1/side) so that coordinates on a bucket boundary land in
        the same bucket."""
        key = (rows, cols)
        if key not in self._ids_cache:
            side = self.num_patches_per_side
            boundaries = torch.arange(1 / side, 1.0, 1 / side)
            frac_h = torch.arange(0, 1 - 1e-6, 1 / torch.tensor(rows, dtype=torch.int32))
            frac_w = torch.arange(0, 1 - 1e-6, 1 / torch.tensor(cols, dtype=torch.int32))
            bucket_h = torch.bucketize(frac_h, boundaries, right=True)
            bucket_w = torch.bucketize(frac_w, boundaries, right=True)
            self._ids_cache[key] = (bucket_h[:, None] * side + bucket_w).flatten()
        return self._ids_cache[key]

    def forward(self, pixel_values: torch.Tensor, tgt_sizes: torch.Tensor) -> torch.Tensor:
        ids = torch.cat([self.position_ids(int(h), int(w)) for h, w in tgt_sizes.tolist()])
        return self.patch_embedding.embed(pixel_values) + self.position_embedding(ids.to(pixel_values.device))


class NavitSiglip(nn.Module):
    """MiniCPM-V 2.6's vision tower: `embeddings`, `encoder.layers.N`, `post_layernorm`."""

    def __init__(self, config: Idefics2VisionConfig, batch_size: int = 16):
        super().__init__()
        self.config = config
        self.batch_size = batch_size  # slices per encoder call (the official `vision_batch_size`)
        self.embed_dim = config.hidden_size
        self.patch_size = config.patch_size
        self.embeddings = NavitEmbeddings(config)
        self.encoder = Idefics2Encoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor, tgt_sizes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lengths = _check_inputs(pixel_values, tgt_sizes, self.patch_size, self.config.num_channels)
        hidden, mask = _split_and_pad(self.embeddings(pixel_values, tgt_sizes), lengths)
        outputs = []
        for start in range(0, len(lengths), self.batch_size):
            chunk, chunk_mask = hidden[start:start + self.batch_size], mask[start:start + self.batch_size]
            attention_mask = create_bidirectional_mask(config=self.config, inputs_embeds=chunk,
                                                       attention_mask=chunk_mask)
            out = self.encoder(inputs_embeds=chunk, attention_mask=attention_mask).last_hidden_state
            outputs.append(self.post_layernorm(out))
        return torch.cat(outputs), mask


class TimmAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(batch, length, dim))


class TimmMlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # timm's default nn.GELU (exact erf), as the siglip_384 model uses


class TimmBlock(GradientCheckpointingLayer):
    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = TimmAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = TimmMlp(dim, mlp_hidden)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), mask)
        return x + self.mlp(self.norm2(x))


class TimmPatchEmbed(nn.Module):
    def __init__(self, channels: int, dim: int, patch: int):
        super().__init__()
        self.proj = PatchEmbedding(channels, dim, patch, patch)


class TimmSiglip(nn.Module):
    """MiniCPM-V 2.0's vision tower: `patch_embed.proj`, `pos_embed`, `blocks.N`, `norm`."""

    def __init__(self, settings: dict):
        super().__init__()
        dim, patch = settings["hidden_size"], settings["patch_size"]
        self.embed_dim = dim
        self.patch_size = patch
        self.channels = settings.get("num_channels", 3)
        self.grid = settings["image_size"] // patch
        self.patch_embed = TimmPatchEmbed(self.channels, dim, patch)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid * self.grid, dim))
        eps = settings.get("layer_norm_eps", 1e-6)
        self.blocks = nn.ModuleList(TimmBlock(dim, settings["num_attention_heads"], settings["intermediate_size"], eps)
                                    for _ in range(settings["num_hidden_layers"]))
        self.norm = nn.LayerNorm(dim, eps=eps)

    def grid_pos_embed(self, rows: int, cols: int) -> torch.Tensor:
        """timm's `resample_abs_pos_embed`: the table as is for its own square grid, else bicubic with
        antialiasing in float32."""
        pos = self.pos_embed
        if rows == cols == self.grid:
            return pos[0]
        table = pos.float().reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        table = F.interpolate(table, size=(rows, cols), mode="bicubic", antialias=True)
        return table.permute(0, 2, 3, 1).reshape(rows * cols, -1).to(pos.dtype)

    def forward(self, pixel_values: torch.Tensor, tgt_sizes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lengths = _check_inputs(pixel_values, tgt_sizes, self.patch_size, self.channels)
        sizes = [tuple(s) for s in tgt_sizes.tolist()]
        embedded = self.patch_embed.proj.embed(pixel_values)
        pieces = list(embedded.split(lengths))
        # Slices of the same grid run together (no padding, so no mask); the official code runs them one by one.
        outputs: list[torch.Tensor | None] = [None] * len(sizes)
        for rows, cols in dict.fromkeys(sizes):
            index = [i for i, s in enumerate(sizes) if s == (rows, cols)]
            x = torch.stack([pieces[i] for i in index]) + self.grid_pos_embed(rows, cols)
            for block in self.blocks:
                x = block(x)
            x = self.norm(x)
            for j, i in enumerate(index):
                outputs[i] = x[j]
        return _split_and_pad(torch.cat(outputs), lengths)
