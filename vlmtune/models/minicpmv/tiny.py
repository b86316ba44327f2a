"""Tiny MiniCPM-V configurations (model half), in the official config.json shape.

    config = tiny_minicpm_config("minicpmv2_6", vocab_size=len(tokenizer), bos_token_id=..., eos_token_id=...)
    model = build_tiny_minicpm_model(config, seed=0)

Hidden 64, 2 language-model layers, a 32-wide 2-block vision tower, 4 image queries: a forward pass takes
milliseconds on a CPU. The keys are the official ones for each version (`auto_map` included), so the
files look like the real checkpoints; sizes are the only difference. MiniCPM-V 2.0's timm tower is named
by `vision_encoder`; a tiny tower has no timm name, so its size is spelled out in `vision_config`.
"""

from __future__ import annotations

from typing import Any

import torch

from vlmtune.errors import VlmtuneError
from vlmtune.models.minicpmv.version import ARCHS, MINICPMO2_6, MINICPMV2, MINICPMV2_6

AUTO_MAP_V = {"AutoConfig": "configuration_minicpm.MiniCPMVConfig", "AutoModel": "modeling_minicpmv.MiniCPMV",
              "AutoModelForCausalLM": "modeling_minicpmv.MiniCPMV"}
AUTO_MAP_O = {"AutoConfig": "configuration_minicpm.MiniCPMOConfig", "AutoModel": "modeling_minicpmo.MiniCPMO",
              "AutoModelForCausalLM": "modeling_minicpmo.MiniCPMO"}
# timm has no tower this small; the parity script registers one under this name for the reference code.
TINY_TIMM_TOWER = "vlmtune_tiny_siglip_patch14"


def tiny_minicpm_config(arch: str, vocab_size: int, *, hidden: int = 64, layers: int = 2, heads: int = 4,
                        kv_heads: int = 2, vision_dim: int = 32, vision_depth: int = 2, vision_heads: int = 2,
                        query_num: int = 4, patch_size: int = 14, vision_image_size: int = 56,
                        scale_resolution: int = 56, max_slice_nums: int = 9, **overrides: Any) -> dict:
    """A config.json dict for a tiny `arch` model ('minicpmv2', 'minicpmv2_6', 'minicpmo2_6').

    Args:
        vocab_size: the tokenizer's size.
        vision_image_size: side, in pixels, of the vision tower's position table (image_size // patch_size
            positions per side).
        scale_resolution, max_slice_nums: slicing settings for the processor.
        overrides: any other key (token ids, dtype ...), written as given.
    """
    if arch not in ARCHS:
        raise VlmtuneError(f"no tiny MiniCPM-V for {arch!r}; choose one of {', '.join(ARCHS)}")
    if arch == MINICPMV2 and round(query_num ** 0.5) ** 2 != query_num:
        raise VlmtuneError(f"MiniCPM-V 2.0 needs a square query_num (its resampler's query grid), got {query_num}")
    text = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, hidden_act="silu",
                max_position_embeddings=4096, initializer_range=0.02, tie_word_embeddings=False,
                attention_dropout=0.0, torch_dtype="float32", use_cache=True, patch_size=patch_size,
                query_num=query_num)
    vision = dict(hidden_size=vision_dim, image_size=vision_image_size, intermediate_size=vision_dim * 2,
                  num_attention_heads=vision_heads, patch_size=patch_size)
    if arch == MINICPMV2:
        config = dict(architectures=["MiniCPMV"], auto_map=AUTO_MAP_V, model_type="minicpmv", **text,
                      attention_bias=False, bos_token_id=1, eos_token_id=2,
                      dim_model_base=hidden // 4, drop_vision_last_layer=True, image_size=scale_resolution,
                      max_slice_nums=max_slice_nums, mm_use_im_start_end=True, pretraining_tp=1, rms_norm_eps=1e-5,
                      rope_scaling=None, rope_theta=10000.0, scale_depth=1.4, scale_emb=12,
                      scale_resolution=scale_resolution, slice_mode=True, vision_encoder=TINY_TIMM_TOWER,
                      vision_config={**vision, "num_hidden_layers": vision_depth + 1})  # the last one is dropped
        config["num_key_value_heads"] = heads  # MiniCPM-2.4B has no grouped attention
    else:
        slice_config = dict(max_slice_nums=max_slice_nums, model_type="minicpmv", patch_size=patch_size,
                            scale_resolution=scale_resolution)
        config = dict(architectures=["MiniCPMV"], auto_map=AUTO_MAP_V, model_type="minicpmv", version=2.6, **text,
                      batch_vision_input=True, drop_vision_last_layer=False, image_size=scale_resolution,
                      max_window_layers=layers, rms_norm_eps=1e-6, rope_theta=1000000.0, slice_config=slice_config,
                      slice_mode=True, sliding_window=131072, use_image_id=True, use_sliding_window=False,
                      vision_batch_size=16,
                      vision_config={**vision, "model_type": "siglip", "num_hidden_layers": vision_depth})
        if arch == MINICPMO2_6:
            config.update(architectures=["MiniCPMO"], auto_map=AUTO_MAP_O, model_type="minicpmo", init_vision=True,
                          init_audio=False, init_tts=False, audio_pool_step=2, audio_chunk_length=1.0,
                          stream_input=False, listen_speak_type="asr")
            config["vision_config"]["model_type"] = "siglip_vision_model"
        assert arch in (MINICPMV2_6, MINICPMO2_6)
    config.update(overrides)
    return config


def build_tiny_minicpm_model(config: dict, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A random-weight `MiniCPMVForConditionalGeneration` for the config dict `config`."""
    from vlmtune.models.minicpmv.modeling import MiniCPMVForConditionalGeneration, config_class_for

    torch.manual_seed(seed)
    cfg = config_class_for(config.get("model_type"))(**config)
    return MiniCPMVForConditionalGeneration(cfg).to(dtype).eval()
