"""A run's parts are resolved once (`vlmtune.parts.run_parts`): the model's config.json is read
once per `train()`, every command builds the same encoder from the same settings, and the rule
that processor and model config agree on `max_slice_nums` holds wherever a model loads."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT, base_overrides, clean_env, run_cli
from vlmtune.config import load_config
from vlmtune.data.formats import load_samples
from vlmtune.parts import run_parts


@pytest.mark.long
def test_one_train_reads_the_models_config_json_once_in_vlmtune(tiny_qwen2_vl, caption_data, tmp_path):
    # An audit hook sees every open(); it cannot be removed, so it runs in its own process. Opens
    # made by transformers (processor and model loading) are counted apart: only vlmtune's own
    # code is held to one read.
    script = textwrap.dedent(f"""
        import sys, traceback
        from pathlib import Path
        from vlmtune.config import load_config
        from vlmtune.train import train

        target = str(Path({str(tiny_qwen2_vl)!r}, "config.json").resolve())
        opened = []

        def hook(event, args):
            if event == "open" and isinstance(args[0], str) and args[0].endswith("config.json"):
                if str(Path(args[0]).resolve()) == target:
                    frames = [f.filename for f in traceback.extract_stack()[:-1]]
                    inner = next(f for f in reversed(frames) if "/vlmtune/" in f or "site-packages/" in f)
                    opened.append("vlmtune" if "/vlmtune/" in inner else "library")

        config = load_config(None, {base_overrides(tiny_qwen2_vl, caption_data['train'], tmp_path / 'run')!r})
        sys.addaudithook(hook)
        train(config)
        print("OPENED", opened.count("vlmtune"), opened.count("library"))
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=clean_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    own, library = map(int, result.stdout.split("OPENED")[1].split())
    assert own == 1, f"vlmtune opened config.json {own} times (libraries {library})"
    assert library >= 1  # the hook does see transformers' own reads: it is not blind


def test_data_check_and_training_count_the_same_tokens(tiny_qwen2_vl, caption_data, tmp_path):
    max_pixels = 56 * 56
    config = load_config(None, base_overrides(tiny_qwen2_vl, caption_data["train"], tmp_path / "run",
                                              f"data.max_pixels={max_pixels}", "data.prompt=Describe it."))
    encoder = run_parts(config, training=True).encoder
    lengths = [encoder.count_tokens(s) for s in load_samples(caption_data["train"])]
    longest = max(lengths)
    # the CLI's `data check` builds its encoder from the same settings: at max_length = the
    # longest sample nothing is too long, one token less flags exactly the longest ones
    common = ["data", "check", caption_data["train"], "--model", str(tiny_qwen2_vl), "--max-pixels", str(max_pixels),
              "--prompt", "Describe it."]
    assert run_cli([*common, "--max-length", str(longest)]).returncode == 0
    result = run_cli([*common, "--max-length", str(longest - 1)])
    assert result.returncode == 1
    assert f"{lengths.count(longest)} with problems" in result.stdout


@pytest.mark.parametrize("family", ["minicpmv2_6"])
def test_processor_and_model_config_agree_on_max_slice_nums(tiny_model_dir, caption_data, tmp_path, family):
    model = tiny_model_dir(family)
    config = load_config(None, base_overrides(model, caption_data["train"], tmp_path / "run", "data.max_slice_nums=2"))
    parts = run_parts(config)
    assert parts.processor.image_processor.max_slice_nums == 2
    assert parts.load_model().config.slice_config["max_slice_nums"] == 2
    # an adapter served beside it with other settings gets its own processor, the same weights folder
    other = load_config(None, base_overrides(model, caption_data["train"], tmp_path / "run2", "data.max_slice_nums=4"))
    served = parts.with_config(other)
    assert served.processor.image_processor.max_slice_nums == 4 and served.model_path == parts.model_path
    assert parts.with_config(config).processor is parts.processor
