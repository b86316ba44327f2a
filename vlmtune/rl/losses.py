"""The DPO and GRPO losses, from log-probabilities of the answer tokens.

Both objectives score an answer by the log-probabilities of its tokens, and only of those: the
labels come from the run's `Encoder`, which masks everything but the answers (end-of-turn token
included) exactly as SFT does. The formulas are TRL's (DPOTrainer's "sigmoid" loss; GRPOTrainer's
group-relative advantages, k3 KL estimate and token-level "dapo" normalisation with one policy
update per generation batch), so results can be compared with theirs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vlmtune.data.encode import IGNORE_INDEX


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probability of each label under `logits`, and the mask of answer tokens.

    Position t predicts token t + 1 (the labels shift left by one). Only the answer positions are
    put through log-softmax, so memory grows with the answer tokens, not the vocabulary x sequence.

    Returns:
        (logps [B, T-1], mask [B, T-1]); logps is 0 where mask is False.
    """
    logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != IGNORE_INDEX
    logps = torch.zeros(labels.shape, dtype=torch.float32, device=logits.device)
    picked = logits[mask].float()
    logps[mask] = picked.gather(-1, labels[mask].unsqueeze(-1)).squeeze(-1) - torch.logsumexp(picked, dim=-1)
    return logps, mask


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of the answer tokens' log-probabilities, one per row [B]."""
    logps, _ = token_logps(logits, labels)
    return logps.sum(-1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict]:
    """DPO (sigmoid) loss from summed answer log-probs, and what to log.

        margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
        loss   = mean(-(1 - ls) * logsigmoid(beta * margin) - ls * logsigmoid(-beta * margin))

    Returns:
        (loss, {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
        "logps/chosen", "logps/rejected"}), the rewards being beta * (policy - reference).
    """
    chosen = beta * (policy_chosen - ref_chosen)
    rejected = beta * (policy_rejected - ref_rejected)
    margin = chosen - rejected
    loss = -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
    stats = {"rewards/chosen": chosen.mean().item(), "rewards/rejected": rejected.mean().item(),
             "rewards/margins": margin.mean().item(), "rewards/accuracies": (margin > 0).float().mean().item(),
             "logps/chosen": policy_chosen.mean().item(), "logps/rejected": policy_rejected.mean().item()}
    return loss.mean(), stats


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True) -> torch.Tensor:
    """GRPO's advantages: each reward minus the mean of its group (the `group_size` answers to one
    prompt, consecutive), divided by the group's standard deviation (unbiased) + 1e-4 if `scale`.
    A group whose answers all score the same gets advantage 0: it has nothing to prefer."""
    grouped = rewards.view(-1, group_size)
    advantages = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        advantages = advantages / (grouped.std(dim=1, keepdim=True) + 1e-4)
    return advantages.reshape(-1)


def grpo_loss(logps: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor,
              ref_logps: torch.Tensor | None = None, beta: float = 0.0) -> tuple[torch.Tensor, dict]:
    """GRPO loss over answer tokens, for one policy update per batch of sampled answers.

        ratio = exp(logps - logps.detach())          (1, but carries the policy gradient)
        kl    = exp(ref - logps) - (ref - logps) - 1  (k3 estimate, per token)
        loss  = sum over answer tokens of (-ratio * advantage + beta * kl) / number of answer tokens

    Args:
        logps, mask: from `token_logps` of the sampled answers, [N, T].
        advantages: one per answer [N] (`group_advantages`).
        ref_logps: the reference model's `token_logps` [N, T]; needed when beta > 0.
    """
    per_token = -torch.exp(logps - logps.detach()) * advantages.unsqueeze(1)
    stats = {}
    if beta > 0:
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + beta * kl
        stats["kl"] = ((kl * mask).sum() / mask.sum().clamp(min=1)).item()
    loss = (per_token * mask).sum() / mask.sum().clamp(min=1)
    return loss, stats
