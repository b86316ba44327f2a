"""`MiniCPMVForConditionalGeneration`: MiniCPM-V 2.0 / 2.6 and MiniCPM-o 2.6 (vision-language) on
transformers 5, with the official checkpoints' weight names.

Top-level children are the official ones, so `state_dict()` names equal the checkpoint's:
`vpm` (vision tower, `vision.py`), `resampler` (`resampler.py`), `llm` (Qwen2ForCausalLM for 2.6 / o-2.6,
MiniCPM-2.4B for 2.0, `minicpm_llm.py`). Nothing is imported or run from a model folder: a folder whose
config.json carries `auto_map` (all official ones do) is read as data.

Model inputs (the contract with the processor, `processing.py`):
    input_ids [B, L], attention_mask [B, L], labels [B, L] (-100 = ignored; shifted inside);
    mm_token_type_ids [B, L]: 1 exactly where an image-query embedding replaces the token embedding;
    pixel_values [P_total, 3*p*p]: every slice's p x p patches, row-major, flattened (channel, row, col),
        slices in text order (an image's overview first, then its slices row-major), batch row after row;
    tgt_sizes [n_slices, 2]: patch rows and cols of each slice; n_slices * query_num == mm_token_type_ids.sum().
Text embeddings (times `scale_emb` for 2.0, as the official `get_vllm_embedding`) get the resampler's
outputs written into the mm_token_type_ids == 1 positions, in order.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel, Qwen2ForCausalLM
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast

from vlmtune.models.minicpmv.configuration import MiniCPMOConfig, MiniCPMVConfig
from vlmtune.models.minicpmv.minicpm_llm import MiniCPMForCausalLM
from vlmtune.models.minicpmv.resampler import Resampler, ResamplerAttention, sincos_2d
from vlmtune.models.minicpmv.version import MINICPMV2
from vlmtune.models.minicpmv.vision import NavitSiglip, TimmSiglip

logger = logging.getLogger(__name__)

# Weight-name prefixes of the vision-language model; MiniCPM-o 2.6 checkpoints also hold `apm.` (Whisper
# audio encoder), `audio_projection_layer.` and `tts.` (ChatTTS), which vlmtune does not build.
VL_PREFIXES = ("llm.", "vpm.", "resampler.")


def config_class_for(model_type: str | None) -> type[MiniCPMVConfig]:
    return MiniCPMOConfig if model_type == "minicpmo" else MiniCPMVConfig


def load_config(path: str | Path) -> MiniCPMVConfig:
    """The config of the checkpoint folder `path`, in the class its model_type names."""
    path = Path(path)
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    return config_class_for(model_type).from_pretrained(path)


def checkpoint_weight_names(path: Path) -> list[str]:
    """Tensor names of the safetensors checkpoint in `path` (single file or sharded with an index)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return list(json.loads(index.read_text())["weight_map"])
    from safetensors import safe_open

    names: list[str] = []
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            names.extend(f.keys())
    return names


def _several_processes() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and (
        torch.distributed.get_world_size() > 1)


class MiniCPMVPreTrainedModel(PreTrainedModel):
    config_class = MiniCPMVConfig
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _no_split_modules = ["Qwen2DecoderLayer", "MiniCPMDecoderLayer", "Idefics2EncoderLayer", "TimmBlock", "Resampler"]
    _skip_keys_device_placement = ["past_key_values"]
    _keys_to_ignore_on_load_unexpected = [r"^apm\.", r"^audio_projection_layer\.", r"^tts\."]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # The official init of the parts transformers does not know (the reference's `_init_weights`
        # and constructors); checkpoint loading then overwrites them.
        super()._init_weights(module)
        if isinstance(module, Resampler):
            init.trunc_normal_(module.query, std=0.02)
            init.normal_(module.proj, std=module.embed_dim ** -0.5)
            if module.query_grid is not None:
                init.copy_(module.pos_embed, sincos_2d(module.embed_dim, module.query_grid, module.query_grid))
            module._pos_cache.clear()
        elif isinstance(module, ResamplerAttention):
            init.xavier_uniform_(module.in_proj_weight)
            init.zeros_(module.in_proj_bias)
        elif isinstance(module, TimmSiglip):
            init.trunc_normal_(module.pos_embed, std=0.02)


