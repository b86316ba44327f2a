"""What vlmtune needs to know about a model family, as plain data.

Each family file (`qwen2_vl.py`, ...) holds one `Family`: where its vision tower, projector and
language model live in the parameter names, the default LoRA targets, processor settings, and
what the family can do (packing, cached vision features, memory planning). Other modules ask the
family (`family.packable`), never its name, so a new family is added in `models/` alone.
The family of a checkpoint is read from `config.json`'s `model_type`, never from its path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from vlmtune.errors import VlmtuneError

# LoRA on the language model's attention and MLP projections (the tutorials' list), but only inside
# the language model: Qwen2.5-VL's vision blocks also have gate/up/down_proj.
LLM_LINEAR_REGEX = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def placeholder_token_ids(config) -> list[int]:
    """The ids of the image and video placeholder tokens, where a model's config names them."""
    return _config_ids(config, ("image_token_id", "image_token_index", "video_token_id", "video_token_index"))


def vision_token_ids(config) -> list[int]:
    """The placeholders and the tokens around them (vision start/end): never part of an answer, and
    a placeholder sampled into one breaks the forward pass that scores it."""
    return _config_ids(config, ("image_token_id", "image_token_index", "video_token_id", "video_token_index",
                                "vision_start_token_id", "vision_end_token_id"))


def _config_ids(config, keys: tuple[str, ...]) -> list[int]:
    ids = []
    for key in keys:
        value = getattr(config, key, None)
        if isinstance(value, int) and value not in ids:
            ids.append(value)
    return ids


@dataclass(frozen=True)
class VisionBlock:
    """One block of a vision tower as `vlmtune plan` counts its memory (names relative to the block)."""

    prefix: str  # name of block 0, e.g. "model.visual.blocks.0"
    roles: tuple[tuple[str, tuple[str, ...]], ...]  # ("qkv" | "o" | "up" | "down", its linear layers)
    norms: tuple[str, str]  # the two norms of the block
    fused_qkv: bool  # one qkv projection, whose whole output stays alive while v is needed
    gated_mlp: bool  # SwiGLU (gate, up, down) rather than fc1 -> act -> fc2
    rms_norm: bool  # RMSNorm computed in fp32, rather than LayerNorm
    act_saves: int  # tensors of MLP width the activation keeps for backward: silu/gelu 1, quick_gelu 2


@dataclass(frozen=True)
class PlanGeometry:
    """What `vlmtune plan` needs to know of a family beyond the sizes in its config.json."""

    images: str  # "qwen": dynamic resolution under a pixel budget, merged patches; "minicpm": fixed-size slices
    vision: VisionBlock
    qk_norm: bool = False  # the language model normalises each head of q and k (Qwen3)


@dataclass(frozen=True)
class Family:
    name: str
    vision: tuple[str, ...]  # parameter-name prefixes of the vision tower
    projector: tuple[str, ...]  # ... of the vision-to-language projector (checked before `vision`)
    language_model: tuple[str, ...]  # ... of the language model, lm_head included
    lora_targets: str = LLM_LINEAR_REGEX  # peft `target_modules` (a regex matched on full names)
    end_of_turn: str | None = None  # token closing an assistant turn; trained on, None = find it
    patch_factor: int = 1  # fixed resizes are rounded to a multiple of this (patch * merge)
    pixel_budget: bool = False  # the image processor takes min_pixels / max_pixels
    # Image tensors are concatenated along dim 0 across segments and batch rows, except those named
    # here: MiniCPM-V 4.x packs every patch of a batch into one [1, C, patch, L] row, joined along L.
    concat_dims: tuple[tuple[str, int], ...] = ()
    # vlmtune's own model and processor classes (`models/minicpmv/`) load it, not transformers' Auto classes
    own_implementation: bool = False
    # data.packing: the model takes 4-row (text + M-RoPE) position ids and builds the packed mask from row 0
    packable: bool = False
    # train.cache_vision_features: the model's forward takes mm_encoder_outputs={"image": ...} instead of pixels
    vision_cache: bool = False
    plan: PlanGeometry | None = None  # `vlmtune plan`'s memory formulas for it; None: it has none
    # A training batch without images still runs the vision tower and projector (output times zero), so under
    # DDP every trainable vision parameter gets a gradient on every rank, and under ZeRO-3/FSDP every rank
    # gathers the same parameters (else: DDP errors, ZeRO-3/FSDP hang). "model": the model's own forward does it
    # (vlmtune's MiniCPM-V 2.x code); "hook": vlmtune adds it (vlmtune/distributed.py: `get_image_features` on
    # a blank image from the processor, after the token embeddings); None: nothing does.
    dummy_vision_pass: Literal["model", "hook"] | None = None

    def concat_dim(self, key: str) -> int:
        return dict(self.concat_dims).get(key, 0)

    def part_of(self, param_name: str) -> str:
        """'projector', 'vision', 'llm' or 'other' for a parameter name of the bare model."""
        name = param_name.removeprefix("base_model.model.")
        for part, prefixes in (("projector", self.projector), ("vision", self.vision), ("llm", self.language_model)):
            if any(name.startswith(p) for p in prefixes):
                return part
        return "other"


def read_model_config(path: str | Path) -> dict:
    """`config.json` of the model folder `path`, which must name a model_type."""
    config = Path(path) / "config.json"
    try:
        data = json.loads(config.read_text())
        data["model_type"]
        return data
    except FileNotFoundError:
        raise VlmtuneError(f"{config}: not found; is {path} a model folder?") from None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise VlmtuneError(f"{config}: cannot read model_type ({e})") from None


VLM_EXAMPLES = "Qwen2-VL, Qwen2.5-VL, Qwen3-VL, MiniCPM-V, LLaVA, Idefics3, SmolVLM, Gemma 3, InternVL, PaliGemma"


def is_text_only(config: dict) -> bool:
    """Whether `config` (a parsed config.json) is a language model with no vision part: a model type
    transformers builds as a causal LM but not as an image-text-to-text model, with no vision config.

    Model types transformers does not know (remote code) are not judged here: nothing tells.
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as CAUSAL_LM
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES as IMAGE_TEXT

    model_type = config["model_type"]
    return (model_type in CAUSAL_LM and model_type not in IMAGE_TEXT
            and not any("vision" in key for key in config))


def check_vision_language(config: dict, path: str | Path) -> None:
    """Refuse a text-only model by its config.json, before any processor or weights load (which
    would fail later with an image-processor traceback).

    Raises:
        VlmtuneError: `config` is a text-only language model.
    """
    if is_text_only(config):
        raise VlmtuneError(
            f"{path}: not a vision-language model (model_type {config['model_type']}); vlmtune fine-tunes image+text "
            f"models such as {VLM_EXAMPLES}. Pass such a model, or use a text fine-tuning tool for this one.")


def read_model_type(path: str | Path) -> str:
    return read_model_config(path)["model_type"]
