"""Fine-tune a vision-language model.

    vlmtune train configs/qwen2_vl_latex_ocr.yaml train.max_steps=200
    accelerate launch -m vlmtune.train configs/qwen2_vl_latex_ocr.yaml        # several GPUs
    torchrun --nproc_per_node 2 -m vlmtune.train configs/demo.yaml             # or torchrun

Reads straight down: config -> processor -> data (pre-flight checked) -> model -> adapters ->
Trainer -> save. The loop is transformers' Trainer (accelerate, DeepSpeed and FSDP underneath);
vlmtune adds the collator, the per-part optimizer groups and complete checkpoints.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint

from vlmtune.callbacks import CompleteCheckpoints, JsonlMetrics
from vlmtune.config import RunConfig, load_config, save_config
from vlmtune.data.check import CheckReport, apply_policy, check_samples
from vlmtune.data.collate import Collator, EncodedDataset, LengthGroupedSampler
from vlmtune.data.encode import Encoder
from vlmtune.data.encode_cache import EncodeCache
from vlmtune.data.packing import PackingCollator, check_packable, check_packing_attention, pack_length, packed_dataset
from vlmtune.data.sample import Sample
from vlmtune.errors import ConfigError
from vlmtune.kernels import resolve_attention, resolve_liger
from vlmtune.models import family_for
from vlmtune.models.family import read_model_type
from vlmtune.models.load import load_model, load_processor, model_class, pick_dtype, resolve_model_path
from vlmtune.tracking import start_trackers
from vlmtune.tuning import param_groups, prepare_model, trainable_summary, upcast_trainable
from vlmtune.vision_cache import VisionCacheReport, VisionFeatureCache, check_config


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def log(message: str) -> None:
    if is_main_process():
        print(message, flush=True)


class VLMTrainer(Trainer):
    """`Trainer` with four additions: optimizer groups per model part (vision_lr, projector_lr),
    length-grouped batches when `train_lengths` (tokens per training sample) is given,
    generation on a fixed validation subset at every evaluation, its task metrics logged as
    `val_<metric>` and its (image, prediction, reference) triples sent to the trackers, and
    reuse of frozen vision features when `vision_cache` is given."""

    def __init__(self, *args, family=None, run_config: RunConfig | None = None, encoder: Encoder | None = None,
                 gen_samples: list[Sample] | None = None, train_lengths: list[int] | None = None,
                 vision_cache: VisionFeatureCache | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.family = family
        self.run_config = run_config
        self.encoder = encoder
        self.gen_samples = gen_samples or []
        self.train_lengths = train_lengths
        self.vision_cache = vision_cache

    def compute_loss(self, model, inputs, *args, **kwargs):
        if self.vision_cache is not None:  # pixels -> cached image features (vlmtune/vision_cache.py)
            inputs = self.vision_cache.swap_pixels(self.accelerator.unwrap_model(model), inputs,
                                                   self.accelerator.autocast)
        return super().compute_loss(model, inputs, *args, **kwargs)

    def _get_train_sampler(self, train_dataset=None):
        if self.train_lengths is None:
            return super()._get_train_sampler(train_dataset)
        # The lengths come from the pre-flight check, so grouping costs no pass over the data.
        batch = self.args.train_batch_size * self.args.gradient_accumulation_steps
        return LengthGroupedSampler(self.train_lengths, batch, seed=self.args.seed)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            model = model or self.model
            decay = set(self.get_decay_parameter_names(model))
            groups = param_groups(model, self.family, self.run_config.train, decay)
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
            optimizer_kwargs.pop("lr", None)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def evaluate(self, *args, **kwargs):
        metrics = super().evaluate(*args, **kwargs)
        if self.gen_samples and self.is_world_process_zero():
            from vlmtune.evaluate import generate, score
            from vlmtune.tracking import log_predictions

            c = self.run_config.eval
            predictions = generate(self.model, self.encoder, self.gen_samples, c.batch_size, c.max_new_tokens,
                                   progress=False)
            gen_metrics, rows = score(c.task or "generic", self.gen_samples, predictions)
            self.log({f"val_{k}": v for k, v in gen_metrics.items()})
            log_predictions(self, rows, self.state.global_step)
            metrics.update({f"val_{k}": v for k, v in gen_metrics.items()})
        return metrics


def split_val(samples: list[Sample], size: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """A reproducible validation split: `size` samples (>= 1) or a fraction (< 1)."""
    n_val = int(size) if size >= 1 else round(size * len(samples))
    if n_val <= 0:
        return samples, []
    if n_val >= len(samples):
        raise ConfigError(f"data.val_size={size} leaves no training samples (the file has {len(samples)})")
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed)).tolist()
    val_idx = set(order[:n_val])
    return [s for i, s in enumerate(samples) if i not in val_idx], [samples[i] for i in sorted(val_idx)]


def load_data(config: RunConfig) -> tuple[list[Sample], list[Sample]]:
    from vlmtune.data.formats import load_samples

    if not config.data.train:
        raise ConfigError("data.train is not set: give the training file, e.g. data.train=data/train.json")
    train = load_samples(config.data.train, config.data.format)
    if config.data.val:
        return train, load_samples(config.data.val, config.data.format)
    return split_val(train, config.data.val_size, config.data.seed)


def preflight(samples: list[Sample], encoder: Encoder, config: RunConfig, out: Path,
              name: str) -> tuple[list[Sample], list[int] | None]:
    """The samples to train on, and their token lengths as the check measured them (None if unknown)."""
    report = check_samples(samples, encoder, config.data.max_length, progress=is_main_process())
    log(f"{name} data: {report.summary()}")
    kept = apply_policy(samples, report, config.data.on_bad_sample, out / f"rejected_{name}.jsonl")
    return kept, kept_lengths(report)


def kept_lengths(report: CheckReport) -> list[int] | None:
    """Token lengths of the samples `apply_policy` keeps (those without problems), in order.

    `check_samples` lists a length for every sample that is sound and encodes, too-long ones
    included; None if the counts disagree, i.e. if it stopped working that way."""
    kinds: dict[int, set[str]] = {}
    for p in report.problems:
        kinds.setdefault(p.index, set()).add(p.kind)
    measured = [i for i in range(report.n_samples) if kinds.get(i, set()) <= {"too long"}]
    if len(measured) != len(report.token_lengths):
        return None
    return [n for i, n in zip(measured, report.token_lengths) if i not in kinds]


def training_arguments(config: RunConfig, out: Path, has_val: bool, use_liger: bool = False) -> TrainingArguments:
    t = config.train
    dtype = pick_dtype(config.model.dtype)
    cpu_ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    report_to = t.report_to or ["none"]
    eval_strategy = "no" if not has_val else ("steps" if t.eval_steps else "epoch")
    return TrainingArguments(
        output_dir=str(out),
        run_name=t.run_name or out.name,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.learning_rate,
        weight_decay=t.weight_decay,
        adam_beta2=t.adam_beta2,
        warmup_steps=t.warmup_ratio,  # transformers 5: a float < 1 is a fraction of the steps
        lr_scheduler_type=t.lr_scheduler,
        max_grad_norm=t.max_grad_norm,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        eval_strategy=eval_strategy,
        eval_steps=t.eval_steps,
        eval_on_start=t.eval_on_start and has_val,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,  # autocast + loss scaling; the trained weights are fp32 (upcast_trainable)
        activation_checkpointing=t.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        dataloader_pin_memory=torch.cuda.is_available(),
        dataloader_num_workers=config.data.num_workers,
        remove_unused_columns=False,
        label_names=["labels"],
        report_to=report_to,
        seed=t.seed,
        deepspeed=t.deepspeed,
        # Several processes without CUDA (torchrun on CPU): accelerate sets up gloo DDP only when told
        # to use the CPU; otherwise each process trains its own copy, with no gradient all-reduce.
        use_cpu=cpu_ddp,
        ddp_backend="gloo" if cpu_ddp else None,
        ddp_find_unused_parameters=False,
        save_only_model=False,
        # packed batches have no attention mask to count by, and no padding either
        include_num_input_tokens_seen="all" if config.data.packing else "non_padding",
        use_liger_kernel=use_liger,  # the Trainer applies Liger to the unwrapped model (vlmtune/kernels.py)
    )


def resume_point(config: RunConfig, out: Path) -> str | None:
    t = config.train
    if isinstance(t.resume, str):
        if not Path(t.resume).is_dir():
            raise ConfigError(f"train.resume={t.resume}: no such checkpoint folder")
        return t.resume
    last = get_last_checkpoint(str(out)) if out.is_dir() else None
    if t.resume:
        if last is None:
            log(f"train.resume=true but {out} holds no checkpoint yet: starting from the beginning")
        return last
    if last is not None:
        raise ConfigError(f"{out} already holds checkpoints ({Path(last).name}). Set train.resume=true to continue "
                          "that run, or choose a new train.output_dir.")
    return None


def train(config: RunConfig, callbacks: list[TrainerCallback] | None = None) -> Path:
    """Run one fine-tuning job described by `config`; returns the run folder.

    Args:
        callbacks: extra `TrainerCallback`s (bench/train_speed.py times the steps with one).
    """
    out = Path(config.train.output_dir)
    resume_from = resume_point(config, out)
    path = resolve_model_path(config.model.name_or_path, config.model.hub, config.model.revision)
    family = family_for(path)
    check_config(config, family)  # train.cache_vision_features: refused before anything loads
    if config.data.packing:  # refused before anything loads, as are kernels that cannot run here
        check_packable(family.name)
        pack_length(config.data)
    dtype = pick_dtype(config.model.dtype)
    attention, attention_why = resolve_attention(config.model.attn_implementation, dtype, model_class(path, family))
    use_liger, liger_why = resolve_liger(config.train.liger_kernel, read_model_type(path))
    processor = load_processor(path, family, config.data.min_pixels, config.data.max_pixels,
                               config.model.trust_remote_code, config.data.max_slice_nums)
    encoder = Encoder(processor, family, prompt=config.data.prompt, system_prompt=config.data.system_prompt,
                      image_size=tuple(config.data.image_size) if config.data.image_size else None,
                      max_length=config.data.max_length)

    out.mkdir(parents=True, exist_ok=True)
    train_samples, val_samples = load_data(config)
    train_samples, train_lengths = preflight(train_samples, encoder, config, out, "train")
    if val_samples:
        val_samples, _ = preflight(val_samples, encoder, config, out, "val")
    if is_main_process():
        save_config(config, out)

    quantization = "4bit" if config.train.method == "qlora" else None
    # Seed before the adapters are created: their random init must follow train.seed, not
    # whatever ran before in this process (Trainer seeds only once the model exists).
    set_seed(config.train.seed)
    model = load_model(path, dtype, quantization, config.model.trust_remote_code, attention)
    if config.data.max_slice_nums and family.native:  # saved folders must agree with their processor
        model.config.set_max_slice_nums(config.data.max_slice_nums)
    log(f"attention: {model.config._attn_implementation} ({attention_why}); "
        f"Liger kernels: {'on' if use_liger else 'off'} ({liger_why})")
    if config.data.packing:
        check_packing_attention(model.config._attn_implementation)
    model = prepare_model(model, family, config.train, config.lora, config.train.gradient_checkpointing)
    if dtype == torch.float16:
        upcast_trainable(model)
    log(f"model {config.model.name_or_path} ({family.name}), method {config.train.method}: "
        f"{trainable_summary(model, family)}")
    vision_cache = None
    if config.train.cache_vision_features:
        vision_cache = VisionFeatureCache.for_model(model, family, config.train, out)
        log(vision_cache.summary())

    if is_main_process():
        start_trackers(config, out)
    pad_id = processor.tokenizer.pad_token_id
    if pad_id is None:
        pad_id = processor.tokenizer.eos_token_id
    callbacks = [JsonlMetrics(out / "metrics.jsonl"), CompleteCheckpoints(config, processor), *(callbacks or [])]
    if vision_cache is not None:
        callbacks.append(VisionCacheReport(vision_cache))
    cache = EncodeCache(config.data.cache_dir, encoder) if config.data.cache_dir else None
    keys = vision_cache is not None
    train_data = EncodedDataset(train_samples, encoder, cache=cache, image_keys=keys)
    collator = Collator(pad_id, concat_dims=family.concat_dims)
    if config.data.packing:  # vlmtune/data/packing.py
        train_data, packing_summary = packed_dataset(train_data, train_lengths, pack_length(config.data),
                                                     config.train.seed)
        log(packing_summary)
        collator = PackingCollator(processor.image_processor.merge_size)
    trainer = VLMTrainer(
        model=model,
        args=training_arguments(config, out, bool(val_samples), use_liger),
        train_dataset=train_data,
        eval_dataset=EncodedDataset(val_samples, encoder, cache=cache, image_keys=keys) if val_samples else None,
        data_collator=collator,
        callbacks=callbacks,
        family=family,
        run_config=config,
        encoder=encoder,
        gen_samples=val_samples[: config.eval.num_samples],
        train_lengths=train_lengths if config.data.group_by_length and not config.data.packing else None,
        vision_cache=vision_cache,
    )
    trainer.train(resume_from_checkpoint=resume_from)

    final = out / "final"
    trainer.save_model(str(final))
    if is_main_process():
        processor.save_pretrained(final)
        save_config(config, final)
        log(f"done: run folder {out}, final weights in {final}")
    return out


def train_command(config: str, overrides: list[str]) -> int:
    """Fine-tune a model from a YAML config, with dotted key=value overrides.

    Args:
        config: YAML config file (see configs/); its sections are model, data, lora, train, eval.
        overrides: Dotted overrides such as train.max_steps=100 lora.r=8 (unknown keys are an error).
    """
    train(load_config(config, overrides))
    return 0


if __name__ == "__main__":  # `torchrun -m vlmtune.train CONFIG [key=value ...]`
    from vlmtune.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
