"""Typed run configuration: YAML in, dotted `key=value` overrides, unknown keys are an error.

    vlmtune train configs/demo.yaml train.max_steps=50 lora.r=8

The resolved configuration is written as `vlmtune.yaml` into the run folder and every
checkpoint, so later commands (eval, merge, chat) need nothing but that folder.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from vlmtune.errors import ConfigError
from vlmtune.fileio import atomic_write_text

CONFIG_NAME = "vlmtune.yaml"


@dataclass
class ModelConfig:
    name_or_path: str = ""  # hub id ("Qwen/Qwen2-VL-2B-Instruct") or local folder
    hub: Literal["hf", "modelscope"] = "hf"  # where hub ids are downloaded from (the tutorials use ModelScope)
    revision: str | None = None  # hub revision (branch, tag or commit)
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16/fp16 on GPU, fp32 on CPU
    trust_remote_code: bool = False  # run the model folder's Python code; only `--trust-remote-code` turns it on
    attn_implementation: str | None = "auto"  # auto: flash_attention_2 if flash-attn, CUDA, bf16/fp16 and the model supports it; else transformers' default (sdpa)


@dataclass
class DataConfig:
    train: str = ""  # training file (JSON, JSONL or CSV, any supported format), or a folder of Parquet/Arrow shards; with data.stream, a hub id or shard folder
    val: str | None = None  # validation file; None: split val_size samples off the training file
    val_size: float = 0.0  # images (>= 1) or a fraction of them (< 1) split off `train` when `val` is not given; all records of an image go to one side
    format: str | None = None  # minicpm | qwen | messages | llava | csv; None: detected per record
    prompt: str | None = None  # text appended to user turns that hold only images (seed 002's files)
    system_prompt: str | None = None  # system turn added to samples that have none
    max_length: int = 2048  # longest sample in tokens, image tokens included; longer ones are never truncated
    min_pixels: int | None = None  # per-image pixel budget (Qwen families), lower bound
    max_pixels: int | None = None  # per-image pixel budget (Qwen families), upper bound
    max_slice_nums: int | None = None  # most slices per image (MiniCPM-V 2.x, the tutorials' 9); None: the checkpoint's
    image_size: list[int] | None = None  # fixed [width, height] resize, e.g. [280, 280] as COCO captions (Qwen2-VL)
    on_bad_sample: Literal["error", "skip"] = "error"  # skip: train without them, listed in RUN/rejected_train.jsonl
    num_workers: int = 0  # DataLoader worker processes that encode samples
    group_by_length: bool = True  # batch samples of similar token length together (less padding), random otherwise
    packing: bool = False  # samples end to end in one row, kept apart by position ids: no padding (Qwen-VL only)
    pack_length: int | None = None  # tokens per pack (a batch holds train.batch_size packs); None: data.max_length
    seed: int = 0  # seed of the train/val split
    cache_dir: str | None = None  # save encoded samples here (safetensors) and reuse them in later epochs and runs
    num_proc: int | None = None  # processes that read and pre-flight check the data; None: every core
    deep_check: bool = False  # pre-flight: decode every image fully (finds truncated files) instead of reading headers
    stream: bool = False  # read data.train as a stream: a hub id or local folder in the shard layout (`data prepare --shards`), never stored; each rank reads its own part; needs train.max_steps
    stream_split: str = "train"  # the split of the streamed dataset (data.stream)
    stream_check_samples: int = 200  # data.stream: the pre-flight check runs on each rank's first N records; every record is checked again as it arrives


@dataclass
class LoraConfig:
    r: int = 64  # rank (seeds 002/003: 64)
    alpha: int = 16  # scaling numerator (seeds: 16)
    dropout: float = 0.05
    targets: list[str] | str | None = None  # module names, or a regex; None: the family's default
    modules_to_save: list[str] = field(default_factory=list)  # modules trained fully and saved with the adapter


@dataclass
class TrainConfig:
    objective: Literal["sft", "dpo", "grpo"] = "sft"  # sft: cross-entropy on the answers; dpo: preference pairs (dpo section); grpo: sampled answers scored by rewards (grpo section)
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
    adam_beta2: float = 0.999  # AdamW beta2 (the MiniCPM-V tutorials use 0.95)
    warmup_ratio: float = 0.0
    lr_scheduler: str = "linear"
    max_grad_norm: float = 1.0
    max_loss_spike: float | None = None  # warn when a step's loss exceeds this many times the recent median
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
    resume: bool | str = False  # true: the newest complete checkpoint in output_dir; or a checkpoint path
    deepspeed: str | None = None  # DeepSpeed JSON config (configs/deepspeed/zero2.json, zero3.json)
    fsdp: str | None = None  # FSDP JSON config, transformers' fsdp_config (configs/fsdp/full_shard.json, ...); not with deepspeed
    project: str = "vlmtune"  # tracker project name
    run_name: str | None = None


@dataclass
class DpoConfig:
    beta: float = 0.1  # strength of the pull toward the reference model (TRL's default)
    label_smoothing: float = 0.0  # share of pairs assumed mislabelled (conservative DPO); 0: plain DPO


@dataclass
class GrpoConfig:
    rewards: dict[str, float] = field(default_factory=lambda: {"exact_match": 1.0})  # reward -> weight: exact_match, cer (1 - CER), render_match, cider, bleu4, format, or module:function
    num_generations: int = 4  # answers sampled per prompt (the group)
    temperature: float = 1.0  # sampling temperature of those answers
    max_new_tokens: int = 32  # longest sampled answer
    beta: float = 0.04  # KL coefficient (k3 estimate against the reference model); 0: no reference model
    scale_rewards: bool = True  # divide advantages by the group's reward std (TRL's "group"); false: Dr. GRPO
    format_length: list[int] = field(default_factory=lambda: [1, 512])  # the format reward's allowed answer length in characters [min, max]


@dataclass
class EvalConfig:
    task: Literal["ocr", "latex", "caption", "generic"] | None = None  # metrics to compute; None: generic
    max_new_tokens: int | None = None  # None: derived from the references
    batch_size: int = 8
    num_samples: int = 16  # validation items (distinct image+prompt) generated on at every evaluation during training (0: none)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dpo: DpoConfig = field(default_factory=DpoConfig)
    grpo: GrpoConfig = field(default_factory=GrpoConfig)
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
    if origin is dict:
        if not isinstance(value, dict) or not value:
            raise ConfigError(f"{where}: expected a non-empty mapping, e.g. {{exact_match: 1.0}}, got {value!r}")
        key_tp, value_tp = typing.get_args(tp)
        return {_convert(k, key_tp, f"{where}"): _convert(v, value_tp, f"{where}.{k}") for k, v in value.items()}
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
                "cache_dir", "stream_split"}


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def at_least(low: float) -> tuple[Callable, str]:
    return (lambda v, c: _number(v) and v >= low), f">= {low}"


def above(low: float) -> tuple[Callable, str]:
    return (lambda v, c: _number(v) and v > low), f"> {low}"


def fraction() -> tuple[Callable, str]:
    """0 <= value < 1: a share or a probability that must leave something over."""
    return (lambda v, c: _number(v) and 0 <= v < 1), "in [0, 1)"


def _epochs_ok(value, config: RunConfig) -> bool:
    return (_number(value) and value > 0) or config.train.max_steps > 0


def _max_steps_ok(value, config: RunConfig) -> bool:
    return value == -1 or value > 0


def _min_pixels_ok(value, config: RunConfig) -> bool:
    high = config.data.max_pixels
    return value > 0 and (high is None or value <= high)


def _image_size_ok(value, config: RunConfig) -> bool:
    return len(value) == 2 and all(v > 0 for v in value)


def _length_range_ok(value, config: RunConfig) -> bool:
    return len(value) == 2 and 0 <= value[0] <= value[1]


# The allowed range of every numeric setting, checked once the whole config is built (YAML and
# overrides alike), so a bad value stops `train`, `plan` or `eval` before any model loads, in one
# line that names the key. `None` (unset) always passes: its default applies.
RANGES: tuple[tuple[str, Callable, str], ...] = (
    ("data.val_size", *at_least(0)),
    ("data.max_length", *at_least(1)),
    ("data.min_pixels", _min_pixels_ok, "> 0 and <= data.max_pixels"),
    ("data.max_pixels", *above(0)),
    ("data.max_slice_nums", *at_least(1)),
    ("data.image_size", _image_size_ok, "two positive whole numbers [width, height], e.g. [280, 280]"),
    ("data.num_workers", *at_least(0)),
    ("data.num_proc", *at_least(1)),
    ("data.pack_length", *at_least(1)),
    ("data.stream_check_samples", *at_least(1)),
    ("lora.r", *at_least(1)),
    ("lora.alpha", *above(0)),
    ("lora.dropout", *fraction()),
    ("train.learning_rate", *above(0)),
    ("train.vision_lr", *above(0)),
    ("train.projector_lr", *above(0)),
    ("train.epochs", _epochs_ok, "> 0 (or set train.max_steps > 0)"),
    ("train.max_steps", _max_steps_ok, "-1 (train for train.epochs) or > 0"),
    ("train.batch_size", *at_least(1)),
    ("train.grad_accum", *at_least(1)),
    ("train.weight_decay", *at_least(0)),
    ("train.adam_beta2", *fraction()),
    ("train.warmup_ratio", *fraction()),
    ("train.max_grad_norm", *at_least(0)),
    ("train.max_loss_spike", *above(1)),
    ("train.vision_cache_mb", *at_least(1)),
    ("train.logging_steps", *at_least(1)),
    ("train.save_steps", *at_least(1)),
    ("train.save_total_limit", *at_least(1)),
    ("train.eval_steps", *at_least(1)),
    ("dpo.beta", *above(0)),
    ("dpo.label_smoothing", (lambda v, c: _number(v) and 0 <= v < 0.5), "in [0, 0.5)"),
    ("grpo.num_generations", *at_least(2)),
    ("grpo.temperature", *above(0)),
    ("grpo.max_new_tokens", *at_least(1)),
    ("grpo.beta", *at_least(0)),
    ("grpo.format_length", _length_range_ok, "[min, max] characters with 0 <= min <= max"),
    ("eval.max_new_tokens", *at_least(1)),
    ("eval.batch_size", *at_least(1)),
    ("eval.num_samples", *at_least(0)),
)


def check_ranges(config: RunConfig) -> None:
    """Every value of `RANGES` within its range.

    Raises:
        ConfigError: the first value out of range, as `KEY=VALUE: must be RANGE`.
    """
    for key, ok, allowed in RANGES:
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if value is not None and not ok(value, config):
            raise ConfigError(f"{key}={value!r}: must be {allowed}")


def check_stream(config: RunConfig) -> None:
    """With `data.stream`, refuse what needs the whole training set before the first step: a
    stream has no length and is read once, in order, as it arrives (`vlmtune/data/stream.py`).

    Raises:
        ConfigError: the first such setting, with what to set instead.
    """
    d, t = config.data, config.train
    if not d.stream:
        return
    why = f"data.stream=true (data.train={d.train or '?'} is read as it arrives, so its length and contents are unknown " \
          "before training)"
    refused = [
        (t.max_steps <= 0, "train.epochs cannot be counted: set train.max_steps, the number of optimizer steps "
                           "(the stream starts again from its first record whenever it runs out)"),
        (t.objective != "sft", f"train.objective={t.objective} is not trained from a stream: SFT only; give a file "
                               "or shard folder and set data.stream=false"),
        (d.group_by_length, "data.group_by_length=true batches by the token lengths of the whole set: set "
                            "data.group_by_length=false (batches follow the stream's order)"),
        (d.packing, "data.packing=true plans packs from every sample's token length: set data.packing=false"),
        (d.val_size > 0 and not d.val, f"data.val_size={d.val_size:g} splits images off the whole set: give data.val "
                                       "(a file or shard folder) or set data.val_size=0"),
        (d.cache_dir is not None, "data.cache_dir keeps parsed records, check results and encoded samples of a stored "
                                  "file; a stream is not stored: unset data.cache_dir"),
    ]
    for wrong, what in refused:
        if wrong:
            raise ConfigError(f"{why}: {what}")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config and apply dotted `key=value` overrides.

    Raises:
        ConfigError: unreadable file, unknown key, a value of the wrong type or out of its range.
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
            raise ConfigError(f"{path}: expected a mapping of sections (model, data, lora, train, dpo, grpo, eval)")
    for item in overrides or []:
        keys, value = _parse_override(item)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {k} is not a section")
        node[keys[-1]] = value
    try:
        config = _build(RunConfig, data, "")
        check_ranges(config)
        check_stream(config)
        return config
    except ConfigError as e:
        raise ConfigError(f"{path or 'config'}: {e}") from None


def remote_code_flag(config: RunConfig, flag: bool, source: str | Path) -> RunConfig:
    """Apply `--trust-remote-code` to a config the user gave (`vlmtune train CONFIG`).

    Running a model folder's Python code is a decision made on the command line: a config that
    asks for it without the flag is refused rather than obeyed, since configs get shared.

    Raises:
        ConfigError: the config enables remote code and the flag was not given.
    """
    if config.model.trust_remote_code and not flag:
        raise ConfigError(f"{source}: model.trust_remote_code is true, but only the command line enables remote code: "
                          "read the Python files in the model folder, then pass --trust-remote-code")
    config.model.trust_remote_code = flag
    return config


def saved_remote_code(config: RunConfig, flag: bool, source: str | Path) -> RunConfig:
    """Apply `--trust-remote-code` to a config read from a run or checkpoint folder (eval, predict,
    chat, merge): the flag decides alone; a saved `true` is ignored, with one line saying so, since
    whoever wrote the folder is not the one running the command."""
    if config.model.trust_remote_code and not flag:
        print(f"note: ignoring model.trust_remote_code=true saved in {source}; pass --trust-remote-code to run the "
              "model folder's Python code", file=sys.stderr, flush=True)
    config.model.trust_remote_code = flag
    return config


def config_to_dict(config: RunConfig) -> dict:
    return dataclasses.asdict(config)


def save_config(config: RunConfig, folder: str | Path) -> Path:
    text = yaml.safe_dump(config_to_dict(config), sort_keys=False, allow_unicode=True)
    return atomic_write_text(Path(folder) / CONFIG_NAME, text)
