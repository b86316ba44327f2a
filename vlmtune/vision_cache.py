"""Frozen vision tower: compute each image's features once and reuse them on later epochs.

    vlmtune train CONFIG train.cache_vision_features=true [train.vision_cache_mb=4096 train.vision_cache_on_disk=true]

With the vision tower and the projector frozen and free of dropout, an image's features (the
projected vectors that replace its image tokens in the language model's input) are the same at
every epoch, so running the vision tower on it again is wasted work.

The hook is a documented argument, not a patch: Qwen2-VL, Qwen2.5-VL and Qwen3-VL in transformers
5.23 take `mm_encoder_outputs={"image": <what get_image_features returns>}` in `forward` in place
of `pixel_values` (`generate` itself uses it to run the vision tower once before prefill).
`VLMTrainer.compute_loss` calls `swap_pixels`, which builds that output from this cache and sends
only the images it does not hold through the model's own `get_image_features`. No library class
is changed, no module is wrapped, so parameter names in checkpoints stay the same, and generation
uses the model as it is. Qwen3-VL's DeepStack features, which the vision tower also produces, are
cached with the image features.

An image is keyed by a hash of its pixel tensor and grid (`hash_images`, computed in the
DataLoader workers), so any change to an image or to its preprocessing is a different key, never
a stale feature. Features live in CPU memory up to `train.vision_cache_mb` (least recently used
dropped first); with `train.vision_cache_on_disk` they are also written to RUN/vision_features/,
under a hash of the frozen weights, and read back when memory has dropped them.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import warnings
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn
from transformers import TrainerCallback

from vlmtune.data.collate import hash_images
from vlmtune.errors import ConfigError
from vlmtune.fileio import atomic_write_bytes, dump_tensors, human_bytes, parse_tensors
from vlmtune.models import FAMILIES

FROZEN_PARTS = ("vision", "projector")
_DROPOUT_ATTRS = ("dropout", "attention_dropout", "hidden_dropout", "dropout_p", "attn_drop")


def check_config(config, family) -> None:
    """Refuse `train.cache_vision_features` before any weights load when the config rules it out.

    Raises:
        ConfigError: a family whose model cannot take cached features, or the vision tower or projector set to train.
    """
    t = config.train
    if not t.cache_vision_features:
        return
    if not family.vision_cache:
        supported = ", ".join(name for name, f in FAMILIES.items() if f.vision_cache)
        raise ConfigError(f"train.cache_vision_features=true works for {supported}; this model is "
                          f"{family.name}. Set train.cache_vision_features=false.")
    training = [flag for flag, frozen in (("train.freeze_vision", t.freeze_vision),
                                          ("train.freeze_projector", t.freeze_projector)) if not frozen]
    if training:
        raise ConfigError(f"train.cache_vision_features=true needs a frozen vision tower and projector (cached "
                          f"features would go stale as they train), but {' and '.join(training)} "
                          f"{'is' if len(training) == 1 else 'are'} false. Freeze them, or set "
                          "train.cache_vision_features=false.")


def check_model(model: nn.Module, family) -> None:
    """Refuse caching when the prepared model's vision tower or projector has a trainable parameter
    (e.g. LoRA adapters put there by `lora.targets`) or active dropout.

    Raises:
        ConfigError: naming the first offending parameter or module.
    """
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and family.part_of(n) in FROZEN_PARTS]
    if trainable:
        raise ConfigError(f"train.cache_vision_features=true, but {len(trainable)} parameter(s) of the vision tower "
                          f"or projector would train (e.g. {trainable[0]}), through lora.targets or "
                          "lora.modules_to_save. Keep them frozen, or set train.cache_vision_features=false.")
    for name, module in model.named_modules():
        if family.part_of(name + ".weight") not in FROZEN_PARTS:
            continue
        rates = [module.p] if isinstance(module, nn.modules.dropout._DropoutNd) else []
        rates += [getattr(module, a) for a in _DROPOUT_ATTRS if isinstance(getattr(module, a, None), float)]
        if any(r > 0 for r in rates):
            raise ConfigError(f"train.cache_vision_features=true, but {name} applies dropout (p={max(rates)}), so the "
                              "vision features differ at every step and cannot be reused. Set that dropout to 0 in the "
                              "model's vision_config, or set train.cache_vision_features=false.")


def check_forward(model: nn.Module) -> None:
    """Refuse when the forward that will run does not take `mm_encoder_outputs`: a kernel library
    (e.g. Liger) may have replaced it with one written for an older transformers.

    Raises:
        ConfigError: naming the forward found.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if "mm_encoder_outputs" not in inspect.signature(base.forward).parameters:
        raise ConfigError(f"train.cache_vision_features=true, but the model's forward ({base.forward.__qualname__} in "
                          f"{base.forward.__module__}) does not take mm_encoder_outputs, which the cache feeds the "
                          "features through. Set train.liger_kernel=off if Liger replaced it, or set "
                          "train.cache_vision_features=false.")


