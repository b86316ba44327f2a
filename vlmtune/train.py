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
from transformers import TrainerCallback, set_seed

from vlmtune.callbacks import JsonlMetrics
from vlmtune.checkpoints import Checkpoint, checkpoints, inspect, newest_complete, trainer_state
from vlmtune.config import CONFIG_NAME, RunConfig, check_stream, load_config, save_config
from vlmtune.data.collate import Collator, EncodedDataset
from vlmtune.data.encode_cache import EncodeCache
from vlmtune.data.packing import PackingCollator, check_packable, check_packing_attention, pack_length, packed_dataset
from vlmtune.data.load import data_cache_root, load_data
from vlmtune.data.stream import training_stream
from vlmtune.distributed import fsdp_settings
from vlmtune.errors import ConfigError
from vlmtune.fileio import clean_stale_temps
from vlmtune.kernels import resolve_liger
from vlmtune.parts import run_parts
from vlmtune.rl.run import train_objective
from vlmtune.run_guard import DivergenceGuard, GracefulStop, GuardedSamples
from vlmtune.runlock import RunLock, describe_previous
from vlmtune.scoring import first_items
from vlmtune.tracking import start_trackers
from vlmtune.train_parts import kept_lengths  # noqa: F401  (re-exported: moved there from here)
from vlmtune.train_parts import is_main_process, log, preflight, run_trainer, training_arguments
from vlmtune.trainer import VLMTrainer
from vlmtune.tuning import prepare_model, trainable_summary, upcast_trainable
from vlmtune.vision_cache import VisionCacheReport, VisionFeatureCache, check_config


FINISHED = "finished"


def resume_point(config: RunConfig, out: Path) -> Checkpoint | str | None:
    """Where this run starts: a complete checkpoint, None (from the beginning), or FINISHED.

    A new run never starts in a folder that holds one (final/, metrics.jsonl or checkpoints): that
    would mix two runs. `train.resume=true` takes the newest complete checkpoint and names the
    incomplete ones it passed over; on a finished run it continues only if train.max_steps or
    train.epochs now ask for more.
    """
    t = config.train
    if isinstance(t.resume, str):
        folder = Path(t.resume)
        if not folder.is_dir():
            raise ConfigError(f"train.resume={t.resume}: no such checkpoint folder")
        chosen = inspect(folder)
        if not chosen.complete:
            raise ConfigError(f"train.resume={t.resume}: the checkpoint is incomplete ({chosen.problem}); "
                              "choose another one, or train.resume=true for the newest complete one")
        return chosen
    last, skipped = newest_complete(out)
    finished = (out / "final").is_dir()
    if not t.resume:
        held = [name for name in ("final", "metrics.jsonl") if (out / name).exists()]
        found = checkpoints(out)
        held += [f"checkpoints up to {found[-1].path.name}"] if found else []
        if held:
            raise ConfigError(f"{out} already holds a run ({', '.join(held)}). Set train.resume=true to continue it, "
                              "or choose a new train.output_dir.")
        return None
    for ckpt in skipped:
        log(f"skipping {ckpt.path}: incomplete ({ckpt.problem})")
    if finished and not asks_for_more(config, out, last):
        return FINISHED
    if last is None:
        if finished:
            raise ConfigError(f"{out} is finished and holds no complete checkpoint to continue from; "
                              "start a new run with a new train.output_dir")
        log(f"train.resume=true but {out} holds no checkpoint yet: starting from the beginning")
    return last


def asks_for_more(config: RunConfig, out: Path, last: Checkpoint | None) -> bool:
    """Whether `config` trains past where the finished run in `out` stopped."""
    t = config.train
    if last is None:  # only final/ is left: compare with the config it was trained with
        done = load_config(out / "final" / CONFIG_NAME).train if (out / "final" / CONFIG_NAME).is_file() else t
        return (t.max_steps, t.epochs) != (done.max_steps, done.epochs)
    state = trainer_state(last.path)
    if t.max_steps > 0:
        return t.max_steps > state.get("global_step", 0)
    return t.epochs > state.get("epoch", 0.0) + 1e-9


def train(config: RunConfig, callbacks: list[TrainerCallback] | None = None) -> Path:
    """Run one fine-tuning job described by `config`; returns the run folder.

    The main process holds the run folder's lock (`vlmtune/runlock.py`) from start to end.

    Args:
        callbacks: extra `TrainerCallback`s (bench/train_speed.py times the steps with one).
    """
    fsdp_settings(config.train)  # a bad train.fsdp is refused before anything loads
    check_stream(config)  # so is what a stream cannot do (data.stream)
    out = Path(config.train.output_dir)
    lock = RunLock(out).acquire() if is_main_process() else None
    try:
        if lock is not None and describe_previous(lock):
            log(describe_previous(lock))
        for path in clean_stale_temps(out) if is_main_process() else []:
            log(f"removed {path}, left half-written by a process that died")
        return _train(config, out, callbacks)
    finally:
        if lock is not None:
            lock.release()


