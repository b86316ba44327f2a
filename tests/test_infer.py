"""`vlmtune predict` and `vlmtune chat` on a tiny qwen2_vl trained for a few steps, so that it
answers briefly and stops: predictions land in JSONL, batched (left-padded) predictions equal
one-at-a-time ones, and a scripted two-turn chat gives what `generate` gives for the same
conversation, the second turn seeing the first."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest
from conftest import draw, read_jsonl, write_json

from vlmtune import cli
from vlmtune.config import load_config
from vlmtune.data.collate import EncodedDataset
from vlmtune.data.formats import load_samples
from vlmtune.data.sample import IMAGE, Sample, Turn
from vlmtune.generation import generate, load_target, make_encoder, resolve_target
from vlmtune.infer import ChatSession
from vlmtune.train import train

# (colour, shape, side): two image sizes, so prompts differ in length (4 or 16 image tokens)
pytestmark = pytest.mark.long  # one fully trained tiny model shared by every test here

SHAPES = [("red", "circle", 112), ("blue", "square", 56), ("green", "triangle", 112), ("yellow", "circle", 56)]
Q1, Q2 = "What is this?", "And the colour?"
PROMPTS = [Q1, "Describe the picture.", "What is in the image? Describe the picture.", Q1]  # for predict
TOKENS = 8  # max_new_tokens everywhere: the trained model stops before, an untrained one would not


@pytest.fixture(scope="session")
def setup(tmp_path_factory, tiny_qwen2_vl) -> dict:
    """A tiny model fully trained on two-turn chats about shapes ("a red circle", then "red"),
    and a predict dataset mixing prompts, image sizes and a sample with no answer."""
    root = tmp_path_factory.mktemp("infer")
    chats, predict = [], []
    for i, (colour, shape, side) in enumerate(SHAPES):
        draw(root / "images" / f"{i}.png", colour, shape, (side, side))
        image = f"images/{i}.png"
        chats.append({"image": image, "conversations": [
            {"role": "user", "content": f"{IMAGE}\n{Q1}"}, {"role": "assistant", "content": f"a {colour} {shape}"},
            {"role": "user", "content": Q2}, {"role": "assistant", "content": colour}]})
        predict.append({"image": image, "conversations": [
            {"role": "user", "content": f"{IMAGE}\n{PROMPTS[i]}"},
            {"role": "assistant", "content": f"a {colour} {shape}"}]})
    predict.append({"image": "images/0.png", "conversations": [{"role": "user", "content": f"{IMAGE}\n{Q1}"}]})
    write_json(root / "train.json", chats)
    write_json(root / "predict.json", predict)
    run = train(load_config(None, [
        f"model.name_or_path={tiny_qwen2_vl}", f"data.train={root / 'train.json'}", "train.method=full",
        "train.freeze_vision=false", "train.freeze_projector=false", "train.learning_rate=0.003",
        "train.max_steps=30", "train.batch_size=4", "train.grad_accum=1", "eval.num_samples=0",
        "train.save_steps=1000", "train.logging_steps=100", f"train.output_dir={root / 'run'}"]))
    model, processor, family = load_target(resolve_target(str(run), None, None))
    encoder = make_encoder(load_config(run / "final" / "vlmtune.yaml"), processor, family)
    return {"root": root, "run": run, "model": model, "encoder": encoder, "image": root / "images" / "0.png"}


def answer_by_generate(setup, turns: list[Turn], images: list[str]) -> str:
    """What `evaluate.generate` answers to a conversation built here by hand."""
    sample = Sample([str(p) for p in images], turns + [Turn("assistant", "")])
    return generate(setup["model"], setup["encoder"], [sample], 1, TOKENS, progress=False)[0]


@pytest.fixture(scope="session")
def expected(setup) -> tuple[str, str]:
    """The two answers of the scripted chat, computed without `ChatSession`."""
    first = [Turn("user", f"{IMAGE}\n{Q1}")]
    a1 = answer_by_generate(setup, first, [setup["image"]])
    a2 = answer_by_generate(setup, first + [Turn("assistant", a1), Turn("user", Q2)], [setup["image"]])
    assert a1 and a2  # the trained model answers something (the checks below compare strings)
    return a1, a2


def lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


# -- predict --------------------------------------------------------------------------------

def predict(setup, batch_size: int, out: str) -> list[dict]:
    path = setup["root"] / out
    rc = cli.main(["predict", str(setup["run"]), "--data", str(setup["root"] / "predict.json"), "--out", str(path),
                   "--batch-size", str(batch_size), "--max-new-tokens", str(TOKENS)])
    assert rc == 0
    assert not list(path.parent.glob(f".{path.name}.tmp*"))  # the temporary file was renamed away
    rows = read_jsonl(path)
    assert len(path.read_text().splitlines()) == len(rows)  # one line each, no blank lines
    return rows


def test_predict_writes_one_line_per_sample(setup):
    rows = predict(setup, 8, "out/predictions.jsonl")
    samples = load_samples(setup["root"] / "predict.json")
    assert len(rows) == len(samples) == 5
    for i, (row, sample) in enumerate(zip(rows, samples)):
        assert row["index"] == i and row["source"] == sample.source
        assert row["images"] == sample.images and Path(row["images"][0]).is_file()
        assert row["prompt"] == sample.turns[0].text.replace(IMAGE, "").strip()
        assert isinstance(row["prediction"], str)
    assert [set(r) for r in rows[:4]] == [{"index", "source", "images", "prompt", "prediction", "reference"}] * 4
    assert [r["reference"] for r in rows[:4]] == [f"a {c} {s}" for c, s, _ in SHAPES]
    assert "reference" not in rows[4]  # that sample has no answer
    assert rows[4]["prediction"] == rows[0]["prediction"]  # the same image and question as sample 0


def test_batched_predictions_equal_one_at_a_time(setup):
    samples = load_samples(setup["root"] / "predict.json")
    lengths = {len(EncodedDataset(samples, setup["encoder"], prompt_only=True)[i]["input_ids"])
               for i in range(len(samples))}
    assert len(lengths) >= 3  # the batch of 5 really is padded, by different amounts
    batched = [r["prediction"] for r in predict(setup, 5, "batched.jsonl")]
    single = [r["prediction"] for r in predict(setup, 1, "single.jsonl")]
    assert batched == single
    assert all(batched) and len(set(batched)) > 1  # real, differing answers, not empty strings


# -- chat -----------------------------------------------------------------------------------

def test_chat_session_keeps_the_conversation(setup, expected):
    session = ChatSession(setup["model"], setup["encoder"], TOKENS)
    session.attach(str(setup["image"]))
    a1 = session.ask(Q1)
    prompt = session.prompt(Q2)
    assert prompt.count("<|image_pad|>") == 1  # the first turn's image is still in the prompt
    assert prompt.index(Q1) < prompt.index(a1) < prompt.index(Q2)
    assert prompt.endswith("<|im_start|>assistant\n")
    a2 = session.ask(Q2)
    assert (a1, a2) == expected
    image = str(setup["image"].resolve())
    assert session.images == [image] and session.pending == []
    assert [(t.role, t.text) for t in session.turns] == [
        ("user", f"{IMAGE}\n{Q1}"), ("assistant", a1), ("user", Q2), ("assistant", a2)]

    session.reset()
    assert session.turns == session.images == session.pending == []
    assert session.prompt(Q2).count(Q1) == 0


def test_chat_scripted_session_on_stdin(setup, expected, monkeypatch, capsys):
    script = f"/image {setup['image']}\n{Q1}\n\n{Q2}\n/exit\nnot read: the chat has ended\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    assert cli.main(["chat", str(setup["run"]), "--max-new-tokens", str(TOKENS)]) == 0  # streamed
    out = capsys.readouterr()
    assert lines(out.out) == list(expected)
    assert "image attached" in out.err


def test_chat_prompt_form(setup, expected, capsys):
    rc = cli.main(["chat", str(setup["run"]), "--image", str(setup["image"]), "--prompt", Q1, "--prompt", Q2,
                   "--max-new-tokens", str(TOKENS), "--no-stream"])
    assert rc == 0
    assert lines(capsys.readouterr().out) == list(expected)


def test_chat_reset_on_stdin_starts_over(setup, expected, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"/image {setup['image']}\n{Q1}\n/reset\n{Q2}\n"))
    assert cli.main(["chat", str(setup["run"]), "--max-new-tokens", str(TOKENS), "--no-stream"]) == 0
    fresh = answer_by_generate(setup, [Turn("user", Q2)], [])  # no history, no image
    assert lines(capsys.readouterr().out) == [expected[0], fresh]


def test_chat_bad_images_are_clear_errors(setup, monkeypatch, capsys, tmp_path):
    missing = tmp_path / "missing.png"
    assert cli.main(["chat", str(setup["run"]), "--image", str(missing), "--prompt", Q1]) == 2
    err = capsys.readouterr().err
    assert f"image {missing}: no such file" in err

    not_image = tmp_path / "notes.png"
    not_image.write_text("not a picture")
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"/image {not_image}\n{Q1}\n"))
    assert cli.main(["chat", str(setup["run"]), "--max-new-tokens", str(TOKENS)]) == 2
    out = capsys.readouterr()
    assert f"image {not_image}: not a readable image" in out.err
    assert out.out == ""  # a script stops at the bad image instead of asking without it

    monkeypatch.setattr(sys, "stdin", io.StringIO("/picture x.png\n"))
    assert cli.main(["chat", str(setup["run"])]) == 2
    assert "unknown command /picture" in capsys.readouterr().err
