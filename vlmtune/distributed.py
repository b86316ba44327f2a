"""What vlmtune adds so that several processes train a vision-language model together: the vision
pass on batches without images, and the FSDP settings of `train.fsdp`.

    torchrun --nproc_per_node 8 -m vlmtune.train CONFIG train.freeze_vision=false
    accelerate launch -m vlmtune.train CONFIG train.fsdp=configs/fsdp/full_shard.json

**Batches without images.** A text-only batch never calls the vision tower. Under DDP, the rank
that drew it leaves every trainable vision parameter without a gradient and DDP stops ("Expected to
have finished reduction in the prior iteration"); under DeepSpeed ZeRO-3 and FSDP, that rank skips
the all-gathers of the vision tower's parameters the other ranks wait in, and the run hangs. So while
training, a batch without image (or video) tokens still runs the vision tower and projector on one
blank image, at the point of the forward where real images go (right after the token embeddings,
before the language model: every rank then issues the same collectives in the same order), and its
output, times zero, is added to the token embeddings. The embeddings, the loss and every gradient
stay what they were (x + 0.0 is x); each vision parameter gets a gradient of zero, not none.

The blank image is encoded by the run's own processor, and `get_image_features`, the method the
model's forward itself calls on images, runs it: nothing family-specific is written here. A family
says whether this applies (`Family.dummy_vision_pass`: "hook" here, "model" where vlmtune's own model
code does it, None where neither works). A batch with fewer images than another rank's needs nothing:
the images it has run through every vision parameter.

Only training batches get it, never generation (whose decoding steps carry no image tokens) and so
not evaluation either: under ZeRO-3 or FSDP an evaluation-loss batch without images on some ranks
only can still stall; give every validation sample an image there, or leave data.val out.

`VLMTUNE_NO_VISION_PASS=1` leaves the pass out. It exists for one purpose: the tests' negative
control, which shows that the same DDP run without it fails.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

import torch
from torch import nn

from vlmtune.config import TrainConfig
from vlmtune.errors import ConfigError, VlmtuneError
from vlmtune.models.family import Family, placeholder_token_ids

DISABLE_ENV = "VLMTUNE_NO_VISION_PASS"
BLANK_SIDE = 32  # px; processors enlarge it to their smallest image (Qwen: min_pixels, e.g. 56x56 = 4 tokens)


def distributed() -> bool:
    """Several processes are training together (torch.distributed is set up with more than one)."""
    return (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1)


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under peft's wrapper (the one whose methods the forward calls)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _tensors(value) -> list[torch.Tensor]:
    """Every floating tensor in a model output (ModelOutput, tuple, list or tensor), nested ones too."""
    if isinstance(value, torch.Tensor):
        return [value] if value.is_floating_point() else []
    if isinstance(value, dict):  # ModelOutput is a dict
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def blank_image_inputs(processor, model: nn.Module) -> dict[str, torch.Tensor]:
    """What `model.get_image_features` takes for one blank image, as the run's image processor encodes it.

    Raises:
        VlmtuneError: the image processor or `get_image_features` cannot take it.
    """
    from PIL import Image

    image_processor = getattr(processor, "image_processor", None)
    if image_processor is None or not hasattr(model, "get_image_features"):
        raise VlmtuneError(f"{type(model).__name__} has no image processor or get_image_features")
    encoded = image_processor(images=[Image.new("RGB", (BLANK_SIDE, BLANK_SIDE))], return_tensors="pt")
    tensors = {k: v for k, v in encoded.items() if isinstance(v, torch.Tensor)}
    params = inspect.signature(model.get_image_features).parameters
    named = [n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    if named:  # a signature to go by; else (a forwarding `*args, **kwargs`) pass everything
        missing = [n for n, p in params.items() if n in named and p.default is p.empty and n not in tensors]
        if missing:
            raise VlmtuneError(f"the image processor gives {sorted(tensors)}, not {missing}")
        tensors = {k: v for k, v in tensors.items() if k in named}
    return tensors


class VisionPass:
    """The zero-contribution vision pass (module docstring), as a forward hook on the input embeddings:
    it reads the token ids going in and, for a training batch without image or video tokens, adds
    `0 * sum(get_image_features(blank image))` to the embeddings coming out.

    Active while the model trains and either a vision or projector parameter trains or several
    processes train (their parameters may be sharded: ZeRO-3 and FSDP gather them even when frozen).

    Args:
        model: the model as the Trainer gets it (peft-wrapped or not), trainable flags already set.
        family: says which parameters are the vision tower and the projector.
        processor: the run's processor; encodes the blank image.
    """

    def __init__(self, model: nn.Module, family: Family, processor):
        self.model = _unwrap(model)
        self.ids = placeholder_token_ids(self.model.config)
        self.vision_trains = any(p.requires_grad and family.part_of(n) in ("vision", "projector")
                                 for n, p in model.named_parameters())
        self.runs = 0  # text-only training batches it has run on
        self.problem: str | None = None
        self.inputs: dict[str, torch.Tensor] = {}
        try:
            if not self.ids:
                raise VlmtuneError(f"{type(self.model.config).__name__} names no image token id")
            self.inputs = blank_image_inputs(processor, self.model)
        except Exception as e:  # noqa: BLE001 - any failure means: no pass for this model; said when it matters
            self.problem = f"{type(e).__name__}: {e}"
        self.handle = self.model.get_input_embeddings().register_forward_hook(self._after_embeddings)

    def remove(self) -> None:
        self.handle.remove()

    def _active(self, module: nn.Module) -> bool:
        return module.training and torch.is_grad_enabled() and (self.vision_trains or distributed())

    def _after_embeddings(self, module: nn.Module, args: tuple, output: torch.Tensor):
        ids = args[0] if args else None
        if not self._active(module) or not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point:
            return None
        if torch.isin(ids, torch.tensor(self.ids, device=ids.device)).any():
            return None  # the forward runs the vision tower on the real images
        if self.problem is not None:
            if distributed():
                raise ConfigError(
                    f"a training batch has no image, and vlmtune cannot run this model's vision tower on a blank "
                    f"image to keep the processes in step ({self.problem}). Under several processes that run would "
                    "fail or hang: keep train.freeze_vision and train.freeze_projector true (with DDP), or give "
                    "every sample an image, or train on one process.")
            return None  # one process needs no pass: a missing gradient there is just no update
        inputs = {k: v.to(output.device, output.dtype if v.is_floating_point() else v.dtype)
                  for k, v in self.inputs.items()}
        features = _tensors(self.model.get_image_features(**inputs))
        self.runs += 1
        zero = sum(f.float().sum() for f in features) * 0.0
        return output + zero.to(output.dtype)


def install_vision_pass(model: nn.Module, family: Family | None, processor) -> VisionPass | None:
    """The `VisionPass` on `model` where the family asks vlmtune for one (`dummy_vision_pass: "hook"`),
    unless `VLMTUNE_NO_VISION_PASS=1`; else None."""
    if family is None or family.dummy_vision_pass != "hook" or processor is None:
        return None
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        return None
    return VisionPass(model, family, processor)


# --- FSDP ------------------------------------------------------------------------------------

def fsdp_settings(train: TrainConfig, cuda: bool | None = None) -> dict | None:
    """transformers' `fsdp_config` read from the JSON file `train.fsdp` names; None without one.

    Args:
        cuda: whether GPUs train (default: whether torch sees CUDA).

    Raises:
        ConfigError: no GPU (accelerate runs FSDP on GPUs only and would quietly fall back to DDP),
            the file is missing or not a JSON mapping, DeepSpeed is asked for too, or the method is
            QLoRA (4-bit weights are not sharded by these configs).
    """
    if not train.fsdp:
        return None
    where = f"train.fsdp={train.fsdp}"
    if not (torch.cuda.is_available() if cuda is None else cuda):
        raise ConfigError(f"{where}: FSDP needs GPUs (accelerate runs it on CUDA devices only; here it would quietly "
                          "train with DDP instead). Remove train.fsdp to train with DDP on CPU.")
    if train.deepspeed:
        raise ConfigError(f"{where} and train.deepspeed={train.deepspeed}: choose one engine (set the other to null)")
    if train.method == "qlora":
        raise ConfigError(f"{where}: QLoRA's 4-bit weights are not sharded by vlmtune's FSDP configs; use one GPU, "
                          "DDP (no train.fsdp) or train.deepspeed=configs/deepspeed/zero2.json")
    path = Path(train.fsdp)
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{where}: no such file (vlmtune ships configs/fsdp/full_shard.json, "
                          "shard_grad_op.json and full_shard_offload.json)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(settings, dict):
        raise ConfigError(f"{where}: expected a JSON object of FSDP settings (transformers' fsdp_config)")
    version = settings.get("version", 2)
    if version not in (1, 2):
        raise ConfigError(f"{where}: version {version!r}; FSDP versions are 1 and 2 (2: FSDP2, fully_shard)")
    return settings
