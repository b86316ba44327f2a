"""`vlmtune demo --rl` as a user runs it (`make demo-rl`): the SFT demo cut short, then GRPO with an
exact-match reward, judged on held-out images. One thread, so the run is the same every time."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import read_jsonl, run_cli


@pytest.mark.long
def test_demo_rl_shows_grpo_beating_its_sft_model(tmp_path):
    out = tmp_path / "demo"
    result = run_cli(["demo", "--rl", "--out", str(out)], timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "=== vlmtune demo --rl: SFT vs SFT + GRPO (held-out images) ===" in result.stdout

    run = out / "run_rl"
    config = yaml.safe_load((run / "vlmtune.yaml").read_text())
    assert config["train"]["objective"] == "grpo" and config["grpo"]["rewards"] == {"exact_match": 1.0}
    assert config["model"]["name_or_path"] == str(out / "run" / "final")
    compare = json.loads((run / "eval" / "compare.json").read_text())
    sft, grpo = compare["metrics"]["base"], compare["metrics"][compare["after"]]
    assert grpo["exact_match"] > sft["exact_match"]
    predictions = read_jsonl(run / "eval" / "final" / "predictions.jsonl")
    assert len(predictions) == 300  # the held-out images of --rl
    assert sum(p["prediction"] == p["reference"] for p in predictions) / 300 == pytest.approx(grpo["exact_match"])

    logged = [(r["step"], r["reward"]) for r in read_jsonl(run / "metrics.jsonl") if "reward" in r]
    assert [step for step, _ in logged] == [1, *range(10, 251, 10)]  # the first step, then every 10 of 250
    assert logged[-1][1] > logged[0][1]
    report = (run / "report.html").read_text()
    assert 'alt="reward"' in report  # the reward curve
    assert f"before: base <small>({out / 'run' / 'final'})</small>" in report  # the table: SFT model -> GRPO
