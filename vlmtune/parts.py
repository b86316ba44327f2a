"""A run's parts, resolved once from its config: the model folder and family, the model's
`config.json` (read here, once), the processor with the run's image settings, the encoder, the
dtype and the attention kernel (the processor and encoder load on first use).

    parts = run_parts(config)                 # train, data check, data stats, merge
    parts = run_parts(target.config, model=target.model)   # eval, predict, chat, serve, ui
    model = parts.load_model()

Every command that loads a processor or a model gets it here, so they cannot drift apart: the
processor is always the model folder's, with the run's pixel budget or fixed size and
`max_slice_nums`; the encoder always has the run's prompt, system prompt and image size. Which
weights a run folder stands for is the business of `checkpoints.resolve_weights`.

One rule ties the parts together: vlmtune's own MiniCPM-V 2.x processor and the model's config
must agree on `max_slice_nums` (a saved folder is reloaded with both); `RunParts.load_model`
applies it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import torch

from vlmtune.config import RunConfig
from vlmtune.data.encode import Encoder
from vlmtune.kernels import resolve_attention
from vlmtune.models import Family, family_of
from vlmtune.models.family import read_model_config
from vlmtune.models.load import load_model, load_processor, model_class, pick_dtype, resolve_model_path


@dataclass
class RunParts:
    config: RunConfig
    model_path: Path  # local folder of the weights to load (a hub id resolved to its snapshot)
    family: Family
    model_config: dict  # `model_path/config.json`, as read once by `run_parts`
    dtype: torch.dtype
    attention: str | None  # `attn_implementation` to load with (None: transformers' default)
    attention_why: str
    training: bool

    @cached_property
    def processor(self):
        """Loaded on first use, so that checks of the family's capabilities come before it."""
        return _processor(self.model_path, self.family, self.config, self.model_config)

    @cached_property
    def encoder(self) -> Encoder:
        return build_encoder(self.config, self.processor, self.family, self.training)

    @property
    def model_type(self) -> str:
        return self.model_config["model_type"]

    @property
    def pad_id(self) -> int:
        tokenizer = self.processor.tokenizer
        return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def load_model(self, quantization: str | None = None, *, dtype: torch.dtype | None = None):
        """The model, in the config's dtype (or `dtype`), with the parts' attention kernel."""
        model = load_model(self.model_path, dtype or self.dtype, quantization, self.config.model.trust_remote_code,
                           self.attention, family=self.family, model_config=self.model_config)
        if self.family.own_implementation:  # saved folders are reloaded with their processor: both must agree
            model.config.set_max_slice_nums(self.processor.image_processor.max_slice_nums)
        return model

    def with_config(self, config: RunConfig) -> RunParts:
        """These parts for another run on the same weights (an adapter served beside this one): the
        processor is reloaded only when the image settings differ."""
        d, mine = config.data, self.config.data
        same = (d.min_pixels, d.max_pixels, d.max_slice_nums) == (mine.min_pixels, mine.max_pixels, mine.max_slice_nums)
        parts = replace(self, config=config)
        if same:
            parts.processor = self.processor  # fills the cached property
        return parts


def build_encoder(config: RunConfig, processor, family: Family, limit_length: bool = True) -> Encoder:
    """The encoder of a run: its prompt, system prompt and fixed image size; with `limit_length`,
    samples over `data.max_length` are an error (training), otherwise any length encodes
    (generation, where the server checks the context itself)."""
    d = config.data
    return Encoder(processor, family, prompt=d.prompt, system_prompt=d.system_prompt,
                   image_size=tuple(d.image_size) if d.image_size else None,
                   max_length=d.max_length if limit_length else None)


def _processor(path: Path, family: Family, config: RunConfig, model_config: dict):
    d = config.data
    return load_processor(path, family, d.min_pixels, d.max_pixels, config.model.trust_remote_code, d.max_slice_nums,
                          model_config=model_config)


def run_parts(config: RunConfig, model: str | Path | None = None, *, training: bool = False) -> RunParts:
    """The parts of the run `config` describes.

    Args:
        model: the weights folder or hub id to load instead of `config.model.name_or_path` (a fully
            trained run's final/ or checkpoint); its config.json is the one read.
        training: parts to train with: the encoder refuses samples over `data.max_length`, and the
            model loads with the attention kernel `model.attn_implementation` picks. Otherwise any
            length encodes (a server checks the context itself) and the model loads with
            transformers' default attention, as every command that compares or serves answers does
            (a merge reloads its output that way too).

    Raises:
        VlmtuneError: no such model folder or hub id, no readable config.json, a text-only model.
        ConfigError: an attention kernel that cannot run here.
    """
    m = config.model
    path = resolve_model_path(str(model or m.name_or_path), m.hub, m.revision)
    model_config = read_model_config(path)
    family = family_of(model_config, path)
    dtype = pick_dtype(m.dtype)
    attention, why = None, "transformers' default"
    if training:
        attention, why = resolve_attention(m.attn_implementation, dtype, model_class(path, family, model_config))
    return RunParts(config, path, family, model_config, dtype, attention, why, training)
