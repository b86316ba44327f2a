"""DPO and GRPO runs: `vlmtune train CONFIG train.objective=dpo|grpo`.

    vlmtune train configs/qwen2_vl_latex_ocr_dpo.yaml
    vlmtune train configs/qwen2_vl_latex_ocr_grpo.yaml train.resume=true

`vlmtune/train.py` hands a run here once it knows where it starts (`resume_point`); the rest
reads straight down as SFT's does: parts -> data (pre-flight checked) -> model -> adapters ->
reference -> Trainer -> save. What differs from SFT is the data (pairs for DPO; prompts with
reference answers for GRPO) and the loss (`vlmtune/rl/trainers.py`); the loop, `train.method`
and freeze flags, trackers, checkpoints with vlmtune.yaml and resume are SFT's.

TRL's DPOTrainer and GRPOTrainer are not used: they need a `datasets.Dataset` of raw records
that they tokenise with their own collators (truncating, and masking the chat template's
answer differently from vlmtune's SFT encoding), and they patch the model's LM head. vlmtune
keeps its own encoding and checkpoints and computes the same losses (`vlmtune/rl/losses.py`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import TrainerCallback, set_seed

from vlmtune.callbacks import JsonlMetrics
from vlmtune.checkpoints import Checkpoint
from vlmtune.config import RunConfig, save_config
from vlmtune.data.check import apply_policy
from vlmtune.data.collate import Collator, EncodedDataset
from vlmtune.data.load import data_cache_root, load_data
from vlmtune.data.preference import PairCollator, PairDataset, check_pairs, load_pairs
from vlmtune.errors import ConfigError
from vlmtune.parts import RunParts, run_parts
from vlmtune.rl.rewards import load_rewards
from vlmtune.rl.trainers import DPOTrainer, GRPOTrainer, adapters_only
from vlmtune.run_guard import DivergenceGuard, GracefulStop
from vlmtune.scoring import first_items, group_items
from vlmtune.tracking import start_trackers
from vlmtune.train_parts import is_main_process, log, preflight, run_trainer, training_arguments
from vlmtune.tuning import prepare_model, trainable_summary, upcast_trainable


def check_objective(config: RunConfig) -> None:
    """Settings DPO and GRPO do not take, refused before anything loads.

    Raises:
        ConfigError: packing, the vision feature cache, or DPO with data.val_size.
    """
    objective = config.train.objective
    if config.data.packing:
        raise ConfigError(f"data.packing=true: train.objective={objective} compares whole answers per row; "
                          "set data.packing=false")
    if config.train.cache_vision_features:
        raise ConfigError(f"train.cache_vision_features=true is for SFT; set it false for train.objective={objective}")
    if objective == "dpo" and config.data.val_size and not config.data.val:
        raise ConfigError("data.val_size: DPO reads preference pairs and does not split them; give data.val "
                          "(a preference file) or set data.val_size=0")


class IndexDataset(torch.utils.data.Dataset):
    """GRPO's training data: the positions of the prompts; the trainer samples their answers."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {"index": torch.tensor(i)}


def collate_indices(batch: list[dict]) -> dict[str, torch.Tensor]:
    return {"index": torch.stack([item["index"] for item in batch])}


def reference_model(model, parts: RunParts, quantization: str | None):
    """None when the policy without its adapters is the reference; else a frozen copy of the
    starting weights (full training, or a trainable vision tower beside the adapters)."""
    if adapters_only(model):
        return None
    ref = parts.load_model(quantization)
    ref.requires_grad_(False)
    return ref.eval()


