"""GRPO rewards: the task metrics, scored per sampled answer, and a user's own functions.

    rewards = load_rewards({"render_match": 1.0, "cer": 0.5}, task="latex")
    scores = score_rewards(rewards, completions, samples)   # {name: [one float per completion]}

Built-in rewards (each in [0, 1] except cider; strings normalised as `eval.task` normalises them,
so a reward agrees with what `vlmtune eval` reports):

exact_match   1 if the answer equals a reference
cer           1 - CER, floored at 0 (CER can exceed 1)
render_match  1 if mathtext draws the answer as a reference (LaTeX; `metrics/latex_render.py`)
cider         CIDEr-D of the answer against its references, idf over the training set's reference
              sets (as self-critical sequence training does); in [0, 10]
bleu4         smoothed sentence BLEU-4
format        the share of three checks passed: not empty, no word 3-gram repeated, length in
              grpo.format_length characters

A user's reward is `module:function`, imported by name and called as
`function(completions: list[str], references: list[list[str]], samples: list[Sample]) -> list[float]`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from vlmtune.data.sample import Sample
from vlmtune.errors import ConfigError
from vlmtune.metrics.bleu import sentence_bleu
from vlmtune.metrics.cider import cider_d
from vlmtune.metrics.latex import latex_tokens, normalize_latex
from vlmtune.metrics.latex_render import render_match
from vlmtune.metrics.text import caption_tokens, levenshtein, normalize_answer, normalize_text, word_tokens

BUILT_IN = ("exact_match", "cer", "render_match", "cider", "bleu4", "format")
RewardFn = Callable[[list[str], list[list[str]], list[Sample]], list[float]]

# per task: how answers are normalised, and tokenised for BLEU/CIDEr (as metrics/tasks.py does)
_NORMALISE = {"ocr": normalize_text, "latex": normalize_latex, "caption": lambda s: " ".join(caption_tokens(s)),
              "generic": normalize_answer}
_TOKENS = {"ocr": word_tokens, "latex": latex_tokens, "caption": caption_tokens, "generic": word_tokens}


@dataclass
class Reward:
    name: str
    weight: float
    fn: RewardFn


def exact_match(completions: list[str], references: list[list[str]], task: str = "generic") -> list[float]:
    norm = _NORMALISE[task]
    return [float(norm(c) in {norm(r) for r in refs}) for c, refs in zip(completions, references, strict=True)]


def one_minus_cer(completions: list[str], references: list[list[str]], task: str = "generic") -> list[float]:
    norm = _NORMALISE[task]
    out = []
    for c, refs in zip(completions, references, strict=True):
        pred = norm(c)
        rates = [levenshtein(pred, norm(r)) / max(1, len(norm(r))) for r in refs]
        out.append(max(0.0, 1.0 - min(rates)))
    return out


def render(completions: list[str], references: list[list[str]]) -> list[float]:
    return [float(render_match(c, refs)[0]) for c, refs in zip(completions, references, strict=True)]


def cider(completions: list[str], references: list[list[str]], corpus: list[list[str]] | None = None) -> list[float]:
    """Args: corpus: the reference sets the idf comes from (None: `references`)."""
    tokenised = [[caption_tokens(r) for r in refs] for refs in corpus] if corpus is not None else None
    return cider_d([caption_tokens(c) for c in completions],
                   [[caption_tokens(r) for r in refs] for refs in references], corpus=tokenised)[1]


def bleu4(completions: list[str], references: list[list[str]], task: str = "generic") -> list[float]:
    norm, tokens = _NORMALISE[task], _TOKENS[task]
    return [sentence_bleu(tokens(norm(c)), [tokens(norm(r)) for r in refs])
            for c, refs in zip(completions, references, strict=True)]


def format_reward(completions: list[str], length: tuple[int, int] = (1, 512)) -> list[float]:
    out = []
    for c in completions:
        words = c.split()
        grams = [tuple(words[i: i + 3]) for i in range(len(words) - 2)]
        checks = (bool(c.strip()), len(grams) == len(set(grams)), length[0] <= len(c) <= length[1])
        out.append(sum(checks) / len(checks))
    return out


def _user_reward(name: str) -> RewardFn:
    module_name, _, function = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"grpo.rewards: cannot import {module_name!r} for reward {name!r} ({e}); put the module on "
                          "PYTHONPATH or next to where you run vlmtune") from None
    fn = getattr(module, function, None)
    if not callable(fn):
        raise ConfigError(f"grpo.rewards: {module_name} has no function {function!r} (reward {name!r})")
    return fn


def load_rewards(weights: dict[str, float], task: str | None = None, format_length: tuple[int, int] = (1, 512),
                 corpus: list[list[str]] | None = None) -> list[Reward]:
    """The rewards `grpo.rewards` names, with their weights.

    Args:
        corpus: the training set's reference sets, one per distinct prompt (CIDEr's idf).

    Raises:
        ConfigError: an unknown built-in name, or a `module:function` that does not import.
    """
    task = task or "generic"
    built_in: dict[str, RewardFn] = {
        "exact_match": lambda c, r, s: exact_match(c, r, task),
        "cer": lambda c, r, s: one_minus_cer(c, r, task),
        "render_match": lambda c, r, s: render(c, r),
        "cider": lambda c, r, s: cider(c, r, corpus),
        "bleu4": lambda c, r, s: bleu4(c, r, task),
        "format": lambda c, r, s: format_reward(c, tuple(format_length)),
    }
    rewards = []
    for name, weight in weights.items():
        if ":" in name:
            rewards.append(Reward(name, weight, _user_reward(name)))
        elif name in built_in:
            rewards.append(Reward(name, weight, built_in[name]))
        else:
            raise ConfigError(f"grpo.rewards: unknown reward {name!r}; built-in ones are {', '.join(BUILT_IN)}, "
                              "or name your own as module:function")
    return rewards


def score_rewards(rewards: list[Reward], completions: list[str], samples: list[Sample],
                  references: list[list[str]] | None = None) -> dict[str, list[float]]:
    """Each reward's score of each completion (completion i answers samples[i], whose accepted
    answers are references[i]; default: the sample's own answer).

    Raises:
        ConfigError: a user reward that returns the wrong number of scores.
    """
    references = references if references is not None else [[s.answer()] for s in samples]
    scores = {}
    for reward in rewards:
        values = [float(v) for v in reward.fn(completions, references, samples)]
        if len(values) != len(completions):
            raise ConfigError(f"grpo.rewards: {reward.name} returned {len(values)} scores for {len(completions)} "
                              "completions; return one float per completion")
        scores[reward.name] = values
    return scores


def total_reward(rewards: list[Reward], scores: dict[str, list[float]]) -> list[float]:
    """The weighted sum of the rewards, per completion."""
    n = len(next(iter(scores.values())))
    return [sum(r.weight * scores[r.name][i] for r in rewards) for i in range(n)]
