"""Typed run configuration: YAML in, dotted `key=value` overrides, unknown keys are an error.

    vlmtune train configs/demo.yaml train.max_steps=50 lora.r=8

The resolved configuration is written as `vlmtune.yaml` into the run folder and every
checkpoint, so later commands (eval, merge, chat) need nothing but that folder.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from vlmtune.errors import ConfigError

CONFIG_NAME = "vlmtune.yaml"


@dataclass
class ModelConfig:
    name_or_path: str = ""  # hub id ("Qwen/Qwen2-VL-2B-Instruct") or local folder
    hub: Literal["hf", "modelscope"] = "hf"  # where hub ids are downloaded from (the seeds use ModelScope)
    revision: str | None = None  # hub revision (branch, tag or commit)
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16/fp16 on GPU, fp32 on CPU
    trust_remote_code: bool = False  # run Python code shipped in the model folder (off unless you ask)
    attn_implementation: str | None = "auto"  # auto: flash_attention_2 if flash-attn, CUDA, bf16/fp16 and the model supports it; else transformers' default (sdpa)


@dataclass
class DataConfig:
    train: str = ""  # training file (JSON, JSONL or CSV, any supported format)
    val: str | None = None  # validation file; None: split val_size samples off the training file
    val_size: float = 0.0  # samples (>= 1) or fraction (< 1) split off `train` when `val` is not given
    format: str | None = None  # minicpm | qwen | messages | llava | csv; None: detected per record
    prompt: str | None = None  # text appended to user turns that hold only images (seed 002's files)
    system_prompt: str | None = None  # system turn added to samples that have none
    max_length: int = 2048  # longest sample in tokens, image tokens included; longer ones are never truncated
    min_pixels: int | None = None  # per-image pixel budget (Qwen families), lower bound
    max_pixels: int | None = None  # per-image pixel budget (Qwen families), upper bound
    max_slice_nums: int | None = None  # most slices per image (MiniCPM-V 2.x, the seeds' 9); None: the checkpoint's
    image_size: list[int] | None = None  # fixed [width, height] resize, e.g. [280, 280] as seed 003
    on_bad_sample: Literal["error", "skip"] = "error"  # skip: train without them, listed in RUN/rejected_train.jsonl
    num_workers: int = 0  # DataLoader worker processes that encode samples
    group_by_length: bool = True  # batch samples of similar token length together (less padding), random otherwise
    packing: bool = False  # samples end to end in one row, kept apart by position ids: no padding (Qwen-VL only)
    pack_length: int | None = None  # tokens per pack (a batch holds train.batch_size packs); None: data.max_length
    seed: int = 0  # seed of the train/val split
    cache_dir: str | None = None  # save encoded samples here (safetensors) and reuse them in later epochs and runs


@dataclass
class LoraConfig:
    r: int = 64  # rank (seeds 002/003: 64)
    alpha: int = 16  # scaling numerator (seeds: 16)
    dropout: float = 0.05
    targets: list[str] | str | None = None  # module names, or a regex; None: the family's default
    modules_to_save: list[str] = field(default_factory=list)  # modules trained fully and saved with the adapter


@dataclass
class TrainConfig:
    method: Literal["lora", "dora", "qlora", "full"] = "lora"
    freeze_vision: bool = True  # keep the vision tower fixed (with LoRA: False trains it fully, as MiniCPM's tune_vision)
    freeze_projector: bool = True  # keep the vision-to-language projector fixed
    freeze_llm: bool = False  # keep the language model fixed (with LoRA: no adapters on it)
    learning_rate: float = 1e-4
    vision_lr: float | None = None  # learning rate of the vision tower; None: learning_rate
    projector_lr: float | None = None  # learning rate of the projector; None: learning_rate
    epochs: float = 2.0
    max_steps: int = -1  # > 0 overrides epochs
    batch_size: int = 4  # per device
    grad_accum: int = 4
    weight_decay: float = 0.0
    adam_beta2: float = 0.999  # AdamW beta2 (the MiniCPM-V seeds use 0.95)
    warmup_ratio: float = 0.0
    lr_scheduler: str = "linear"
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    liger_kernel: bool | Literal["auto"] = "auto"  # Liger's fused kernels; auto: if installed, on CUDA, for this model
    cache_vision_features: bool = False  # frozen vision tower: compute each image's features once, reuse them
    vision_cache_mb: int = 4096  # memory bound of that cache (CPU RAM); least recently used images dropped first
    vision_cache_on_disk: bool = False  # also keep those features in RUN/vision_features/ (read back once dropped)
    logging_steps: int = 10
    save_steps: int = 100
    save_total_limit: int | None = None
    eval_steps: int | None = None  # validation loss every N steps; None: at the end of each epoch
    eval_on_start: bool = False  # also evaluate before the first step (a "before" point on the curves)
    seed: int = 42
    report_to: list[str] = field(default_factory=list)  # tensorboard, swanlab, wandb
    output_dir: str = "runs/run"  # the run folder
    resume: bool | str = False  # true: the newest checkpoint in output_dir; or a checkpoint path
    deepspeed: str | None = None  # DeepSpeed JSON config (configs/deepspeed/zero2.json, zero3.json)
    project: str = "vlmtune"  # tracker project name
    run_name: str | None = None


@dataclass
class EvalConfig:
    task: Literal["ocr", "latex", "caption", "generic"] | None = None  # metrics to compute; None: generic
    max_new_tokens: int | None = None  # None: derived from the references
    batch_size: int = 8
    num_samples: int = 16  # validation samples generated on at every evaluation during training (0: none)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _convert(value, tp, where: str):
    """Check/convert a YAML or command-line value to the field type `tp`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of {tp}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, typing.get_args(tp)))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
        return float(value)  # PyYAML (YAML 1.1) reads 1e-4, with no dot, as a string; learning rates look like that
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is str and isinstance(value, str):
        return value
    raise ConfigError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def _build(cls, data: dict, where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        key = f"{where}.{name}" if where else name
        kwargs[name] = _build(tp, value, key) if dataclasses.is_dataclass(tp) else _convert(value, tp, key)
    return cls(**kwargs)


def _parse_override(item: str) -> tuple[list[str], object]:
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value, e.g. train.max_steps=100")
    key, raw = item.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and key.split(".")[-1] in _STRING_KEYS:
        value = raw  # a run name like 001 stays a string
    return key.split("."), value


_STRING_KEYS = {"run_name", "revision", "project", "output_dir", "name_or_path", "train", "val", "prompt",
                "cache_dir"}


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config and apply dotted `key=value` overrides.

    Raises:
        ConfigError: unreadable file, unknown key, or a value of the wrong type.
    """
    data: dict = {}
    if path is not None:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of sections (model, data, lora, train, eval)")
    for item in overrides or []:
        keys, value = _parse_override(item)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {k} is not a section")
        node[keys[-1]] = value
    try:
        return _build(RunConfig, data, "")
    except ConfigError as e:
        raise ConfigError(f"{path or 'config'}: {e}") from None


def config_to_dict(config: RunConfig) -> dict:
    return dataclasses.asdict(config)


def save_config(config: RunConfig, folder: str | Path) -> Path:
    path = Path(folder) / CONFIG_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False, allow_unicode=True))
    tmp.replace(path)
    return path
