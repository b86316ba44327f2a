"""Random-weight tiny checkpoints with a real processor, tokenizer and chat template.

    vlmtune tiny-model --family qwen2_vl --out tiny/

Tests and the demo use these instead of hub weights (nothing is downloaded). The tokenizer is a
byte-level BPE trained on the spot on a small corpus, so every string encodes; the special
tokens and the chat template follow the real family's layout, so prompts look exactly like the
real model's prompts, only with fewer ids.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Literal

import torch

from vlmtune.errors import VlmtuneError
from vlmtune.fileio import removed_on_failure, temp_sibling
from vlmtune.models.bpe import build_tokenizer

# The chat layout of Qwen2-VL / Qwen2.5-VL (ChatML with vision markers). Written for vlmtune;
# it renders the same text as the official template for image/text content. No whitespace
# control: the string has no stray whitespace, and the newlines in it are part of the format.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part or 'image_url' in part %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' or 'video' in part %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in part %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|image_pad|>", "<|video_pad|>",
]

def _qwen_processor(family: str, tokenizer, patch_size: int, min_pixels: int, max_pixels: int):
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    image_processor = Qwen2VLImageProcessor(patch_size=patch_size, merge_size=2, temporal_patch_size=2,
                                            min_pixels=min_pixels, max_pixels=max_pixels)
    video_processor = Qwen2VLVideoProcessor(patch_size=patch_size, merge_size=2, temporal_patch_size=2)
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLProcessor as cls
    elif family == "qwen3_vl":
        from transformers import Qwen3VLProcessor as cls
        from transformers import Qwen3VLVideoProcessor
        video_processor = Qwen3VLVideoProcessor(patch_size=patch_size, merge_size=2, temporal_patch_size=2)
    else:
        cls = Qwen2VLProcessor
    return cls(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
               chat_template=QWEN_CHAT_TEMPLATE)


def _qwen_config(family: str, tokenizer, hidden: int, layers: int, heads: int, vision_dim: int, vision_depth: int):
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    head_dim = hidden // heads
    third = head_dim // 2 // 3
    mrope = [head_dim // 2 - 2 * third, third, third]  # must sum to head_dim / 2
    text = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                max_position_embeddings=4096, rms_norm_eps=1e-6, layer_types=["full_attention"] * layers,
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope})
    tokens = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    if family == "qwen2_vl":
        from transformers import Qwen2VLConfig as cls
        vision = dict(depth=vision_depth, embed_dim=vision_dim, hidden_size=hidden, num_heads=max(1, vision_dim // 16),
                      mlp_ratio=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    elif family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig as cls
        vision = dict(depth=vision_depth, hidden_size=vision_dim, intermediate_size=vision_dim * 2,
                      num_heads=max(1, vision_dim // 16), out_hidden_size=hidden, patch_size=14, window_size=56,
                      fullatt_block_indexes=[vision_depth - 1], spatial_merge_size=2, temporal_patch_size=2)
    elif family == "qwen3_vl":
        from transformers import Qwen3VLConfig as cls
        text.pop("layer_types")
        text["head_dim"] = head_dim
        text["rope_parameters"]["mrope_interleaved"] = True
        vision = dict(depth=vision_depth, hidden_size=vision_dim, intermediate_size=vision_dim * 2,
                      num_heads=max(1, vision_dim // 16), out_hidden_size=hidden, patch_size=16,
                      num_position_embeddings=64, deepstack_visual_indexes=[0], spatial_merge_size=2,
                      temporal_patch_size=2)
    else:
        raise VlmtuneError(f"no tiny model for family {family!r}")
    return cls(text_config=text, vision_config=vision, tie_word_embeddings=False, **tokens)


# MiniCPM-V 4.x marks images with these named tokens; the image token itself is `<unk>`, as in
# every MiniCPM-V release, and a ChatML template emits one per image part.
MINICPMV4_NAMED_TOKENS = {
    "image_token": "<unk>", "video_token": "<video>", "image_start_token": "<image>", "image_end_token": "</image>",
    "slice_start_token": "<slice>", "slice_end_token": "</slice>", "image_id_start_token": "<image_id>",
    "image_id_end_token": "</image_id>",
}


def _minicpmv4_parts(family: str, hidden: int, layers: int, heads: int, vision_dim: int, vision_depth: int,
                     image_size: int):
    """(processor, config) of a tiny MiniCPM-V 4.6 / 4.7: Qwen3.5 LM alternating linear and full
    attention layers as the real one does, NaViT SigLIP with its window merger after block 0."""
    from transformers.models.minicpmv4_6.image_processing_minicpmv4_6 import MiniCPMV4_6ImageProcessor
    from transformers.models.minicpmv4_6.video_processing_minicpmv4_6 import MiniCPMV4_6VideoProcessor

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *MINICPMV4_NAMED_TOKENS.values()]
    tokenizer = build_tokenizer(specials, named_tokens=MINICPMV4_NAMED_TOKENS)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in specials}
    # 16x downsampling: a slice of scale_resolution**2 pixels gives (scale_resolution / 14 / 4)**2 tokens
    slicing = dict(scale_resolution=image_size, max_slice_nums=4, patch_size=14)
    image_processor = MiniCPMV4_6ImageProcessor(**slicing)
    video_processor = MiniCPMV4_6VideoProcessor(**{**slicing, "max_slice_nums": 1})
    template = QWEN_CHAT_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", "<unk>")
    head_dim = hidden // heads
    text = dict(model_type="qwen3_5_text", vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                head_dim=head_dim, layer_types=["linear_attention" if i % 2 == 0 else "full_attention"
                                                for i in range(layers)],
                linear_key_head_dim=head_dim, linear_value_head_dim=head_dim, linear_num_key_heads=max(1, heads // 2),
                linear_num_value_heads=heads, max_position_embeddings=4096,
                eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], bos_token_id=ids["<|endoftext|>"])
    vision = dict(hidden_size=vision_dim, intermediate_size=vision_dim * 2, num_hidden_layers=vision_depth,
                  num_attention_heads=max(1, vision_dim // 16), image_size=image_size, patch_size=14)
    tokens = dict(image_token_id=ids["<unk>"], video_token_id=ids["<video>"])
    if family == "minicpmv4_6":
        from transformers import MiniCPMV4_6Config as config_cls
        from transformers import MiniCPMV4_6Processor as processor_cls
    else:
        from transformers import MiniCPMV4_7Config as config_cls
        from transformers import MiniCPMV4_7Processor as processor_cls
        tokens.update(image_start_id=ids["<image>"], image_end_id=ids["</image>"], slice_start_id=ids["<slice>"],
                      slice_end_id=ids["</slice>"], newline_id=tokenizer.convert_tokens_to_ids(
                          tokenizer.tokenize("\n")[0]))
    processor = processor_cls(image_processor=image_processor, video_processor=video_processor, tokenizer=tokenizer,
                              chat_template=template)
    config = config_cls(text_config=text, vision_config=vision, insert_layer_id=0, tie_word_embeddings=False, **tokens)
    return processor, config


def _build_tiny_minicpm(arch: str, out: Path, hidden: int, layers: int, heads: int, vision_dim: int,
                        vision_depth: int, image_size: int, seed: int) -> None:
    """A tiny MiniCPM-V 2.0 / 2.6 / MiniCPM-o 2.6 folder laid out like the official one, on vlmtune's
    own classes. Images are sliced at half of `image_size`, so a test image of that side is cut into
    a 2x2 grid: every tiny run goes through slicing, 4 image queries per slice."""
    from vlmtune.models.minicpmv.tiny import build_tiny_minicpm_model, tiny_minicpm_config
    from vlmtune.models.minicpmv.tiny_tokenizer import build_tiny_processor

    slicing = dict(scale_resolution=max(28, image_size // 2), query_num=4, max_slice_nums=4)
    processor = build_tiny_processor(arch, **slicing)
    tok = processor.tokenizer
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if ids["bos_token_id"] is None:  # the Qwen2 tokenizer of 2.6 has no BOS; its config names <|endoftext|>
        ids["bos_token_id"] = tok.pad_token_id
    config = tiny_minicpm_config(arch, len(tok), hidden=hidden, layers=layers, heads=heads, kv_heads=max(1, heads // 2),
                                 vision_dim=vision_dim, vision_depth=vision_depth, vision_image_size=image_size,
                                 **slicing, **ids)
    model = build_tiny_minicpm_model(config, seed=seed)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)


TINY_RECORD = "vlmtune_tiny.json"  # what built a tiny model folder: family, sizes, seed
MINICPM_TINY = ("minicpmv2", "minicpmv2_6", "minicpmo2_6")  # vlmtune's own implementation
TINY_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "minicpmv4_6", "minicpmv4_7", *MINICPM_TINY)


def build_tiny_model(family: str, out: str | Path, hidden: int = 64, layers: int = 2, heads: int = 4,
                     vision_dim: int = 32, vision_depth: int = 2, image_size: int = 112, seed: int = 0) -> Path:
    """Write a random-weight model of `family` with its processor to `out` and return the path.

    The image pixel budget is pinned to `image_size`**2 so that tiny images give few tokens.
    """
    from transformers import AutoModelForImageTextToText

    if family not in TINY_FAMILIES:
        raise VlmtuneError(f"no tiny model for family {family!r}; choose one of {', '.join(TINY_FAMILIES)}")
    out = Path(out)
    if family in MINICPM_TINY:
        _build_tiny_minicpm(family, out, hidden, layers, heads, vision_dim, vision_depth, image_size, seed)
        _write_tiny_record(out, family, hidden, layers, heads, vision_dim, vision_depth, image_size, seed)
        return out
    if family.startswith("minicpmv4"):
        processor, config = _minicpmv4_parts(family, hidden, layers, heads, vision_dim, vision_depth, image_size)
    else:
        tokenizer = build_tokenizer(QWEN_SPECIAL_TOKENS)
        patch = 16 if family == "qwen3_vl" else 14
        processor = _qwen_processor(family, tokenizer, patch, min_pixels=(patch * 2) ** 2,
                                    max_pixels=max(image_size * image_size, (patch * 2) ** 2))
        config = _qwen_config(family, tokenizer, hidden, layers, heads, vision_dim, vision_depth)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config)
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    _write_tiny_record(out, family, hidden, layers, heads, vision_dim, vision_depth, image_size, seed)
    return out


def _write_tiny_record(out: Path, family: str, hidden: int, layers: int, heads: int, vision_dim: int,
                       vision_depth: int, image_size: int, seed: int) -> None:
    (out / TINY_RECORD).write_text(json.dumps(
        {"family": family, "hidden": hidden, "layers": layers, "heads": heads, "vision_dim": vision_dim,
         "vision_depth": vision_depth, "image_size": image_size, "seed": seed}, indent=2))


def tiny_model_command(*, out: str, family: Literal["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "minicpmv4_6", "minicpmv4_7",
                                                    "minicpmv2", "minicpmv2_6", "minicpmo2_6"] = "qwen2_vl",
                       hidden: int = 64, layers: int = 2, vision_dim: int = 32, vision_depth: int = 2,
                       image_size: int = 112, seed: int = 0) -> int:
    """Build a random-weight tiny checkpoint of a model family, offline.

    Args:
        out: Folder to write the model, processor, tokenizer and chat template to.
        family: Model family (config.json model_type).
        hidden: Hidden size of the language model.
        layers: Number of language-model layers.
        vision_dim: Width of the vision encoder.
        vision_depth: Number of vision-encoder blocks.
        image_size: Side of the square pixel budget the processor resizes images to (MiniCPM-V 4.x: the
            slicing scale_resolution; MiniCPM-V 2.x: twice it, so such an image is cut into 2x2 slices).
        seed: Random seed for the weights.
    """
    path = Path(out)
    if path.exists() and not (path.is_dir() and (not any(path.iterdir()) or (path / TINY_RECORD).is_file())):
        raise VlmtuneError(f"{path} exists and is not a tiny model folder; choose another --out")
    temp = temp_sibling(path)  # built beside it and renamed: a crash or a full disk leaves no half model
    with removed_on_failure(temp, path, f"the tiny model {path}"):
        build_tiny_model(family, temp, hidden=hidden, layers=layers, vision_dim=vision_dim,
                         vision_depth=vision_depth, image_size=image_size, seed=seed)
        if path.exists():
            shutil.rmtree(path)  # empty, or the tiny model this command wrote before
        temp.rename(path)
    n = sum(p.numel() for p in __import__("safetensors.torch", fromlist=["load_file"]).load_file(
        str(path / "model.safetensors")).values())
    print(f"wrote tiny {family} ({n / 1e6:.2f}M parameters) to {path}")
    return 0
