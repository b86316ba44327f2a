"""What `vlmtune plan` needs to know about a model, read from its `config.json` alone.

No weights are read and no memory is used: the model is built on PyTorch's `meta` device, where
tensors have shapes but no storage. That gives the exact parameter names and counts (per part:
vision tower, projector, language model) and the exact modules that LoRA targeting would pick
(`vlmtune.tuning`'s own functions run on it). The dimensions that drive activation memory
(hidden sizes, layers, heads, patch and merge sizes) come from the config.

What differs by family (the layout of a vision block, how images become patches) is the family's
`plan` geometry (`vlmtune.models.family.PlanGeometry`); a family without one has no formulas here.
Two ways to build the meta model:
- families transformers ships (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): `AutoModelForImageTextToText`
  from the config, as `vlmtune train` would load it;
- families vlmtune implements itself (MiniCPM-V 2.0 / 2.6 / MiniCPM-o 2.6): its own class
  (`vlmtune.models.minicpmv`), with the official parameter names (`vpm.`, `resampler.`, `llm.`);
  audio and TTS modules are not built, as vlmtune never loads them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vlmtune.errors import VlmtuneError
from vlmtune.models import FAMILIES, family_for
from vlmtune.models.family import Family, VisionBlock

# Linear layers of one transformer block by role: "qkv" and "up" layers share their input (the
# output of the block's first and second norm), "o" reads the attention output, "down" the MLP's
# hidden activation. Names are relative to the block.
_ROLES_LLM = {"qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "o": ("self_attn.o_proj",),
              "up": ("mlp.gate_proj", "mlp.up_proj"), "down": ("mlp.down_proj",)}


@dataclass(frozen=True)
class Stack:
    """A stack of identical pre-norm transformer blocks (language model or vision tower)."""

    layers: int
    hidden: int
    q_dim: int  # width of the queries (heads x head_dim)
    kv_dim: int  # width of keys and of values (kv_heads x head_dim)
    heads: int
    intermediate: int  # MLP hidden width
    gated_mlp: bool  # SwiGLU (gate, up, down) rather than fc1 -> act -> fc2
    rms_norm: bool  # RMSNorm computed in fp32 (Qwen), rather than LayerNorm
    act_saves: int  # tensors of MLP width the activation keeps for backward: silu/gelu 1, quick_gelu 2
    fused_qkv: bool  # one qkv projection, whose whole output stays alive while v is needed
    block_prefix: str  # name of block 0, e.g. "model.language_model.layers.0"
    roles: dict  # role -> linear names relative to a block (see _ROLES_LLM)
    norms: tuple = ("input_layernorm", "post_attention_layernorm")  # norm modules relative to a block
    qk_norm: bool = False  # RMSNorm on each head of q and k (Qwen3)


@dataclass(frozen=True)
class ImageGeometry:
    """How an image becomes vision-tower patches and language-model tokens."""

    kind: str  # "qwen": dynamic resolution under a pixel budget; "minicpm": fixed-size slices
    patch_size: int
    merge: int = 2  # qwen: merge x merge patches make one token
    min_pixels: int = 56 * 56  # qwen: the processor's budget when the config sets none
    max_pixels: int = 28 * 28 * 1280
    query_num: int = 64  # minicpm: tokens per slice (resampler queries)
    max_slices: int = 9  # minicpm: slices of a large image, besides the whole image
    scale_resolution: int = 448  # minicpm: side of a slice

    def per_image(self, size: tuple[int, int] | None = None, max_pixels: int | None = None,
                  min_pixels: int | None = None, max_slices: int | None = None) -> tuple[int, int, int]:
        """(patches, tokens, attention sequences) of one image: `size` = (width, height) if fixed,
        else the largest image the pixel budget (Qwen) or the slice limit (MiniCPM) lets through."""
        if self.kind == "minicpm":
            side = self.scale_resolution // self.patch_size
            slices = max_slices or self.max_slices
            if size is not None:  # MiniCPM slices an image into about area / scale_resolution^2 parts
                slices = min(math.ceil(size[0] * size[1] / self.scale_resolution ** 2), slices)
            images = 1 if slices <= 1 else 1 + slices
            return images * side * side, images * self.query_num, images
        factor = self.patch_size * self.merge
        lo, hi = min_pixels or self.min_pixels, max_pixels or self.max_pixels
        if size is None:
            pixels = (hi // (factor * factor)) * factor * factor
        else:
            pixels = _smart_resize_pixels(size[1], size[0], factor, lo, hi)
        patches = pixels // (self.patch_size * self.patch_size)
        return patches, patches // (self.merge * self.merge), 1


def _smart_resize_pixels(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> int:
    """Pixels after the Qwen processors' resize (multiples of `factor`, area within the budget)."""
    h, w = max(factor, round(height / factor) * factor), max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h * w


@dataclass
class ArchitectureSummary:
    """A model described for memory planning: its meta-device module tree and its dimensions."""

    model_type: str
    family: Family
    model: nn.Module  # on the meta device: names and shapes, no storage
    llm: Stack
    vision: Stack
    vocab: int
    image: ImageGeometry
    projector_kind: str  # "merger" (Qwen: norm + 2-layer MLP on merged patches) or "resampler" (MiniCPM)
    patch_values: int  # pixel values per patch in the batch (Qwen: 3 x 2 frames x 14 x 14)

    def parameters_by_part(self) -> dict[str, int]:
        counts = {"vision": 0, "projector": 0, "llm": 0, "other": 0}
        for name, p in self.model.named_parameters():
            counts[self.family.part_of(name)] += p.numel()
        return counts


