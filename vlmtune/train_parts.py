"""What every training objective's run shares: the pre-flight check of its data, the Trainer's
arguments, the command that resumes it, and a save on the way out.

    from vlmtune.train_parts import preflight, training_arguments

`vlmtune/train.py` (SFT) and `vlmtune/rl/run.py` (DPO, GRPO) both build their runs from these, so
a run's arguments, checks and messages are the same whatever it optimises.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import TrainingArguments

from vlmtune.config import CONFIG_NAME, RunConfig
from vlmtune.data.check import CheckReport, apply_policy
from vlmtune.data.check_cache import cached_check
from vlmtune.data.encode import Encoder
from vlmtune.data.load import data_cache_root
from vlmtune.data.sample import Sample
from vlmtune.checkpoints import newest_complete
from vlmtune.distributed import fsdp_settings
from vlmtune.models.load import pick_dtype


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def log(message: str) -> None:
    if is_main_process():
        print(message, flush=True)


def preflight(samples: list[Sample], encoder: Encoder, config: RunConfig, out: Path,
              name: str) -> tuple[list[Sample], list[int] | None]:
    """The samples to train on, and their token lengths as the check measured them (None if unknown)."""
    report = cached_check(samples, encoder, config.data.max_length, data_cache_root(config, out),
                          deep=config.data.deep_check, num_proc=config.data.num_proc, progress=is_main_process(), log=log)
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
        logging_nan_inf_filter=False,  # a NaN loss is logged as NaN (and stops the run), never hidden
        report_to=report_to,
        seed=t.seed,
        deepspeed=t.deepspeed,
        fsdp=bool(t.fsdp), fsdp_config=fsdp_settings(t),  # vlmtune/distributed.py reads and checks train.fsdp
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


def resume_command(config: RunConfig) -> str:
    """The command that continues this run from its newest complete checkpoint."""
    out = Path(config.train.output_dir)
    launcher = " (under the same torchrun/accelerate launcher)" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    remote = " --trust-remote-code" if config.model.trust_remote_code else ""
    return f"vlmtune train {out / CONFIG_NAME} train.resume=true{remote}{launcher}"


def save_now(trainer, out: Path) -> str:
    """Save a checkpoint of the current step (unless one exists); says what is there to resume from."""
    step = trainer.state.global_step
    if step > 0 and not (out / f"checkpoint-{step}").is_dir():
        trainer._save_checkpoint(trainer.model, None)
    last, _ = newest_complete(out)
    return f"Saved {last.path} (step {last.step})." if last else "No step had finished, so no checkpoint was saved."


def run_trainer(trainer, config: RunConfig, out: Path, resume_from, stopper, fix: str) -> Path:
    """Train (from `resume_from`, a complete checkpoint, or from the start), then write `final/`:
    the end every objective's run shares. A bad sample saves a checkpoint and says how to resume
    (`fix`: what to do about the record); Ctrl-C or SIGTERM (`stopper`, a `GracefulStop`) stops
    with the resume command.

    Raises:
        BadSampleError: a record failed mid-run under data.on_bad_sample=error.
        Stopped: a signal ended the run before its last step.
    """
    import signal

    from vlmtune.checkpoints import trim_metrics
    from vlmtune.errors import BadSampleError, Stopped

    if resume_from is not None:
        dropped = trim_metrics(out / "metrics.jsonl", resume_from.step) if is_main_process() else 0
        log(f"resuming from {resume_from.path} (step {resume_from.step})"
            + (f"; dropped {dropped} metrics.jsonl record(s) logged after it" if dropped else ""))
    elif is_main_process():
        trim_metrics(out / "metrics.jsonl", 0)  # a run that died before its first checkpoint
    stopper.install()
    try:
        trainer.train(resume_from_checkpoint=str(resume_from.path) if resume_from else None)
    except BadSampleError as e:
        saved = save_now(trainer, out)
        raise BadSampleError(f"{e}. {saved} {fix}, then resume with: {resume_command(config)}") from None
    finally:
        stopper.uninstall()
    step = trainer.state.global_step
    if stopper.signum is not None and step < trainer.state.max_steps:
        last, _ = newest_complete(out)
        raise Stopped(f"{signal.Signals(stopper.signum).name} at step {step} of {trainer.state.max_steps}: saved "
                      f"{last.path if last else 'no checkpoint'}. Resume with: {resume_command(config)}",
                      stopper.exit_code)
    trainer.save_final(out / "final")
    log(f"done: run folder {out}, final weights in {out / 'final'}")
    return out
