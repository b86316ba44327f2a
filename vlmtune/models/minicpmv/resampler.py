"""The perceiver resampler of MiniCPM-V: `query_num` learned queries cross-attend to one slice's patches.

One cross-attention layer: keys are the layer-normed, projected vision features plus a 2D sin-cos position
embedding computed for the slice's own patch grid (rows x cols); values are the features without it.
MiniCPM-V 2.0 also adds a fixed sin-cos embedding of a sqrt(query_num)-square grid to the queries and
stores it in the checkpoint (`resampler.pos_embed`); 2.6 / o-2.6 keep the queries as they are.

Parameter names follow the official checkpoints: `query`, `kv_proj`, `attn.in_proj_weight`,
`attn.in_proj_bias`, `attn.out_proj`, `ln_q`, `ln_kv`, `ln_post`, `proj` (and `pos_embed` for 2.0).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def sincos_2d(embed_dim: int, rows: int, cols: int) -> torch.Tensor:
    """[rows * cols, embed_dim] sin-cos embedding of a rows x cols grid, row-major.

    The first half of the channels encodes the column index, the second half the row index (the
    reference builds its grid with `meshgrid(cols, rows)`); each half is [sin | cos] of the index times
    1 / 10000 ** (k / (embed_dim / 4)). Computed in float32 numpy like the reference, so values match
    bit for bit.
    """
    if embed_dim % 4:
        raise ValueError(f"the resampler's embed_dim must be a multiple of 4, got {embed_dim}")
    omega = np.arange(embed_dim // 4, dtype=np.float32)
    omega /= embed_dim / 4.0
    omega = 1.0 / 10000 ** omega
    col, row = np.meshgrid(np.arange(cols, dtype=np.float32), np.arange(rows, dtype=np.float32))

    def encode(pos: np.ndarray) -> np.ndarray:
        out = np.einsum("hw,d->hwd", pos, omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=-1)

    emb = np.concatenate([encode(col), encode(row)], axis=-1)
    return torch.from_numpy(emb.reshape(rows * cols, embed_dim).astype(np.float32))


class ResamplerAttention(nn.Module):
    """`nn.MultiheadAttention`'s parameters (same names and packing) with a forward that calls
    `out_proj` as a module, so DeepSpeed ZeRO-3 gathers its weights (torch's functional MHA reads
    `out_proj.weight` directly, which ZeRO-3 has partitioned away; the official code rewrote MHA for
    the same reason)."""

    def __init__(self, embed_dim: int, num_heads: int):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"resampler embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        """query [B, Q, D], key/value [B, L, D], key_padding_mask [B, L] True where padded -> [B, Q, D]."""
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        batch, n_query, dim = query.shape
        heads, head_dim = self.num_heads, dim // self.num_heads

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, -1, heads, head_dim).transpose(1, 2)

        q, k, v = split(F.linear(query, w_q, b_q)), split(F.linear(key, w_k, b_k)), split(F.linear(value, w_v, b_v))
        mask = None
        if key_padding_mask is not None:
            mask = (~key_padding_mask)[:, None, None, :]  # True = attend
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(batch, n_query, dim))


class Resampler(nn.Module):
    """`query_num` queries attend to each slice's patch features; returns [n_slices, query_num, embed_dim].

    Args:
        num_queries: `query_num` of the config.
        embed_dim: the language model's hidden size.
        num_heads: embed_dim // 128 in all three checkpoints.
        kv_dim: the vision tower's width.
        query_pos_embed: MiniCPM-V 2.0's fixed sin-cos embedding added to the queries.
    """

    def __init__(self, num_queries: int, embed_dim: int, num_heads: int, kv_dim: int, query_pos_embed: bool = False):
        super().__init__()
        self.embed_dim = embed_dim
        self.query = nn.Parameter(torch.zeros(num_queries, embed_dim))
        self.kv_proj = nn.Linear(kv_dim, embed_dim, bias=False) if kv_dim != embed_dim else nn.Identity()
        self.attn = ResamplerAttention(embed_dim, num_heads)
        self.ln_q = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ln_kv = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ln_post = nn.LayerNorm(embed_dim, eps=1e-6)
        self.proj = nn.Parameter(embed_dim ** -0.5 * torch.randn(embed_dim, embed_dim))
        self.query_grid = None
        if query_pos_embed:
            grid = round(num_queries ** 0.5)
            if grid * grid != num_queries:
                raise ValueError(f"MiniCPM-V 2.0's resampler needs a square query_num, got {num_queries}")
            self.query_grid = grid
            # A buffer, not a parameter: it is a constant the official code froze (requires_grad False);
            # persistent, because the official checkpoint stores it under this name.
            self.register_buffer("pos_embed", sincos_2d(embed_dim, grid, grid), persistent=True)
        self._pos_cache: dict[tuple[int, int], torch.Tensor] = {}

    def _grid_embed(self, rows: int, cols: int) -> torch.Tensor:
        key = (rows, cols)
        if key not in self._pos_cache:
            self._pos_cache[key] = sincos_2d(self.embed_dim, rows, cols)
        return self._pos_cache[key]

    def forward(self, features: torch.Tensor, patch_mask: torch.Tensor, tgt_sizes: torch.Tensor) -> torch.Tensor:
        """features [n, L, kv_dim] (padded), patch_mask [n, L] True on real patches, tgt_sizes [n, 2]."""
        n, length, _ = features.shape
        dtype, device = features.dtype, features.device
        pos = torch.zeros(n, length, self.embed_dim, dtype=dtype, device=device)
        for i, (rows, cols) in enumerate(tgt_sizes.tolist()):
            pos[i, : rows * cols] = self._grid_embed(rows, cols).to(device=device, dtype=dtype)
        x = self.ln_kv(self.kv_proj(features))
        q = self.ln_q(self.query)
        if self.query_grid is not None:
            q = q + self.pos_embed.to(q.dtype)
        q = q.unsqueeze(0).expand(n, -1, -1)
        out = self.attn(q, x + pos, x, key_padding_mask=~patch_mask)
        return self.ln_post(out) @ self.proj
