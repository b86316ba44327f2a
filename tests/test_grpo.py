"""GRPO (train.objective=grpo): each built-in reward on fixed examples, weighted combinations and
`module:function` rewards, group-relative advantages and the loss by hand, sampled answers encoded
with SFT's masking, a run whose greedy output moves to the answer its reward prefers, and resume."""

from __future__ import annotations

import math
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import base_overrides, caption_records, read_jsonl, trained_runs, write_json
from vlmtune.config import load_config
from vlmtune.data.encode import IGNORE_INDEX, TOKEN_KEYS, with_answer_tokens
from vlmtune.data.formats import load_samples
from vlmtune.data.sample import Turn
from vlmtune.errors import ConfigError
from vlmtune.generation import generate
from vlmtune.parts import build_encoder, run_parts
from vlmtune.rl.losses import group_advantages, grpo_loss
from vlmtune.rl.rewards import (bleu4, cider, exact_match, format_reward, load_rewards, one_minus_cer, render,
                                score_rewards, total_reward)
from vlmtune.train import train

# -- rewards -------------------------------------------------------------------------------------

def test_each_built_in_reward_on_fixed_examples():
    refs = [["a red circle"]] * 3
    assert exact_match(["a red circle", "A red circle.", "a blue circle"], refs, "caption") == [1.0, 1.0, 0.0]
    assert exact_match(["A red circle.", "a red  circle"], refs[:2], "generic") == [0.0, 1.0]

    # 1 - CER, floored at 0: one substitution in four characters; empty; ten characters against four
    assert one_minus_cer(["abcd", "abxd", "", "abcdefghij"], [["abcd"]] * 4, "ocr") == [1.0, 0.75, 0.0, 0.0]
    assert one_minus_cer(["x^{2}"], [["x^2"]], "latex") == [1.0]  # LaTeX normalised first, as eval does

    assert render(["x^2", "x^{2}", "x^3"], [["x^{2}"]] * 3) == [1.0, 1.0, 0.0]

    # idf from the training set's references: with only the batch's (all alike here) every weight is 0
    corpus = [["a red circle"], ["a blue square"], ["a green triangle"], ["two yellow cats"]]
    c = cider(["a red circle", "a red square", "two blue cats"], [["a red circle"]] * 3, corpus)
    assert c[0] > c[1] > c[2] == 0.0
    assert cider(["a red circle"], [["a red circle"]]) == [0.0]

    b = bleu4(["the cat sat on the mat", "the cat sat on a rug", "dogs"], [["the cat sat on the mat"]] * 3)
    assert b[0] == pytest.approx(1.0) and b[0] > b[1] > b[2]

    # not empty, no repeated word 3-gram, length in range: the share of the three checks passed
    assert format_reward(["a red circle", "", "go go go go", "x" * 20], (1, 15)) == pytest.approx(
        [1.0, 1 / 3, 2 / 3, 2 / 3])


def test_rewards_combine_with_weights():
    rewards = load_rewards({"exact_match": 1.0, "cer": 0.5}, task="ocr")
    samples = load_samples_of(["abcd", "abcd"])
    scores = score_rewards(rewards, ["abcd", "abxd"], samples)
    assert scores == {"exact_match": [1.0, 0.0], "cer": [1.0, 0.75]}
    assert total_reward(rewards, scores) == [1.5, 0.375]


def load_samples_of(answers: list[str]):
    from vlmtune.data.sample import Sample, Turn

    return [Sample(images=[], turns=[Turn("user", "read"), Turn("assistant", a)], source=f"mem:{i}")
            for i, a in enumerate(answers)]


