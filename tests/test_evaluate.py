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
            assert set(r) == {"index", "source", "images", "prompt", "reference", "prediction", "scores"}
            assert r["source"].endswith(f"val.json:{r['index']}") and r["reference"].startswith("a ")
    assert json.loads((run / "eval" / "final" / "metrics.json").read_text())["adapter"].endswith("final")
    out = capsys.readouterr().out
    assert "metric" in out and "base" in out and "final" in out


def test_unknown_task_and_missing_folder_are_clear_errors(tmp_path):
    import pytest

    from vlmtune.errors import VlmtuneError

    with pytest.raises(VlmtuneError, match="no such run"):
        eval_command(str(tmp_path / "nope"))