class MiniCPMVForConditionalGeneration(MiniCPMVPreTrainedModel, GenerationMixin):
    """MiniCPM-V 2.0 / 2.6 or MiniCPM-o 2.6 (vision-language part); the architecture comes from the config."""

    def __init__(self, config: MiniCPMVConfig):
        super().__init__(config)
        self.arch = config.arch
        llm_config = config.llm_config()
        if self.arch == MINICPMV2:
            self.llm = MiniCPMForCausalLM(llm_config)
            self.vpm = TimmSiglip(config.vision_settings())
        else:
            self.llm = Qwen2ForCausalLM(llm_config)
            self.vpm = NavitSiglip(config.navit_config(), batch_size=getattr(config, "vision_batch_size", 16) or 16)
        hidden = llm_config.hidden_size
        # embed_dim // 128 heads in every official checkpoint; at least one for tiny test models.
        self.resampler = Resampler(config.query_num, hidden, max(1, hidden // 128), self.vpm.embed_dim,
                                   query_pos_embed=self.arch == MINICPMV2)
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Load an official (or vlmtune-saved) checkpoint folder; no code from the folder is run.

        MiniCPM-o 2.6's audio and TTS weights are left out, with one log line saying how many.
        """
        path = Path(pretrained_model_name_or_path)
        if path.is_dir() and kwargs.get("config") is None:
            kwargs["config"] = load_config(path)  # MiniCPMOConfig for o-2.6, so saving keeps its model_type
        if path.is_dir():
            skipped = [n for n in checkpoint_weight_names(path) if not n.startswith(VL_PREFIXES)]
            if skipped:
                kinds = sorted({n.split(".")[0] for n in skipped})
                logger.warning("%s: skipped %d weights outside the vision-language model (%s); vlmtune builds only "
                               "vpm, resampler and llm", path, len(skipped), ", ".join(kinds))
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def set_attn_implementation(self, attn_implementation, *args, **kwargs):
        super().set_attn_implementation(attn_implementation, *args, **kwargs)
        # The 2.6 vision tower is a plain module with its own config; keep it on the same kernel.
        if hasattr(self.vpm, "config"):
            self.vpm.config._attn_implementation = self.config._attn_implementation

    def get_input_embeddings(self) -> nn.Module:
        return self.llm.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.llm.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.llm.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.llm.set_output_embeddings(value)

    def resize_token_embeddings(self, *args, **kwargs) -> nn.Embedding:
        embeddings = super().resize_token_embeddings(*args, **kwargs)
        # The official config keeps vocab_size at the top level; the language model reads its own copy.
        self.config.vocab_size = self.llm.config.vocab_size = embeddings.weight.shape[0]
        return embeddings

    def get_decoder(self) -> nn.Module:
        return self.llm.model

    def get_image_features(self, pixel_values: torch.Tensor, tgt_sizes: torch.Tensor) -> torch.Tensor:
        """[n_slices, query_num, hidden]: vision tower, then resampler, for every slice."""
        tgt_sizes = tgt_sizes.to(torch.long)
        features, patch_mask = self.vpm(pixel_values, tgt_sizes)
        return self.resampler(features, patch_mask, tgt_sizes)

    def _vision_is_trained(self) -> bool:
        return any(p.requires_grad for p in self.vpm.parameters()) or any(
            p.requires_grad for p in self.resampler.parameters())

    def embed_inputs(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                     tgt_sizes: torch.Tensor | None = None, mm_token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with each slice's `query_num` resampler outputs in its placeholder positions."""
        embeds = self.get_input_embeddings()(input_ids)
        if self.arch == MINICPMV2:
            embeds = embeds * self.config.scale_emb
        slots = None if mm_token_type_ids is None else mm_token_type_ids.to(embeds.device) == 1
        n_slots = 0 if slots is None else int(slots.sum())
        if pixel_values is None or pixel_values.numel() == 0:
            if n_slots:
                raise ValueError(f"mm_token_type_ids marks {n_slots} image-query positions but no pixel_values were given")
            if self.training and torch.is_grad_enabled() and (self._vision_is_trained() or _several_processes()):
                # A text-only batch still touches the vision weights (times zero), as the official code does,
                # so distributed training sees a gradient for every trainable parameter on every rank, and
                # under ZeRO-3/FSDP every rank gathers the (even frozen) vision weights the others gather.
                p = self.vpm.patch_size
                dummy = torch.zeros(16 * 16, 3 * p * p, device=embeds.device, dtype=embeds.dtype)
                sizes = torch.tensor([[16, 16]], device=embeds.device)
                embeds = embeds + self.get_image_features(dummy, sizes).sum().to(embeds.dtype) * 0
            return embeds
        if tgt_sizes is None:
            raise ValueError("pixel_values were given without tgt_sizes (patch rows and cols of every slice)")
        features = self.get_image_features(pixel_values, tgt_sizes)
        if features.shape[0] * features.shape[1] != n_slots:
            raise ValueError(
                f"{features.shape[0]} image slices give {features.shape[0] * features.shape[1]} query embeddings "
                f"({features.shape[1]} each) but mm_token_type_ids marks {n_slots} positions; the prompt's image "
                "placeholders and the images do not match (was a sample truncated through its image tokens?)")
        return embeds.masked_scatter(slots.unsqueeze(-1), features.reshape(-1, features.shape[-1]).to(embeds.dtype))

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, past_key_values=None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                pixel_values: torch.Tensor | None = None, tgt_sizes: torch.Tensor | None = None,
                mm_token_type_ids: torch.Tensor | None = None, use_cache: bool | None = None,
                logits_to_keep: int | torch.Tensor = 0, **kwargs) -> CausalLMOutputWithPast:
        if inputs_embeds is None:
            inputs_embeds = self.embed_inputs(input_ids, pixel_values, tgt_sizes, mm_token_type_ids)
        if position_ids is None and attention_mask is not None and attention_mask.ndim == 2:
            # Positions count real tokens only, so a left-padded row gets the positions it would have alone
            # (the same rule generate() uses for its own steps).
            position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
            position_ids = position_ids[:, -inputs_embeds.shape[1]:]
        return self.llm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                        past_key_values=past_key_values, labels=labels, use_cache=use_cache,
                        logits_to_keep=logits_to_keep, **kwargs)

    def prepare_inputs_for_generation(self, *args, is_first_iteration: bool | None = False, **kwargs):
        inputs = super().prepare_inputs_for_generation(*args, is_first_iteration=is_first_iteration, **kwargs)
        if not is_first_iteration and kwargs.get("use_cache", True):
            # The images were embedded on the prefill step; later steps only feed the new token.
            inputs.pop("pixel_values", None)
            inputs.pop("tgt_sizes", None)
        return inputs
