"""DPO (train.objective=dpo): preference formats and their pre-flight check, the loss against a hand
computation from log-probabilities over the answer tokens, a run whose margin grows, trainable and
frozen parameters as in SFT, and resume."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback, set_seed

from conftest import base_overrides, draw, read_jsonl, trained_runs, write_json
from vlmtune.config import load_config
from vlmtune.data.collate import Collator
from vlmtune.data.preference import PairCollator, PairDataset, check_pairs, load_pairs
from vlmtune.data.sample import IMAGE
from vlmtune.errors import DataError
from vlmtune.parts import run_parts
from vlmtune.rl.trainers import DPOTrainer
from vlmtune.train import train
from vlmtune.train_parts import training_arguments
from vlmtune.tuning import prepare_model

QUESTION = "What is in the image?"
COLOURS = (("red", "circle"), ("green", "square"), ("blue", "triangle"), ("yellow", "circle"))


def pair_records(folder: Path, n: int = 4) -> list[dict]:
    """TRL-style pairs: the right caption chosen, a wrong one rejected."""
    records = []
    for i in range(n):
        colour, shape = COLOURS[i % len(COLOURS)]
        draw(folder / "images" / f"p{i}.png", colour, shape)
        records.append({"images": [f"images/p{i}.png"], "prompt": QUESTION, "chosen": f"a {colour} {shape}",
                        "rejected": "a purple hexagon"})
    return records


# -- formats -------------------------------------------------------------------------------------

def one_of_each_format() -> dict[str, dict]:
    img = "images/p0.png"
    user_msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    return {
        "trl (strings)": {"images": [img], "prompt": QUESTION, "chosen": "a red circle", "rejected": "a blue square"},
        "trl (conversational)": {"images": [img], "prompt": user_msgs,
                                 "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "a red circle"}]}],
                                 "rejected": [{"role": "assistant", "content": "a blue square"}]},
        "trl (implicit prompt)": {"images": [img],
                                  "chosen": user_msgs + [{"role": "assistant", "content": "a red circle"}],
                                  "rejected": user_msgs + [{"role": "assistant", "content": "a blue square"}]},
        "llamafactory (sharegpt)": {"conversations": [{"from": "human", "value": f"<image>{QUESTION}"}],
                                    "chosen": {"from": "gpt", "value": "a red circle"},
                                    "rejected": {"from": "gpt", "value": "a blue square"}, "images": [img]},
        "llamafactory (alpaca)": {"instruction": QUESTION, "input": "", "chosen": "a red circle",
                                  "rejected": "a blue square", "images": [img]},
        "swift (rejected_response)": {"messages": [{"role": "user", "content": f"<image>{QUESTION}"},
                                                   {"role": "assistant", "content": "a red circle"}],
                                      "rejected_response": "a blue square", "images": [img]},
        "swift (rejected_messages)": {"messages": [{"role": "user", "content": f"<image>{QUESTION}"},
                                                   {"role": "assistant", "content": "a red circle"}],
                                      "rejected_messages": [{"role": "user", "content": f"<image>{QUESTION}"},
                                                            {"role": "assistant", "content": "a blue square"}],
                                      "images": [img], "rejected_images": [img]},
        "minicpm (rejected_response)": {"id": "0", "image": img,
                                        "conversations": [{"role": "user", "content": f"<image>\n{QUESTION}"},
                                                          {"role": "assistant", "content": "a red circle"}],
                                        "rejected_response": "a blue square"},
    }


@pytest.mark.parametrize("name", list(one_of_each_format()))
def test_every_preference_format_reads_into_one_pair(tmp_path, name):
    image = draw(tmp_path / "images" / "p0.png")
    path = write_json(tmp_path / "pairs.json", [one_of_each_format()[name]])
    (pair,) = load_pairs(path)
    for sample, answer in ((pair.chosen, "a red circle"), (pair.rejected, "a blue square")):
        assert sample.images == [image]
        assert [t.role for t in sample.turns] == ["user", "assistant"]
        assert IMAGE in sample.turns[0].text and QUESTION in sample.turns[0].text
        assert sample.answer() == answer
        assert sample.source == f"{path}:0"
    assert check_pairs([pair]).problems == []


def test_preference_defects_are_reported_as_file_index(tmp_path):
    draw(tmp_path / "images" / "p0.png")
    good = {"images": ["images/p0.png"], "prompt": QUESTION, "chosen": "a red circle", "rejected": "a blue square"}
    records = [
        good,
        {**good, "rejected": "a red circle"},                                   # 1: nothing to prefer
        {**good, "images": ["images/missing.png"]},                             # 2: no such image
        {**good, "prompt": f"<image><image>{QUESTION}"},                        # 3: 2 placeholders, 1 image
        {"messages": [{"role": "user", "content": f"<image>{QUESTION}"},
                      {"role": "assistant", "content": "a red circle"}],
         "rejected_response": "  ", "images": ["images/p0.png"]},              # 4: empty rejected answer
        {"messages": [{"role": "user", "content": f"<image>{QUESTION}"}, {"role": "assistant", "content": "x"}],
         "rejected_messages": [{"role": "user", "content": "<image>Something else?"},
                               {"role": "assistant", "content": "y"}], "images": ["images/p0.png"]},  # 5
    ]
    path = write_json(tmp_path / "pairs.json", records)
    report = check_pairs(load_pairs(path))
    listed = report.listing()
    assert f"{path}:1: the chosen and the rejected answer are the same" in listed
    assert f"{path}:2: image not found" in listed
    assert f"{path}:3: 2 image placeholder(s) in the text but 1 image(s)" in listed
    assert f"{path}:4: rejected answer: turn 1 (assistant) is empty" in listed
    assert f"{path}:5: chosen and rejected do not share their prompt" in listed
    assert report.bad_indices == {1, 2, 3, 4, 5}

    not_pairs = write_json(tmp_path / "sft.json", [good, {"conversations": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DataError, match=rf"{not_pairs}:1: not a preference record"):
        load_pairs(not_pairs)
    bad_answer = write_json(tmp_path / "bad.json", [{**good, "chosen": 3}])
    with pytest.raises(DataError, match=rf"{bad_answer}:0: 'chosen' is neither a string"):
        load_pairs(bad_answer)


def test_a_dpo_run_stops_before_training_on_bad_pairs(tmp_path, tiny_qwen2_vl):
    records = pair_records(tmp_path)
    records[2]["rejected"] = records[2]["chosen"]
    data = write_json(tmp_path / "pairs.json", records)
    config = load_config(None, base_overrides(tiny_qwen2_vl, data, tmp_path / "run", "train.objective=dpo"))
    with pytest.raises(DataError, match=rf"{data}:2: the chosen and the rejected answer are the same"):
        train(config)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# -- the loss ------------------------------------------------------------------------------------

def answer_logp_by_hand(model, encoder, sample, pad_id) -> float:
    """log p(answer | prompt): one unpadded sample, full log-softmax, the answer tokens' terms summed."""
    item = encoder.encode(sample)
    batch = Collator(pad_id)([item])
    labels = batch.pop("labels")[0]
    with torch.no_grad():
        logits = model(**batch).logits[0].double()
    logprobs = torch.log_softmax(logits, dim=-1)
    return sum(logprobs[t - 1, labels[t]].item() for t in range(1, len(labels)) if labels[t] != -100)