def _train(config: RunConfig, out: Path, callbacks: list[TrainerCallback] | None) -> Path:
    resume_from = resume_point(config, out)
    if resume_from == FINISHED:
        log(f"{out} is finished (final/ is written); nothing to do. Raise train.max_steps or train.epochs "
            "to train it further.")
        return out
    if config.train.objective != "sft":  # DPO and GRPO: the same run, another loss (vlmtune/rl/)
        return train_objective(config, out, resume_from, callbacks)
    if config.data.packing:  # refused before anything loads
        pack_length(config.data)
    parts = run_parts(config, training=True)  # model folder, family, dtype, attention; config.json read once
    family, dtype = parts.family, parts.dtype
    check_config(config, family)  # what the family cannot do is refused before its processor loads
    if config.data.packing:
        check_packable(family.name)
    use_liger, liger_why = resolve_liger(config.train.liger_kernel, parts.model_type)
    processor, encoder = parts.processor, parts.encoder

    out.mkdir(parents=True, exist_ok=True)
    train_samples, val_samples = load_data(config, data_cache_root(config, out), progress=is_main_process())
    stream = None
    if config.data.stream:  # read as it arrives, each rank its own part; checked on a sample first (data/stream.py)
        stream = training_stream(config, encoder, out / "rejected_train.jsonl", int(os.environ.get("RANK", "0")),
                                 int(os.environ.get("WORLD_SIZE", "1")), log)
        train_lengths = None
    else:
        train_samples, train_lengths = preflight(train_samples, encoder, config, out, "train")
    if val_samples:
        val_samples, _ = preflight(val_samples, encoder, config, out, "val")
    if is_main_process():
        save_config(config, out)

    quantization = "4bit" if config.train.method == "qlora" else None
    # Seed before the adapters are created: their random init must follow train.seed, not
    # whatever ran before in this process (Trainer seeds only once the model exists).
    set_seed(config.train.seed)
    model = parts.load_model(quantization)
    log(f"attention: {model.config._attn_implementation} ({parts.attention_why}); "
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
    stopper = GracefulStop(log)
    callbacks = [JsonlMetrics(out / "metrics.jsonl"), stopper, *(callbacks or [])]
    if vision_cache is not None:
        callbacks.append(VisionCacheReport(vision_cache))
    cache = EncodeCache(config.data.cache_dir, encoder) if config.data.cache_dir else None
    keys = vision_cache is not None
    policy = config.data.on_bad_sample
    if stream is not None:
        train_data = stream
    else:
        train_data = GuardedSamples(EncodedDataset(train_samples, encoder, cache=cache, image_keys=keys),
                                    train_samples, policy, out / "rejected_train.jsonl",
                                    substitute=not config.data.packing)
    collator = Collator(parts.pad_id, concat_dims=family.concat_dims)
    if config.data.packing:  # vlmtune/data/packing.py
        train_data, packing_summary = packed_dataset(train_data, train_lengths, pack_length(config.data),
                                                     config.train.seed)
        log(packing_summary)
        collator = PackingCollator(processor.image_processor.merge_size)
    eval_data = None
    if val_samples:
        eval_data = GuardedSamples(EncodedDataset(val_samples, encoder, cache=cache, image_keys=keys), val_samples,
                                   policy, out / "rejected_val.jsonl")
    trainer = VLMTrainer(
        model=model,
        args=training_arguments(config, out, bool(val_samples), use_liger),
        train_dataset=train_data,
        eval_dataset=eval_data,
        data_collator=collator,
        callbacks=callbacks,
        family=family,
        run_config=config,
        encoder=encoder,
        processor=processor,
        gen_samples=first_items(val_samples, config.eval.num_samples),
        train_lengths=train_lengths if config.data.group_by_length and not config.data.packing else None,
        vision_cache=vision_cache,
        guard=DivergenceGuard(config.train.max_loss_spike, fp16_scaling=dtype == torch.float16, log=log),
    )
    return run_trainer(trainer, config, out, resume_from, stopper, 'Fix or remove that record (or set data.on_bad_sample=skip)')


def train_command(config: str, overrides: list[str], trust_remote_code: bool = False) -> int:
    """Fine-tune a model from a YAML config, with dotted key=value overrides.

    Args:
        config: YAML config file (see configs/); its sections are model, data, lora, train, dpo, grpo, eval.
        overrides: Dotted overrides such as train.max_steps=100 lora.r=8 (unknown keys are an error).
        trust_remote_code: Run the Python files of the model folder (read them first); a config alone never enables it.
    """
    from vlmtune.config import remote_code_flag

    train(remote_code_flag(load_config(config, overrides), trust_remote_code, config))
    return 0


if __name__ == "__main__":  # `torchrun -m vlmtune.train CONFIG [key=value ...]`
    from vlmtune.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
