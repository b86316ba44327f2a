"""Faster kernels when they are installed and the device supports them: flash-attention and Liger.

`vlmtune train` resolves both once, before the model loads, and logs one line saying what was
chosen for each and why. Nothing here is required: without flash-attn or liger-kernel (CPU machines,
`pip install vlmtune` without extras) training runs on transformers' sdpa attention and its own
loss, as before.

- `model.attn_implementation: auto` is flash_attention_2 when the `flash_attn` package imports, a
  CUDA device is present and the weights are bf16 or fp16 (the kernel has no fp32 path); otherwise
  transformers' default for the model (sdpa where the model supports it). Naming
  flash_attention_2 where those do not hold is a clear error instead of a failure at load time.
- `train.liger_kernel: auto` (the default) turns on Liger when `liger_kernel` imports, a CUDA
  device is present (its kernels are Triton GPU kernels) and Liger has kernels for the model type
  (for Qwen2-VL: fused linear cross-entropy, so the logits are never materialised, RMSNorm, SwiGLU,
  the vision blocks' LayerNorm). `true` (YAML's `on` too) makes any of those missing an error;
  `false` turns it off. transformers' Trainer applies it (`TrainingArguments(use_liger_kernel=True)`
  calls Liger's `_apply_liger_kernel_to_instance` on the unwrapped model).
"""

from __future__ import annotations

import importlib

import torch

from vlmtune.errors import ConfigError

FLASH = "flash_attention_2"


def _import(name: str):
    """(module, None) when `name` imports here, else (None, why not)."""
    try:
        return importlib.import_module(name), None
    except ModuleNotFoundError as e:
        if e.name and (name == e.name or name.startswith(e.name + ".")):
            return None, "not installed"
        return None, f"does not import: {e}"
    except Exception as e:  # a broken install raises more than ImportError (OSError for CUDA libraries)
        return None, f"does not import: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"


def _version(distribution: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return "?"


def flash_attention_support(dtype: torch.dtype) -> tuple[bool, str]:
    """Whether flash-attention 2 can run here with weights of `dtype`, and why (not)."""
    module, error = _import("flash_attn")
    if module is None:
        return False, f"flash-attn {error} (pip install flash-attn --no-build-isolation)"
    if not torch.cuda.is_available():
        return False, "no CUDA device (flash-attn runs on NVIDIA GPUs only)"
    if dtype not in (torch.float16, torch.bfloat16):
        return False, f"weights are {str(dtype).removeprefix('torch.')} (flash-attn needs bf16 or fp16: model.dtype)"
    return True, f"flash-attn {_version('flash-attn')} imports, CUDA device, {str(dtype).removeprefix('torch.')}"


def resolve_attention(setting: str | None, dtype: torch.dtype, model_class: type | None = None) -> tuple[str | None, str]:
    """The `attn_implementation` to load the model with (None: transformers' default), and why.

    Args:
        model_class: the class that will load the model; `auto` picks flash-attention only where that
            class says it supports it (about a fifth of transformers' image-text models do not).

    Raises:
        ConfigError: flash_attention_2 asked for where it cannot run.
    """
    if setting is None:
        return None, "model.attn_implementation=null: transformers' default"
    if setting == "auto":
        if model_class is not None and not getattr(model_class, "_supports_flash_attn", False):
            return None, f"auto: transformers' default, since {model_class.__name__} does not support flash-attention"
        ok, why = flash_attention_support(dtype)
        return (FLASH, f"auto: {why}") if ok else (None, f"auto: transformers' default, since {why}")
    if setting == FLASH:
        ok, why = flash_attention_support(dtype)
        if not ok:
            raise ConfigError(f"model.attn_implementation=flash_attention_2 cannot run here: {why}. "
                              "Use model.attn_implementation=auto (or sdpa).")
        return FLASH, why
    return setting, f"model.attn_implementation={setting}"


def liger_model_types() -> set[str]:
    """The model types the installed Liger has kernels for (the table its Trainer hook reads)."""
    from liger_kernel.transformers import monkey_patch

    return set(getattr(monkey_patch, "MODEL_TYPE_TO_APPLY_LIGER_FN", {}))


def resolve_liger(setting: bool | str, model_type: str) -> tuple[bool, str]:
    """Whether to train with Liger kernels (`train.liger_kernel`: True, False or "auto"), and why (not).

    Raises:
        ConfigError: True where Liger is not installed, there is no CUDA device, or Liger has no
            kernels for `model_type`.
    """
    if setting is False:
        return False, "train.liger_kernel=false"
    module, error = _import("liger_kernel.transformers")
    if module is None:
        why = f"liger-kernel {error} (pip install 'vlmtune[liger]')"
    elif not torch.cuda.is_available():
        why = "no CUDA device (Liger's kernels are Triton GPU kernels)"
    elif model_type not in liger_model_types():
        why = f"Liger has no kernels for model type {model_type!r}"
    else:
        return True, f"liger-kernel {_version('liger-kernel')} imports, CUDA device, kernels for {model_type}"
    if setting is True:
        raise ConfigError(f"train.liger_kernel=true cannot run here: {why}. Use train.liger_kernel=auto or false.")
    return False, f"auto: off, since {why}"
