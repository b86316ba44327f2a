"""`vlmtune eval` end to end: output files, the before/after table, and batch == one-by-one."""

import json

from conftest import base_overrides

from vlmtune.config import load_config
from vlmtune.evaluate import eval_command
from vlmtune.train import train


def test_eval_writes_metrics_predictions_and_comparison(tmp_path, tiny_qwen2_vl, caption_data, capsys):
    run = tmp_path / "run"
    train(load_config(None, base_overrides(tiny_qwen2_vl, caption_data["train"], run,
                                           f"data.val={caption_data['val']}", "train.learning_rate=0.01")))
    assert eval_command(str(run), task="caption", compare_base=True, batch_size=2) == 0

    compare = json.loads((run / "eval" / "compare.json").read_text())
    assert compare["before"] == "base" and compare["after"] == "final"
    for name in ("base", "final"):
        record = json.loads((run / "eval" / name / "metrics.json").read_text())
        assert record["task"] == "caption" and record["n"] == 2
        assert set(record["metrics"]) == {"bleu4", "cider", "rouge_l", "exact_match"}
        assert record["metrics"] == compare["metrics"][name]
        rows = [json.loads(line) for line in (run / "eval" / name / "predictions.jsonl").read_text().splitlines()]
        assert [r["index"] for r in rows] == [0, 1]
        for r in rows:
            assert set(r) == {"index", "source", "sources", "images", "prompt", "reference", "references",
                              "prediction", "scores"}
            assert r["references"] == [r["reference"]] and r["sources"] == [r["source"]]
            assert r["source"].endswith(f"val.json:{r['index']}") and r["reference"].startswith("a ")
    assert json.loads((run / "eval" / "final" / "metrics.json").read_text())["adapter"].endswith("final")
    out = capsys.readouterr().out
    assert "metric" in out and "base" in out and "final" in out


def test_unknown_task_and_missing_folder_are_clear_errors(tmp_path):
    import pytest

    from vlmtune.errors import VlmtuneError

    with pytest.raises(VlmtuneError, match="no such run"):
        eval_command(str(tmp_path / "nope"))


# -- several references per item ------------------------------------------------------------------

def grouped_data(folder) -> str:
    """Three pictures with 3, 2 and 1 captions, interleaved as in COCO's caption list, and one
    record that asks another question about picture 1 (its own item)."""
    from conftest import draw, write_json

    for i, (colour, shape) in enumerate([("red", "circle"), ("blue", "square"), ("green", "triangle")]):
        draw(folder / "images" / f"{i}.png", colour, shape)
    layout = [(0, "a red circle"), (1, "a blue square"), (0, "a round red shape"), (2, "a green triangle"),
              (1, "a blue box"), (0, "red circle on white"), (1, "blue", "What colour is it?")]
    return write_json(folder / "val.json", [
        {"image": f"images/{image}.png", "conversations": [
            {"role": "user", "content": f"<image>\n{rest[0] if rest else 'What is in the image?'}"},
            {"role": "assistant", "content": caption}]} for image, caption, *rest in layout])


def test_records_of_one_image_and_prompt_are_one_item_with_every_reference(tmp_path, tiny_qwen2_vl):
    from vlmtune.metrics import compute_metrics

    data = grouped_data(tmp_path)
    assert eval_command(model=str(tiny_qwen2_vl), data=data, task="caption", out=str(tmp_path / "eval"),
                        batch_size=2, max_new_tokens=4) == 0
    rows = [json.loads(line) for line in (tmp_path / "eval" / "model" / "predictions.jsonl").read_text().splitlines()]
    assert [r["references"] for r in rows] == [["a red circle", "a round red shape", "red circle on white"],
                                               ["a blue square", "a blue box"], ["a green triangle"], ["blue"]]
    assert [r["sources"] for r in rows][0] == [f"{data}:0", f"{data}:2", f"{data}:5"]
    assert [r["reference"] for r in rows] == [r["references"][0] for r in rows]
    assert [r["index"] for r in rows] == [0, 1, 2, 3]
    record = json.loads((tmp_path / "eval" / "model" / "metrics.json").read_text())
    assert (record["n"], record["records"]) == (4, 7)
    predictions, references = [r["prediction"] for r in rows], [r["references"] for r in rows]
    assert record["metrics"] == compute_metrics("caption", predictions, references)


def test_generate_asks_each_prompt_once(tmp_path, tiny_qwen2_vl):
    from vlmtune.data.formats import load_samples
    from vlmtune.generation import generate, load_target, make_encoder, resolve_target

    samples = load_samples(grouped_data(tmp_path))
    target = resolve_target(None, str(tiny_qwen2_vl), None)
    model, processor, family = load_target(target)
    batches = []
    answers = generate(model, make_encoder(target.config, processor, family), samples, batch_size=1,
                       max_new_tokens=3, progress=False, on_batch=lambda i, a: batches.append((i, a)))
    assert [indices for indices, _ in batches] == [[0, 2, 5], [1, 4], [3], [6]]  # 4 prompts for 7 records
    assert [answers[i] for indices, _ in batches for i in indices] == [a for _, batch in batches for a in batch]
    assert answers[0] == answers[2] == answers[5] and answers[1] == answers[4]


def test_score_makes_coco_records_one_item_per_image():
    """What the in-training evaluation gets: one record per caption, one prediction per record."""
    from pathlib import Path

    from vlmtune.data.sample import Sample, Turn
    from vlmtune.scoring import first_items, score
    from vlmtune.metrics import compute_metrics

    images = json.loads((Path(__file__).parent / "data" / "coco_captions_50.json").read_text())["images"]
    records, predictions = [], []
    for image in images:
        for caption in image["references"]:
            records.append(Sample([f"/coco/{image['image_id']}.jpg"], [Turn("user", "<image>\nCaption it."),
                                                                          Turn("assistant", caption)]))
            predictions.append(image["candidate"])
    metrics, rows = score("caption", records, predictions)
    expected = compute_metrics("caption", [im["candidate"] for im in images], [im["references"] for im in images])
    assert metrics == expected and len(rows) == 50
    assert [r["references"] for r in rows] == [im["references"] for im in images]
    assert metrics["bleu4"] > compute_metrics("caption", predictions, [r.answer() for r in records])["bleu4"] + 0.2
    assert first_items(records[::-1], 2) == records[::-1][:10]  # the 2 items' 10 records, whole