def train_objective(config: RunConfig, out: Path, resume_from: Checkpoint | None,
                    callbacks: list[TrainerCallback] | None) -> Path:
    """Train `config` with train.objective dpo or grpo in `out`, from `resume_from` if given."""
    objective = config.train.objective
    check_objective(config)
    parts = run_parts(config, training=True)
    family, processor, encoder, dtype = parts.family, parts.processor, parts.encoder, parts.dtype

    out.mkdir(parents=True, exist_ok=True)
    if objective == "dpo":
        train_pairs = _checked_pairs(load_pairs(config.data.train, config.data.format), encoder, config, out, "train")
        val_pairs = _checked_pairs(load_pairs(config.data.val, config.data.format), encoder, config, out, "val") \
            if config.data.val else []
        val_samples = [p.chosen for p in val_pairs]
    else:
        train_samples, val_samples = load_data(config, data_cache_root(config, out), progress=is_main_process())
        train_samples, _ = preflight(train_samples, encoder, config, out, "train")
        if val_samples:
            val_samples, _ = preflight(val_samples, encoder, config, out, "val")
        # one prompt per distinct image + question, all its records' answers accepted (COCO's five captions)
        items = group_items(train_samples)
        references = [item.references for item in items]
        rewards = load_rewards(config.grpo.rewards, config.eval.task, tuple(config.grpo.format_length), references)
    if is_main_process():
        save_config(config, out)

    quantization = "4bit" if config.train.method == "qlora" else None
    set_seed(config.train.seed)
    model = parts.load_model(quantization)
    model = prepare_model(model, family, config.train, config.lora, config.train.gradient_checkpointing)
    if dtype == torch.float16:
        upcast_trainable(model)
    needs_reference = objective == "dpo" or config.grpo.beta > 0
    ref = reference_model(model, parts, quantization) if needs_reference else None
    log(f"model {config.model.name_or_path} ({family.name}), method {config.train.method}, objective {objective}: "
        f"{trainable_summary(model, family)}; reference: "
        + ("none (grpo.beta=0)" if not needs_reference else "a frozen copy" if ref is not None
           else "the model without its adapters"))

    if is_main_process():
        start_trackers(config, out)
    stopper = GracefulStop(log)
    callbacks = [JsonlMetrics(out / "metrics.jsonl"), stopper, *(callbacks or [])]
    args = training_arguments(config, out, bool(val_samples))
    args.prediction_loss_only = True  # evaluation reports the loss (and, below, generation metrics)
    common = dict(model=model, args=args, callbacks=callbacks, family=family, run_config=config, encoder=encoder,
                  processor=processor, gen_samples=first_items(val_samples, config.eval.num_samples), ref_model=ref,
                  guard=DivergenceGuard(config.train.max_loss_spike, fp16_scaling=dtype == torch.float16, log=log))
    if objective == "dpo":
        trainer = DPOTrainer(train_dataset=PairDataset(train_pairs, encoder),
                             eval_dataset=PairDataset(val_pairs, encoder) if val_pairs else None,
                             data_collator=PairCollator(parts.pad_id, family.concat_dims),
                             beta=config.dpo.beta, label_smoothing=config.dpo.label_smoothing, **common)
    else:
        g = config.grpo
        args.include_num_input_tokens_seen = "no"  # batches hold prompt indices, not tokens
        trainer = GRPOTrainer(train_dataset=IndexDataset(len(items)),
                              eval_dataset=EncodedDataset(val_samples, encoder) if val_samples else None,
                              data_collator=_GrpoCollator(Collator(parts.pad_id, concat_dims=family.concat_dims)),
                              prompts=[item.sample for item in items], references=references, rewards=rewards, num_generations=g.num_generations,
                              temperature=g.temperature, max_new_tokens=g.max_new_tokens, beta=g.beta,
                              scale_rewards=g.scale_rewards, **common)

    return run_trainer(trainer, config, out, resume_from, stopper, 'Fix or remove that record')


class _GrpoCollator:
    """Training batches are prompt indices; evaluation batches are encoded samples (SFT's loss)."""

    def __init__(self, collate: Collator):
        self.collate = collate

    def __call__(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        return collate_indices(batch) if "index" in batch[0] else self.collate(batch)


def _checked_pairs(pairs, encoder, config: RunConfig, out: Path, name: str):
    """The pairs to train on: the pre-flight check's report printed, bad pairs an error (or skipped)."""
    report = check_pairs(pairs, encoder, config.data.max_length, progress=is_main_process())
    log(f"{name} pairs: {report.summary()}")
    kept = apply_policy([p.chosen for p in pairs], report, config.data.on_bad_sample, out / f"rejected_{name}.jsonl")
    bad = report.bad_indices
    return [p for i, p in enumerate(pairs) if i not in bad] if len(kept) != len(pairs) else pairs
