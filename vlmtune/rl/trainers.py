"""`VLMTrainer` with the DPO or the GRPO loss: the loop, optimizer groups, checkpoints (with
vlmtune.yaml, written whole or not at all) and divergence guard are SFT's; only `compute_loss`
differs.

The reference model is the policy with its adapters switched off when only adapters train (LoRA,
DoRA, QLoRA: no second copy in memory), otherwise a frozen copy loaded from the same weights.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import replace

import torch

from vlmtune.data.collate import Collator
from vlmtune.data.encode import with_answer_tokens
from vlmtune.data.sample import Sample
from vlmtune.generation import Sampling, complete
from vlmtune.rl.losses import dpo_loss, group_advantages, grpo_loss, sequence_logps, token_logps
from vlmtune.rl.rewards import Reward, score_rewards, total_reward
from vlmtune.trainer import VLMTrainer
from vlmtune.tracking import log_predictions

TRIPLES_PER_LOG = 4  # (image, completion, reward) rows sent to the trackers per logging step


def adapters_only(model) -> bool:
    """True when every trainable parameter is an adapter's, so switching the adapters off gives
    the reference model."""
    if not hasattr(model, "disable_adapter"):
        return False
    return all("lora_" in name or "modules_to_save" in name
               for name, p in model.named_parameters() if p.requires_grad)


class _Objective(VLMTrainer):
    """What both objectives add: a reference model, a loss normalised per micro-batch (so the
    Trainer divides it by the gradient accumulation steps), and extra metrics in each log line."""

    def __init__(self, *args, ref_model=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.ref_model = ref_model
        if ref_model is not None:
            self.ref_model = ref_model.to(self.args.device).eval()
        self.loss_is_scaled_for_ga = False
        self._stats: dict[str, list[float]] = defaultdict(list)

    def _reference(self, model):
        """The reference model to call, as a context: the frozen copy, or the policy without adapters."""
        if self.ref_model is not None:
            return contextlib.nullcontext(self.ref_model)
        unwrapped = self.accelerator.unwrap_model(model)

        @contextlib.contextmanager
        def disabled():
            with unwrapped.disable_adapter():
                yield model
        return disabled()

    def _record(self, stats: dict) -> None:
        if self.model.training:
            for key, value in stats.items():
                self._stats[key].append(float(value))

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs and self._stats:  # a training log line: add the means since the last one
            logs.update({k: sum(v) / len(v) for k, v in self._stats.items()})
            self._stats.clear()
        super().log(logs, *args, **kwargs)


def _forward(model, inputs: dict) -> torch.Tensor:
    return model(**{k: v for k, v in inputs.items() if k != "labels"}).logits


class DPOTrainer(_Objective):
    """DPO on batches from `PairCollator`: rows [0, B) chosen, [B, 2B) rejected."""

    def __init__(self, *args, beta: float = 0.1, label_smoothing: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.beta, self.label_smoothing = beta, label_smoothing

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        policy = sequence_logps(_forward(model, inputs), labels)
        with torch.no_grad(), self._reference(model) as ref:
            reference = sequence_logps(_forward(ref, inputs), labels)
        n = len(labels) // 2
        loss, stats = dpo_loss(policy[:n], policy[n:], reference[:n], reference[n:], self.beta, self.label_smoothing)
        self._record(stats)
        return (loss, {}) if return_outputs else loss


class GRPOTrainer(_Objective):
    """GRPO: each batch holds prompt indices; for each prompt `num_generations` answers are
    sampled with vlmtune's batched generation, scored by the rewards, and trained on with
    group-relative advantages. Evaluation (model.eval()) computes SFT's loss on the references.

    Args:
        prompts: the training prompts the batches' indices point at (one per distinct image + question).
        references: the accepted answers of each prompt.
    """

    def __init__(self, *args, prompts: list[Sample], references: list[list[str]], rewards: list[Reward], num_generations: int = 4,
                 temperature: float = 1.0, max_new_tokens: int = 32, beta: float = 0.0, scale_rewards: bool = True,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.prompts, self.references, self.rewards = prompts, references, rewards
        self.num_generations, self.temperature, self.max_new_tokens = num_generations, temperature, max_new_tokens
        self.beta, self.scale_rewards = beta, scale_rewards
        # sampled answers are scored as they come out, whatever their length: never refused for data.max_length
        self.answer_encoder = replace(self.encoder, max_length=None)
        self.collate = Collator(self.encoder.tokenizer.pad_token_id if self.encoder.tokenizer.pad_token_id is not None
                                else self.encoder.tokenizer.eos_token_id, concat_dims=self.family.concat_dims)
        self._triples: list[dict] = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:  # evaluation: cross-entropy of the references, as in SFT
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        group = self.num_generations
        indices = inputs["index"].tolist()
        samples = [self.prompts[i] for i in indices]
        asked = [s for s in samples for _ in range(group)]
        references = [self.references[i] for i in indices for _ in range(group)]
        prompts = [self.answer_encoder.encode_prompt(s) for s in samples]
        completions = complete(self.accelerator.unwrap_model(model), self.encoder,
                               [p for p in prompts for _ in range(group)], self.max_new_tokens,
                               Sampling(temperature=self.temperature))
        texts = [c.text for c in completions]
        scores = score_rewards(self.rewards, texts, asked, references)
        rewards = torch.tensor(total_reward(self.rewards, scores), dtype=torch.float32)
        advantages = group_advantages(rewards, group, self.scale_rewards).to(self.args.device)

        # the policy is scored on exactly the tokens it sampled: an answer cut off at max_new_tokens gets no
        # end-of-turn token it never chose (trained as one, a low reward would teach it not to stop)
        rows = [with_answer_tokens(prompts[k // group], c.token_ids) for k, c in enumerate(completions)]
        batch = self.collate(rows)
        batch = self._prepare_inputs(batch)
        logps, mask = token_logps(_forward(model, batch), batch["labels"])
        ref_logps = None
        if self.beta > 0:
            with torch.no_grad(), self._reference(model) as ref:
                ref_logps, _ = token_logps(_forward(ref, batch), batch["labels"])
        loss, stats = grpo_loss(logps, mask, advantages, ref_logps, self.beta)

        stats.update({"reward": rewards.mean().item(), "reward_std": rewards.view(-1, group).std(dim=1).mean().item(),
                      "completion_length": sum(c.completion_tokens for c in completions) / len(completions)})
        for name, values in scores.items():
            t = torch.tensor(values)
            stats[f"rewards/{name}/mean"], stats[f"rewards/{name}/std"] = t.mean().item(), t.std().item()
        self._record(stats)
        self._triples = [{"images": s.images, "prediction": t, "reference": refs[0], "references": refs,
                          "scores": {"reward": r, **{name: v[i] for name, v in scores.items()}}}
                         for i, (s, t, refs, r) in enumerate(zip(asked, texts, references, rewards.tolist()))
                         ][:TRIPLES_PER_LOG]
        return (loss, {}) if return_outputs else loss

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs and self._triples and self.is_world_process_zero():
            log_predictions(self, self._triples, self.state.global_step, tag="train", folder="completions")
            self._triples = []
        super().log(logs, *args, **kwargs)