def _read_config(path: Path) -> dict:
    file = Path(path) / "config.json"
    try:
        return json.loads(file.read_text())
    except FileNotFoundError:
        raise VlmtuneError(f"{file}: not found; `vlmtune plan` needs the model's config.json (nothing else)") from None
    except json.JSONDecodeError as e:
        raise VlmtuneError(f"{file}: not valid JSON ({e})") from None


def _text_stack(c, prefix: str, qk_norm: bool = False) -> Stack:
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    return Stack(layers=c.num_hidden_layers, hidden=c.hidden_size, q_dim=c.num_attention_heads * head_dim,
                 kv_dim=kv_heads * head_dim, heads=c.num_attention_heads, intermediate=c.intermediate_size,
                 gated_mlp=True, rms_norm=True, act_saves=1, fused_qkv=False, block_prefix=prefix, roles=_ROLES_LLM,
                 qk_norm=qk_norm)


def _vision_stack(block: VisionBlock, layers: int, width: int, heads: int, intermediate: int) -> Stack:
    return Stack(layers=layers, hidden=width, q_dim=width, kv_dim=width, heads=heads, intermediate=intermediate,
                 gated_mlp=block.gated_mlp, rms_norm=block.rms_norm, act_saves=block.act_saves,
                 fused_qkv=block.fused_qkv, block_prefix=block.prefix, roles=dict(block.roles), norms=block.norms)


def _qwen_summary(path: Path, raw: dict, family: Family) -> ArchitectureSummary:
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(path)  # never trust_remote_code: these families ship with transformers
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    text, v = config.text_config, config.vision_config
    if getattr(v, "mlp_ratio", None):  # Qwen2-VL: the tower's width is embed_dim (its hidden_size is the LM's)
        width, intermediate = v.embed_dim, int(v.embed_dim * v.mlp_ratio)
    else:
        width, intermediate = v.hidden_size, v.intermediate_size
    budget = _processor_budget(path)
    image = ImageGeometry(kind=family.plan.images, patch_size=v.patch_size, merge=v.spatial_merge_size, **budget)
    return ArchitectureSummary(
        model_type=raw["model_type"], family=family, model=model,
        llm=_text_stack(text, "model.language_model.layers.0", qk_norm=family.plan.qk_norm),
        vision=_vision_stack(family.plan.vision, v.depth, width, v.num_heads, intermediate),
        vocab=text.vocab_size, image=image, projector_kind="merger",
        patch_values=3 * v.temporal_patch_size * v.patch_size ** 2)


def _processor_budget(path: Path) -> dict:
    """The image processor's pixel budget as saved in the model folder (transformers' default if none)."""
    for name in ("preprocessor_config.json", "processor_config.json"):
        file = Path(path) / name
        if not file.is_file():
            continue
        data = json.loads(file.read_text())
        data = data.get("image_processor", data)
        size = data.get("size") or {}
        lo, hi = data.get("min_pixels") or size.get("shortest_edge"), data.get("max_pixels") or size.get("longest_edge")
        if lo and hi:
            return {"min_pixels": int(lo), "max_pixels": int(hi)}
    return {}


def _minicpm_summary(raw: dict, family: Family) -> ArchitectureSummary:
    """MiniCPM-V 2.0 / 2.6 / MiniCPM-o 2.6: vlmtune's own model class, built on the meta device."""
    from vlmtune.models.minicpmv.modeling import MiniCPMVForConditionalGeneration, config_class_for

    config = config_class_for(raw["model_type"])(**raw)
    with torch.device("meta"):
        model = MiniCPMVForConditionalGeneration(config)
    v = config.vision_settings()  # the tower as built (drop_vision_last_layer applied)
    vision = _vision_stack(family.plan.vision, v["num_hidden_layers"], v["hidden_size"], v["num_attention_heads"],
                           v["intermediate_size"])
    slices = raw.get("slice_config") or {}
    patch = slices.get("patch_size", raw.get("patch_size", 14))
    image = ImageGeometry(kind=family.plan.images, patch_size=patch, query_num=raw.get("query_num", 64),
                          max_slices=slices.get("max_slice_nums", raw.get("max_slice_nums", 9)),
                          scale_resolution=slices.get("scale_resolution", raw.get("scale_resolution",
                                                                                  raw.get("image_size", 448))))
    return ArchitectureSummary(
        model_type=raw["model_type"], family=family, model=model,
        llm=_text_stack(model.llm.config, "llm.model.layers.0"),
        vision=vision, vocab=raw["vocab_size"], image=image, projector_kind="resampler", patch_values=3 * patch * patch)


def summarize(path: str | Path) -> ArchitectureSummary:
    """The `ArchitectureSummary` of the model whose `config.json` is in folder `path`.

    Raises:
        VlmtuneError: no readable config.json, a text-only model or a MiniCPM-V version vlmtune does
            not implement, or a family the planner has no formulas for.
    """
    path = Path(path)
    raw = _read_config(path)
    family = family_for(path)
    if family.plan is None:
        planned = ", ".join(name for name, f in FAMILIES.items() if f.plan is not None)
        raise VlmtuneError(f"{path}/config.json: model_type {raw.get('model_type')!r}: `vlmtune plan` has memory "
                           f"formulas for the families {planned}; not for this one ({family.name}) yet")
    if family.plan.images == "minicpm":
        return _minicpm_summary(raw, family)
    return _qwen_summary(path, raw, family)