def test_dpo_loss_equals_a_hand_computation_over_answer_tokens_only(tmp_path, tiny_qwen2_vl):
    data = write_json(tmp_path / "pairs.json", pair_records(tmp_path, 2))
    config = load_config(None, base_overrides(tiny_qwen2_vl, data, tmp_path / "run", "train.objective=dpo",
                                              "dpo.beta=0.5"))
    parts = run_parts(config, training=True)
    encoder, tokenizer = parts.encoder, parts.processor.tokenizer
    set_seed(0)
    policy = prepare_model(parts.load_model(), parts.family, config.train, config.lora)
    with torch.no_grad():  # LoRA starts as the identity: move it away so policy and reference differ
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    policy.eval()
    reference = parts.load_model().eval()  # the starting weights, loaded on their own

    pairs = load_pairs(data)
    # the labels are SFT's: the answer and its end-of-turn token, nothing of the prompt
    for pair in pairs:
        for sample in (pair.chosen, pair.rejected):
            expected = tokenizer(sample.answer() + "<|im_end|>", add_special_tokens=False)["input_ids"]
            assert trained_runs(encoder.encode(sample)["labels"]) == [expected]

    by_hand = []
    for pair in pairs:
        pc, pr = (answer_logp_by_hand(policy, encoder, s, parts.pad_id) for s in (pair.chosen, pair.rejected))
        rc, rr = (answer_logp_by_hand(reference, encoder, s, parts.pad_id) for s in (pair.chosen, pair.rejected))
        margin = 0.5 * ((pc - rc) - (pr - rr))
        by_hand.append(-math.log(1 / (1 + math.exp(-margin))))
    expected_loss = sum(by_hand) / len(by_hand)

    trainer = DPOTrainer(model=policy, args=training_arguments(config, tmp_path / "run", False),
                         train_dataset=PairDataset(pairs, encoder), family=parts.family, run_config=config,
                         encoder=encoder, processor=parts.processor, beta=0.5)
    dataset = PairDataset(pairs, encoder)
    batch = PairCollator(parts.pad_id, parts.family.concat_dims)([dataset[0], dataset[1]])  # padded: lengths differ
    assert batch["input_ids"].shape[0] == 4
    with torch.no_grad():
        loss = trainer.compute_loss(policy, batch).item()
    assert abs(expected_loss - math.log(2)) > 1e-3, "policy and reference must differ for the test to mean anything"
    assert loss == pytest.approx(expected_loss, rel=1e-4, abs=1e-5)