def test_a_users_reward_by_module_and_function(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent("""
        def shorter(completions, references, samples):
            return [1.0 / (1 + len(c)) for c in completions]

        def broken(completions, references, samples):
            return [1.0]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    rewards = load_rewards({"my_rewards:shorter": 2.0, "exact_match": 1.0})
    samples = load_samples_of(["ab", "ab"])
    scores = score_rewards(rewards, ["ab", "abc"], samples)
    assert scores["my_rewards:shorter"] == [1 / 3, 1 / 4]
    assert total_reward(rewards, scores) == pytest.approx([2 / 3 + 1, 2 / 4])

    with pytest.raises(ConfigError, match="returned 1 scores for 2 completions"):
        score_rewards(load_rewards({"my_rewards:broken": 1.0}), ["a", "b"], samples)
    with pytest.raises(ConfigError, match="has no function 'nothing'"):
        load_rewards({"my_rewards:nothing": 1.0})
    with pytest.raises(ConfigError, match="cannot import 'no_such_module'"):
        load_rewards({"no_such_module:f": 1.0})
    with pytest.raises(ConfigError, match="unknown reward 'exactmatch'.*exact_match, cer, render_match"):
        load_rewards({"exactmatch": 1.0})
    config = load_config(None, ["grpo.rewards={render_match: 1.0, cer: 0.5}"])
    assert config.grpo.rewards == {"render_match": 1.0, "cer": 0.5}
    with pytest.raises(ConfigError, match="grpo.rewards.cer"):
        load_config(None, ["grpo.rewards={cer: high}"])


# -- advantages and loss ---------------------------------------------------------------------------

def test_group_relative_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0,   0.5, 0.5, 0.5, 0.5,   2.0, 0.0, 0.0, 0.0])
    s1 = math.sqrt((4 * 0.5 ** 2) / 3)  # unbiased std of [1, 0, 0, 1]
    s3 = math.sqrt((1.5 ** 2 + 3 * 0.5 ** 2) / 3)  # of [2, 0, 0, 0]: 1
    expected = [0.5 / (s1 + 1e-4), -0.5 / (s1 + 1e-4), -0.5 / (s1 + 1e-4), 0.5 / (s1 + 1e-4),
                0, 0, 0, 0,
                1.5 / (s3 + 1e-4), -0.5 / (s3 + 1e-4), -0.5 / (s3 + 1e-4), -0.5 / (s3 + 1e-4)]
    assert group_advantages(rewards, 4).tolist() == pytest.approx(expected, abs=1e-6)
    assert group_advantages(rewards, 4, scale=False).tolist() == pytest.approx(
        [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0, 1.5, -0.5, -0.5, -0.5])


def test_grpo_loss_by_hand():
    logps = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    ref = torch.tensor([[-1.5, -2.0, 0.0], [-0.5, 0.0, 0.0]])
    advantages = torch.tensor([1.0, -2.0])
    beta = 0.1
    kl = [math.exp(-0.5) + 0.5 - 1, 0.0, 0.0]  # k3 per masked token: exp(ref - logp) - (ref - logp) - 1
    by_hand = ((-1.0 + beta * kl[0]) + (-1.0 + beta * kl[1]) + (2.0 + beta * kl[2])) / 3
    loss, stats = grpo_loss(logps, mask, advantages, ref, beta)
    assert loss.item() == pytest.approx(by_hand, abs=1e-6)
    assert stats["kl"] == pytest.approx(sum(kl) / 3, abs=1e-6)
    loss.backward()
    # d/dlogp of -A * exp(logp - sg(logp)) is -A; of beta * k3 it is beta * (1 - exp(ref - logp)); / 3 tokens
    grad = [[(-1.0 + beta * (1 - math.exp(-0.5))) / 3, -1.0 / 3, 0.0], [2.0 / 3, 0.0, 0.0]]
    assert logps.grad.tolist() == [pytest.approx(row, abs=1e-6) for row in grad]


def test_sampled_answers_are_scored_on_their_own_tokens_with_sfts_masking(tmp_path, qwen2_vl_parts):
    """GRPO trains on the tokens it sampled, after the prompt exactly as SFT encodes it: an answer
    that ended gets its end-of-turn token trained, as in SFT; one cut off at max_new_tokens gets none."""
    processor, family = qwen2_vl_parts
    config = load_config(None, ["data.system_prompt=Be brief."])
    encoder = build_encoder(config, processor, family)
    (sample,) = load_samples(write_json(tmp_path / "d.json", caption_records(1, tmp_path)))
    prompt = encoder.encode_prompt(sample)
    end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    for answer in ["a blue square", "", "red red red"]:
        ended = processor.tokenizer(answer, add_special_tokens=False)["input_ids"] + [end]
        item = with_answer_tokens(prompt, ended)
        sft = encoder.encode(replace(sample, turns=sample.prompt_turns() + [Turn("assistant", answer)]))
        n = len(item["input_ids"])  # SFT's encoding goes on with the template's masked tail
        assert item.keys() == sft.keys()
        for key in sft:
            assert torch.equal(item[key], sft[key][:n] if key in TOKEN_KEYS else sft[key]), key
        assert (sft["labels"][n:] == IGNORE_INDEX).all()
        assert trained_runs(item["labels"]) == [ended]
        cut = with_answer_tokens(prompt, ended[:-1])
        assert trained_runs(cut["labels"]) == ([ended[:-1]] if answer else [])


# -- runs ------------------------------------------------------------------------------------------

PREFERRED = "a blue triangle"  # the caption of one of the four training images

REWARD_MODULE = f'''
from vlmtune.metrics.text import levenshtein


def prefer_blue(completions, references, samples):
    """1 for exactly "{PREFERRED}", less the further an answer is from it (in edits per character)."""
    return [1 - levenshtein(c, "{PREFERRED}") / max(len(c), len("{PREFERRED}")) for c in completions]
'''


@pytest.fixture
def one_thread():
    """Runs compared step by step must sum in the same order; also much faster on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def grpo_overrides(model: Path, data: str, out: Path, *extra: str) -> list[str]:
    return base_overrides(model, data, out, "train.objective=grpo", "grpo.rewards={fixed_reward:prefer_blue: 1.0}",
                          "train.method=full", "grpo.max_new_tokens=6", "grpo.beta=0", *extra)


@pytest.fixture
def captioner(tmp_path, tiny_qwen2_vl, monkeypatch, one_thread) -> tuple[Path, str]:
    """(a tiny model fine-tuned (SFT) to caption 4 images, their data file), and the reward module importable."""
    (tmp_path / "fixed_reward.py").write_text(REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    data = write_json(tmp_path / "train.json", caption_records(4, tmp_path))
    train(load_config(None, base_overrides(tiny_qwen2_vl, data, tmp_path / "sft", "train.method=full",
                                           "train.learning_rate=0.003", "train.max_steps=40")))
    return tmp_path / "sft" / "final", data


def greedy(folder: Path, samples) -> list[str]:
    parts = run_parts(load_config(folder / "vlmtune.yaml"), folder)
    return generate(parts.load_model(), parts.encoder, samples, max_new_tokens=6, progress=False)


@pytest.mark.long
def test_a_reward_for_one_answer_moves_the_greedy_output_to_it(tmp_path, captioner):
    model, data = captioner
    samples = load_samples(data)
    before = greedy(model, samples)
    assert before == [s.answer() for s in samples] and before.count(PREFERRED) == 1  # SFT learnt the captions
    out = tmp_path / "run"
    train(load_config(None, grpo_overrides(model, data, out, "train.max_steps=20", "train.learning_rate=0.001",
                                           "grpo.num_generations=8", "train.logging_steps=5")))
    assert greedy(out / "final", samples) == [PREFERRED] * len(samples)
    rewards = [r["reward"] for r in read_jsonl(out / "metrics.jsonl") if "reward" in r]
    assert rewards[-1] > rewards[0]
    rows = read_jsonl(sorted((out / "completions").glob("step-*.jsonl"))[-1])
    assert rows and all({"images", "prediction", "reference", "scores"} <= row.keys() for row in rows)


@pytest.mark.long
def test_grpo_resume_continues_exactly(tmp_path, captioner):
    model, data = captioner

    def run(out: Path, steps: int, *extra: str) -> None:
        train(load_config(None, grpo_overrides(model, data, out, f"train.max_steps={steps}", "train.save_steps=2",
                                               "train.learning_rate=0.001", "grpo.num_generations=4", *extra)))

    run(tmp_path / "whole", 4)
    run(tmp_path / "resumed", 2)
    run(tmp_path / "resumed", 4, "train.resume=true")

    def logged(out: Path) -> list[float]:
        rows = [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
        assert [r["step"] for r in rows] == [1, 2, 3, 4]
        return [v for r in rows for v in (r["loss"], r["reward"])]

    assert logged(tmp_path / "resumed") == pytest.approx(logged(tmp_path / "whole"), abs=1e-6)
    whole = load_file(tmp_path / "whole" / "final" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "final" / "model.safetensors")
    for name in whole:
        torch.testing.assert_close(resumed[name], whole[name], atol=1e-6, rtol=0)


@pytest.mark.long
def test_grpo_trains_what_sft_trains(tmp_path, captioner):
    """LoRA with a trainable vision tower: the reference is then a frozen copy (grpo.beta > 0)."""
    from test_dpo import Snapshot
    from vlmtune.tuning import prepare_model

    model, data = captioner
    overrides = grpo_overrides(model, data, tmp_path / "run", "train.max_steps=3", "train.learning_rate=0.001",
                               "train.method=lora", "train.freeze_vision=false", "grpo.beta=0.04")
    snapshot = Snapshot()
    train(load_config(None, overrides), callbacks=[snapshot])
    assert any(r.get("kl", 0) > 0 for r in read_jsonl(tmp_path / "run" / "metrics.jsonl"))
    sft = load_config(None, [o for o in overrides if o != "train.objective=grpo"])
    parts = run_parts(sft, training=True)
    expected = {n for n, p in prepare_model(parts.load_model(), parts.family, sft.train, sft.lora).named_parameters()
                if p.requires_grad}
    assert snapshot.trainable == expected and any(".visual." in n for n in expected)
    for name, before in snapshot.before.items():
        assert (not torch.equal(before, snapshot.after[name])) == (name in snapshot.trainable), name
