"""Which attention implementation and whether Liger kernels: resolved from what really imports here
and whether CUDA is present (no import is faked), `auto` never breaks a machine without them, and
asking for them where they cannot run is a clear error before any weights load."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from conftest import base_overrides
from vlmtune.config import load_config
from vlmtune.errors import ConfigError
from vlmtune.kernels import FLASH, flash_attention_support, resolve_attention, resolve_liger
from vlmtune.train import train


def installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


CUDA = torch.cuda.is_available()
FLASH_HERE = installed("flash_attn") and CUDA
LIGER_HERE = installed("liger_kernel") and CUDA


def test_auto_attention_follows_this_machine():
    for dtype in (torch.float32, torch.bfloat16):
        attention, why = resolve_attention("auto", dtype)
        if FLASH_HERE and dtype == torch.bfloat16:
            assert attention == FLASH
        else:
            assert attention is None and "transformers' default" in why  # sdpa where the model has it
            if not installed("flash_attn"):
                assert "flash-attn not installed" in why
            elif not CUDA:
                assert "no CUDA device" in why
            else:
                assert "needs bf16 or fp16" in why


def test_flash_attention_named_where_it_cannot_run_is_a_clear_error():
    ok, why = flash_attention_support(torch.float32)
    assert not ok  # fp32 never runs on flash-attn, installed or not
    with pytest.raises(ConfigError, match="flash_attention_2 cannot run here"):
        resolve_attention("flash_attention_2", torch.float32)
    if not FLASH_HERE:
        with pytest.raises(ConfigError, match="flash_attention_2 cannot run here"):
            resolve_attention("flash_attention_2", torch.bfloat16)


def test_other_attention_settings_pass_through():
    assert resolve_attention("sdpa", torch.float32)[0] == "sdpa"
    assert resolve_attention("eager", torch.float32)[0] == "eager"
    assert resolve_attention(None, torch.float32)[0] is None


def test_liger_follows_this_machine():
    assert resolve_liger(False, "qwen2_vl") == (False, "train.liger_kernel=false")
    use, why = resolve_liger("auto", "qwen2_vl")
    assert use == LIGER_HERE
    if not installed("liger_kernel"):
        assert "liger-kernel not installed" in why
    elif not CUDA:
        assert "no CUDA device" in why
    if not LIGER_HERE:
        with pytest.raises(ConfigError, match="train.liger_kernel=true cannot run here"):
            resolve_liger(True, "qwen2_vl")
    else:
        assert resolve_liger(True, "qwen2_vl")[0]
        assert not resolve_liger("auto", "no_such_model")[0]
        with pytest.raises(ConfigError, match="no kernels for model type 'no_such_model'"):
            resolve_liger(True, "no_such_model")


@pytest.mark.parametrize("value, expected", [("auto", "auto"), ("on", True), ("true", True), ("off", False)])
def test_liger_setting_reads_yaml_words(value, expected):
    assert load_config(None, [f"train.liger_kernel={value}"]).train.liger_kernel == expected


@pytest.mark.skipif(LIGER_HERE and FLASH_HERE, reason="both run on this machine")
def test_train_refuses_kernels_that_cannot_run_before_anything_loads(tiny_qwen2_vl, caption_data, tmp_path):
    setting = "train.liger_kernel=true" if not LIGER_HERE else "model.attn_implementation=flash_attention_2"
    with pytest.raises(ConfigError, match="cannot run here"):
        train(load_config(None, base_overrides(tiny_qwen2_vl, caption_data["train"], tmp_path / "run", setting)))
    assert not (tmp_path / "run").exists()  # refused before the data check and the run folder


def test_auto_attention_asks_the_model_class(tiny_model_dir, tmp_path):
    """`auto` never picks flash-attention for a class that does not support it (Blip-2, Mllama, ...):
    the class comes from config.json, and vlmtune's own MiniCPM class is named for its families."""
    import json

    from transformers import Blip2ForConditionalGeneration, Qwen2VLForConditionalGeneration

    from vlmtune.models import family_for
    from vlmtune.models.load import model_class
    from vlmtune.models.minicpmv.modeling import MiniCPMVForConditionalGeneration

    qwen = tiny_model_dir("qwen2_vl")
    assert model_class(qwen, family_for(qwen)) is Qwen2VLForConditionalGeneration
    minicpm = tiny_model_dir("minicpmv2_6")
    assert model_class(minicpm, family_for(minicpm)) is MiniCPMVForConditionalGeneration
    blip = tmp_path / "blip2"
    blip.mkdir()
    (blip / "config.json").write_text(json.dumps({"model_type": "blip-2"}))
    cls = model_class(blip, family_for(blip))
    assert cls is Blip2ForConditionalGeneration and not cls._supports_flash_attn
    attention, why = resolve_attention("auto", torch.bfloat16, cls)
    assert attention is None and "Blip2ForConditionalGeneration does not support flash-attention" in why
    assert resolve_attention("auto", torch.bfloat16, MiniCPMVForConditionalGeneration)[0] in (None, FLASH)