# -- runs ----------------------------------------------------------------------------------------

class Snapshot(TrainerCallback):
    """The model's parameters (and which train) when training starts and ends."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        self.before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.after = {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.long
@pytest.mark.parametrize("method", ["lora", "full"])
def test_dpo_margin_grows_and_trains_what_sft_trains(tmp_path, tiny_qwen2_vl, method):
    data = write_json(tmp_path / "pairs.json", pair_records(tmp_path))
    overrides = base_overrides(tiny_qwen2_vl, data, tmp_path / "run", "train.objective=dpo", f"train.method={method}",
                               "train.max_steps=8", "train.learning_rate=0.01" if method == "lora" else
                               "train.learning_rate=0.001")
    snapshot = Snapshot()
    train(load_config(None, overrides), callbacks=[snapshot])

    margins = [r["rewards/margins"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "rewards/margins" in r]
    assert len(margins) == 8 and margins[0] == pytest.approx(0, abs=1e-6)  # policy == reference at step 1
    assert margins[-1] > 0.2 and margins[-1] > max(margins[:4])

    sft = load_config(None, [o for o in overrides if o != "train.objective=dpo"])
    parts = run_parts(sft, training=True)
    sft_model = prepare_model(parts.load_model(), parts.family, sft.train, sft.lora)
    assert snapshot.trainable == {n for n, p in sft_model.named_parameters() if p.requires_grad}
    for name, before in snapshot.before.items():
        changed = not torch.equal(before, snapshot.after[name])
        assert changed == (name in snapshot.trainable), f"{name}: changed={changed}"


@pytest.fixture
def one_thread():
    """Runs compared step by step must sum in the same order."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.long
def test_dpo_resume_continues_exactly(tmp_path, tiny_qwen2_vl, one_thread):
    data = write_json(tmp_path / "pairs.json", pair_records(tmp_path))

    def run(out: Path, steps: int, *extra: str) -> None:
        train(load_config(None, base_overrides(tiny_qwen2_vl, data, out, "train.objective=dpo", f"train.max_steps={steps}",
                                               "train.save_steps=2", "train.learning_rate=0.01", *extra)))

    run(tmp_path / "whole", 4)
    run(tmp_path / "resumed", 2)
    run(tmp_path / "resumed", 4, "train.resume=true")

    def logged(out: Path) -> list[float]:
        rows = [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
        assert [r["step"] for r in rows] == [1, 2, 3, 4]  # each step logged once
        return [v for r in rows for v in (r["loss"], r["rewards/margins"])]

    assert logged(tmp_path / "resumed") == pytest.approx(logged(tmp_path / "whole"), abs=1e-6)
    whole = load_file(tmp_path / "whole" / "final" / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "final" / "adapter_model.safetensors")
    assert whole.keys() == resumed.keys()
    for name in whole:
        torch.testing.assert_close(resumed[name], whole[name], atol=1e-6, rtol=0)
    assert (tmp_path / "resumed" / "checkpoint-2" / "vlmtune.yaml").is_file()
    assert load_config(tmp_path / "resumed" / "final" / "vlmtune.yaml").train.objective == "dpo"


@pytest.mark.long
@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "minicpmv2", "minicpmv2_6", "minicpmv4_6"])
def test_every_family_trains_with_dpo_and_grpo(tmp_path, tiny_model_dir, family, one_thread):
    """vlmtune's own encoding and loss, not TRL's, so the native MiniCPM-V 2.x runs too."""
    from conftest import caption_records

    model = tiny_model_dir(family)
    pairs = write_json(tmp_path / "pairs.json", pair_records(tmp_path))
    train(load_config(None, base_overrides(model, pairs, tmp_path / "dpo", "train.objective=dpo", "train.max_steps=3",
                                           "train.learning_rate=0.01")))
    margins = [r["rewards/margins"] for r in read_jsonl(tmp_path / "dpo" / "metrics.jsonl") if "rewards/margins" in r]
    assert margins[-1] > margins[0]
    data = write_json(tmp_path / "train.json", caption_records(4, tmp_path))
    train(load_config(None, base_overrides(model, data, tmp_path / "grpo", "train.objective=grpo", "train.max_steps=2",
                                           "grpo.max_new_tokens=4", "grpo.num_generations=2",
                                           "grpo.rewards={exact_match: 1.0, format: 0.5}")))
    rows = [r for r in read_jsonl(tmp_path / "grpo" / "metrics.jsonl") if "reward" in r]
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) and "rewards/format/mean" in r for r in rows)
    assert (tmp_path / "grpo" / "final" / "vlmtune.yaml").is_file()