def weights_fingerprint(model: nn.Module, family) -> str:
    """A hash of the vision tower's and projector's weights (names, dtypes, shapes, values): the disk
    cache of one model must never serve another's features."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if family.part_of(name) in FROZEN_PARTS:
            h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)};".encode())
            h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()[:32]


class VisionFeatureCache:
    """Image features (and Qwen3-VL DeepStack features) by image key, in memory and optionally on disk.

    Counters: `hits` (images served from memory or disk), `computed` (images sent through the vision
    tower), `evicted` (dropped from memory by the size bound).
    """

    def __init__(self, max_bytes: int, folder: str | Path | None = None):
        self.max_bytes = max_bytes
        self.folder = Path(folder) if folder is not None else None
        self.memory: OrderedDict[str, tuple[torch.Tensor, ...]] = OrderedDict()
        self.bytes = 0
        self.hits = self.computed = self.evicted = 0
        self._forward_checked = False

    @classmethod
    def for_model(cls, model: nn.Module, family, train_config, run_folder: str | Path) -> VisionFeatureCache:
        """A cache for `model` as `train_config` asks, after checking that caching is valid for it."""
        check_model(model, family)
        folder = None
        if train_config.vision_cache_on_disk:
            folder = Path(run_folder) / "vision_features" / weights_fingerprint(model, family)
        return cls(train_config.vision_cache_mb * 2**20, folder)

    # -- storage --------------------------------------------------------------------------
    def _remember(self, key: str, entry: tuple[torch.Tensor, ...]) -> None:
        size = sum(t.numel() * t.element_size() for t in entry)
        if size > self.max_bytes:
            return
        self.memory[key] = entry
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self.memory.popitem(last=False)
            self.bytes -= sum(t.numel() * t.element_size() for t in old)
            self.evicted += 1

    def _lookup(self, key: str) -> tuple[torch.Tensor, ...] | None:
        entry = self.memory.get(key)
        if entry is not None:
            self.memory.move_to_end(key)
            return entry
        if self.folder is None:
            return None
        path = self.folder / f"{key}.safetensors"
        try:
            tensors = parse_tensors(path.read_bytes(), key)
        except FileNotFoundError:
            return None
        except Exception as e:  # a damaged file: compute again and rewrite
            warnings.warn(f"{path}: damaged vision-feature cache entry ({type(e).__name__}: {e}); computing the "
                          "features again", stacklevel=2)
            return None
        entry = tuple(tensors.values())
        self._remember(key, entry)
        return entry

    def _store(self, key: str, entry: tuple[torch.Tensor, ...]) -> None:
        self._remember(key, entry)
        if self.folder is not None:
            tensors = {"features": entry[0], **{f"deepstack.{i}": t for i, t in enumerate(entry[1:])}}
            try:
                atomic_write_bytes(self.folder / f"{key}.safetensors", dump_tensors(tensors, key))
            except OSError as e:  # a full disk costs the disk copy, not the run
                warnings.warn(f"cannot write vision features to {self.folder} ({e}); keeping them in memory only",
                              stacklevel=2)
                self.folder = None

    # -- the batch ------------------------------------------------------------------------
    def swap_pixels(self, model: nn.Module, inputs: dict, autocast=contextlib.nullcontext) -> dict:
        """`inputs` with `pixel_values` (and `image_keys`) replaced by `mm_encoder_outputs` built from
        the cache; images it does not hold go through `model.get_image_features` first.

        Args:
            model: the model being trained, unwrapped from DDP (a peft model is fine).
            autocast: the mixed-precision context the model's forward runs in, so that the features
                come out as they would inside forward.
        """
        inputs = dict(inputs)
        keys_tensor = inputs.pop("image_keys", None)
        pixels = inputs.get("pixel_values")
        if pixels is None:
            return inputs
        if not self._forward_checked:
            check_forward(model)
            self._forward_checked = True
        grid = inputs["image_grid_thw"]
        if keys_tensor is None:
            keys_tensor = hash_images(pixels, grid)
        keys = [row.numpy().tobytes().hex() for row in keys_tensor.cpu()]
        entries = {key: self._lookup(key) for key in dict.fromkeys(keys)}
        missing = [key for key, entry in entries.items() if entry is None]
        self.hits += len(keys) - sum(keys.count(k) for k in missing)
        if missing:
            self._compute(model, pixels, grid, keys, missing, entries, autocast)
        device = pixels.device
        chosen = [entries[key] for key in keys]
        features = tuple(e[0].to(device, non_blocking=True) for e in chosen)
        del inputs["pixel_values"]
        if len(chosen[0]) > 1:  # Qwen3-VL: DeepStack features, one tuple of per-image tensors per layer
            from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

            layers = range(len(chosen[0]) - 1)
            deepstack = [tuple(e[1 + i].to(device, non_blocking=True) for e in chosen) for i in layers]
            output = BaseModelOutputWithDeepstackFeatures(pooler_output=features, deepstack_features=deepstack)
        else:
            from transformers.modeling_outputs import BaseModelOutputWithPooling

            output = BaseModelOutputWithPooling(pooler_output=features)
        inputs["mm_encoder_outputs"] = {"image": output}
        return inputs

    def _compute(self, model, pixels, grid, keys, missing, entries, autocast) -> None:
        rows = grid.prod(-1).tolist()
        starts = [sum(rows[:i]) for i in range(len(rows))]
        first = [keys.index(key) for key in missing]  # one copy of each missing image
        selected = torch.cat([pixels[starts[i]: starts[i] + rows[i]] for i in first])
        with torch.no_grad(), autocast():
            out = model.get_image_features(selected, grid[first], return_dict=True)
        deepstack = getattr(out, "deepstack_features", None) or []
        for j, key in enumerate(missing):
            # copies: a slice would keep the whole batch's output alive and break the size bound
            entry = tuple(t[j].detach().to("cpu", copy=True) for t in (out.pooler_output, *deepstack))
            entries[key] = entry
            self._store(key, entry)
        self.computed += len(missing)

    def summary(self) -> str:
        per = f", {human_bytes(self.bytes / len(self.memory))} per image" if self.memory else ""
        disk = f"; also on disk in {self.folder}" if self.folder is not None else ""
        return (f"vision feature cache: {len(self.memory)} images, {human_bytes(self.bytes)} in memory (limit "
                f"{human_bytes(self.max_bytes)}{per}); {self.computed} computed, {self.hits} reused, "
                f"{self.evicted} dropped by the limit{disk}")


class VisionCacheReport(TrainerCallback):
    """Prints the cache's size and counters at the end of every epoch and of training."""

    def __init__(self, cache: VisionFeatureCache):
        self.cache = cache

    def on_epoch_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            print(self.cache.summary(), flush=True)

    def on_train_end(self, args, state, control, **kwargs):
        self.on_epoch_end(args, state, control, **kwargs)
