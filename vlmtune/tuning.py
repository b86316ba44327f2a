"""Which parameters train: freeze flags, LoRA/DoRA/QLoRA adapters, and per-part learning rates.

The model has three parts, located by the family's parameter-name prefixes: the vision tower,
the projector and the language model. With `method: full`, a part trains unless frozen. With
LoRA, the base weights stay fixed, adapters go on `lora.targets` (default: the language model's
attention and MLP projections), and an unfrozen vision tower or projector is trained fully and
saved with the adapter (peft's `modules_to_save`, as MiniCPM-V's `tune_vision` does).
"""

from __future__ import annotations

import re
from collections import Counter

import torch
from torch import nn

from vlmtune.config import LoraConfig, TrainConfig
from vlmtune.errors import ConfigError
from vlmtune.models.family import Family

PARTS = ("vision", "projector", "llm")


def frozen_parts(train: TrainConfig) -> set[str]:
    """The parts (of `PARTS`) that `train`'s freeze flags keep fixed."""
    return {part for part, frozen in (("vision", train.freeze_vision), ("projector", train.freeze_projector),
                                      ("llm", train.freeze_llm)) if frozen}


def whole_modules(model: nn.Module, family: Family, part: str) -> list[str]:
    """The fewest module names that together hold exactly the parameters of `part`.

    Module lists are split into their items, because peft's `modules_to_save` wrapper cannot
    stand in for a container that the model iterates over.
    """
    def all_in(module: nn.Module, prefix: str) -> bool:
        names = [f"{prefix}.{n}" if prefix else n for n, _ in module.named_parameters()]
        return bool(names) and all(family.part_of(n) == part for n in names)

    found: list[str] = []

    def walk(module: nn.Module, prefix: str) -> None:
        if prefix and all_in(module, prefix) and not isinstance(module, (nn.ModuleList, nn.ModuleDict)):
            found.append(prefix)
            return
        for name, child in module.named_children():
            walk(child, f"{prefix}.{name}" if prefix else name)

    walk(model, "")
    return found


def lora_target_names(model: nn.Module, family: Family, lora: LoraConfig, frozen: set[str]) -> list[str]:
    """Full names of the linear layers that get adapters, honouring `freeze_*` flags."""
    targets = lora.targets if lora.targets is not None else family.lora_targets
    if isinstance(targets, str):
        pattern = re.compile(targets)
        match = lambda name: pattern.fullmatch(name) is not None  # noqa: E731
    else:
        match = lambda name: any(name == t or name.endswith("." + t) for t in targets)  # noqa: E731
    names = [name for name, module in model.named_modules()
             if match(name) and isinstance(module, nn.Linear) and family.part_of(name + ".weight") not in frozen]
    if not names:
        raise ConfigError(f"lora.targets {targets!r} matches no linear layer outside the frozen parts "
                          f"({', '.join(sorted(frozen)) or 'none'}); check the module names with "
                          "`python -c \"from transformers import AutoModelForImageTextToText as A; "
                          "print(A.from_pretrained('MODEL'))\"`")
    return names


def prepare_model(model: nn.Module, family: Family, train: TrainConfig, lora: LoraConfig,
                  gradient_checkpointing: bool = False) -> nn.Module:
    """Set requires_grad for full training, or wrap the model with peft adapters."""
    frozen = frozen_parts(train)
    if train.method == "full":
        if frozen >= set(PARTS):
            raise ConfigError("train.freeze_vision, freeze_projector and freeze_llm are all true: nothing would train")
        for name, param in model.named_parameters():
            param.requires_grad = family.part_of(name) not in frozen
        return model

    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model, prepare_model_for_kbit_training

    if train.method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    save = list(lora.modules_to_save)
    for part in ("vision", "projector"):
        if part not in frozen:
            save += whole_modules(model, family, part)
    peft_config = PeftLoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias="none",
        target_modules=lora_target_names(model, family, lora, frozen), modules_to_save=save or None,
        use_dora=train.method == "dora", task_type="CAUSAL_LM")
    return get_peft_model(model, peft_config)


def upcast_trainable(model: nn.Module) -> int:
    """Cast every trainable parameter to fp32 and return how many were cast.

    For fp16 runs: an fp16 weight cannot take a small update (at lr 1e-6, most N(0, 0.02) weights do
    not change at all) and the fp16 gradient scaler refuses fp16 gradients, so what trains is kept in
    fp32 while frozen weights stay fp16 and autocast computes in fp16, as mixed precision intends."""
    cast = 0
    for param in model.parameters():
        if param.requires_grad and param.dtype == torch.float16:
            param.data = param.data.float()
            cast += 1
    return cast


def trainable_summary(model: nn.Module, family: Family) -> str:
    """e.g. 'trainable 1.2M of 2.2B parameters (0.05%): llm 1.2M'."""
    total, per_part = 0, Counter()
    for name, param in model.named_parameters():
        n = param.numel()
        total += n
        if param.requires_grad:
            per_part[family.part_of(name)] += n
    trainable = sum(per_part.values())
    fmt = lambda n: f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"  # noqa: E731
    parts = ", ".join(f"{part} {fmt(n)}" for part, n in per_part.most_common())
    return f"trainable {fmt(trainable)} of {fmt(total)} parameters ({100 * trainable / max(total, 1):.2f}%): {parts}"


def param_groups(model: nn.Module, family: Family, train: TrainConfig, decay_names: set[str]) -> list[dict]:
    """Optimizer groups: one learning rate per part (vision_lr, projector_lr), weight decay split."""
    lr_of = {"vision": train.vision_lr, "projector": train.projector_lr}
    groups: dict[tuple[float, bool], list[torch.Tensor]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lr = lr_of.get(family.part_of(name)) or train.learning_rate
        groups.setdefault((lr, name in decay_names), []).append(param)
    return [{"params": params, "lr": lr, "weight_decay": train.weight_decay if decay else 0.0}
            for (lr, decay), params in groups.items()]
