"""What `vlmtune plan` needs to know about a model, read from its `config.json` alone.

No weights are read and no memory is used: the model is built on PyTorch's `meta` device, where
tensors have shapes but no storage. That gives the exact parameter names and counts (per part:
vision tower, projector, language model) and the exact modules that LoRA targeting would pick
(`vlmtune.tuning`'s own functions run on it). The dimensions that drive activation memory
(hidden sizes, layers, heads, patch and merge sizes) come from the config.

Two ways to build the meta model:
- families transformers ships (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): `AutoModelForImageTextToText`
  from the config, as `vlmtune train` would load it;
- MiniCPM-V 2.0 / 2.6 / MiniCPM-o 2.6 (`model_type` minicpmv / minicpmo): vlmtune's own
  implementation (`vlmtune.models.minicpmv`), with the official parameter names (`vpm.`, `resampler.`,
  `llm.`); audio and TTS modules are not built, as vlmtune never loads them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vlmtune.errors import VlmtuneError
from vlmtune.models.family import Family

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


def _qwen_vision_stack(model_type: str, v) -> Stack:
    if model_type == "qwen2_vl":  # LayerNorm, fc1 -> quick_gelu -> fc2 (x and sigmoid(1.702x) are kept)
        width, inter, gated, rms, saves = v.embed_dim, int(v.embed_dim * v.mlp_ratio), False, False, 2
        roles = {"qkv": ("attn.qkv",), "o": ("attn.proj",), "up": ("mlp.fc1",), "down": ("mlp.fc2",)}
    elif model_type == "qwen2_5_vl":  # RMSNorm, SwiGLU
        width, inter, gated, rms, saves = v.hidden_size, v.intermediate_size, True, True, 1
        roles = {"qkv": ("attn.qkv",), "o": ("attn.proj",), "up": ("mlp.gate_proj", "mlp.up_proj"),
                 "down": ("mlp.down_proj",)}
    else:  # qwen3_vl: LayerNorm, linear_fc1 -> gelu(tanh) -> linear_fc2
        width, inter, gated, rms, saves = v.hidden_size, v.intermediate_size, False, False, 1
        roles = {"qkv": ("attn.qkv",), "o": ("attn.proj",), "up": ("mlp.linear_fc1",), "down": ("mlp.linear_fc2",)}
    return Stack(layers=v.depth, hidden=width, q_dim=width, kv_dim=width, heads=v.num_heads, intermediate=inter,
                 gated_mlp=gated, rms_norm=rms, act_saves=saves, fused_qkv=True, block_prefix="model.visual.blocks.0",
                 roles=roles, norms=("norm1", "norm2"))


def _qwen_summary(path: Path, raw: dict) -> ArchitectureSummary:
    from transformers import AutoConfig, AutoModelForImageTextToText

    from vlmtune.models import family_for

    config = AutoConfig.from_pretrained(path)  # never trust_remote_code: these families ship with transformers
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    text, vision = config.text_config, config.vision_config
    budget = _processor_budget(path)
    image = ImageGeometry(kind="qwen", patch_size=vision.patch_size, merge=vision.spatial_merge_size, **budget)
    return ArchitectureSummary(
        model_type=raw["model_type"], family=family_for(path), model=model,
        llm=_text_stack(text, "model.language_model.layers.0", qk_norm=raw["model_type"] == "qwen3_vl"),
        vision=_qwen_vision_stack(raw["model_type"], vision),
        vocab=text.vocab_size, image=image, projector_kind="merger",
        patch_values=3 * vision.temporal_patch_size * vision.patch_size ** 2)


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


def _minicpm_summary(raw: dict, where: Path) -> ArchitectureSummary:
    """MiniCPM-V 2.0 / 2.6 / MiniCPM-o 2.6: vlmtune's own model class, built on the meta device."""
    from vlmtune.models import family_for
    from vlmtune.models.minicpmv.modeling import MiniCPMVForConditionalGeneration, config_class_for
    from vlmtune.models.minicpmv.version import MINICPMV2

    family = family_for(where)  # also refuses MiniCPM versions vlmtune does not implement
    config = config_class_for(raw["model_type"])(**raw)
    with torch.device("meta"):
        model = MiniCPMVForConditionalGeneration(config)
    v = config.vision_settings()  # the tower as built (drop_vision_last_layer applied)
    if family.name == MINICPMV2:  # timm ViT: fused qkv, norm1/norm2
        layout = dict(fused_qkv=True, block_prefix="vpm.blocks.0", norms=("norm1", "norm2"),
                      roles={"qkv": ("attn.qkv",), "o": ("attn.proj",), "up": ("mlp.fc1",), "down": ("mlp.fc2",)})
    else:  # NaViT SigLIP
        layout = dict(fused_qkv=False, block_prefix="vpm.encoder.layers.0", norms=("layer_norm1", "layer_norm2"),
                      roles={"qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                             "o": ("self_attn.out_proj",), "up": ("mlp.fc1",), "down": ("mlp.fc2",)})
    vision = Stack(layers=v["num_hidden_layers"], hidden=v["hidden_size"], q_dim=v["hidden_size"],
                   kv_dim=v["hidden_size"], heads=v["num_attention_heads"], intermediate=v["intermediate_size"],
                   gated_mlp=False, rms_norm=False, act_saves=1, **layout)
    slices = raw.get("slice_config") or {}
    patch = slices.get("patch_size", raw.get("patch_size", 14))
    image = ImageGeometry(kind="minicpm", patch_size=patch, query_num=raw.get("query_num", 64),
                          max_slices=slices.get("max_slice_nums", raw.get("max_slice_nums", 9)),
                          scale_resolution=slices.get("scale_resolution", raw.get("scale_resolution",
                                                                                  raw.get("image_size", 448))))
    return ArchitectureSummary(
        model_type=raw["model_type"], family=family, model=model,
        llm=_text_stack(model.llm.config, "llm.model.layers.0"),
        vision=vision, vocab=raw["vocab_size"], image=image, projector_kind="resampler", patch_values=3 * patch * patch)


QWEN_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
MINICPM_TYPES = ("minicpmv", "minicpmo")


def summarize(path: str | Path) -> ArchitectureSummary:
    """The `ArchitectureSummary` of the model whose `config.json` is in folder `path`.

    Raises:
        VlmtuneError: no readable config.json, or a model type the planner has no formulas for.
    """
    path = Path(path)
    raw = _read_config(path)
    model_type = raw.get("model_type")
    if model_type in QWEN_TYPES:
        return _qwen_summary(path, raw)
    if model_type in MINICPM_TYPES:
        return _minicpm_summary(raw, path)
    from vlmtune.models import family_for

    family_for(path)  # a text-only model is refused as such, not as a model without formulas
    raise VlmtuneError(f"{path}/config.json: model_type {model_type!r}: `vlmtune plan` has memory formulas for "
                       f"{', '.join(QWEN_TYPES + MINICPM_TYPES)} (MiniCPM-V 2.0 / 2.6, MiniCPM-o 2.6); not for "
                       "this one yet")
