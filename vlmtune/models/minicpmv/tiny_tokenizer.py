"""The processor half of tiny MiniCPM-V 2.0 / 2.6 / MiniCPM-o 2.6 checkpoints, built offline.

    processor = build_tiny_processor("minicpmv2_6")
    processor.save_pretrained(out)        # preprocessor_config.json, tokenizer.json, tokenizer_config.json

The tokenizer is the byte-level BPE of `vlmtune.models.bpe.build_tokenizer`, trained on the spot,
with each version's special tokens in the official order (2.0: `<unk>`=0, `<s>`=1, `</s>`=2 as in
the MiniCPM vocabulary, which the official code relies on: it strips id 0 as padding). Images are
sliced with small settings (scale_resolution 28 px, patch 14, 4 query tokens, at most 4 slices)
so a 112 px test image gives a 2x2 grid of 28 px cells. The folder carries the official
`auto_map` / `tokenizer_class` entries, pointing at remote code that is not there, so it is laid
out like the published folders and proves vlmtune loads them without that code.
"""

from __future__ import annotations

from dataclasses import dataclass

from vlmtune.errors import VlmtuneError
from vlmtune.models.minicpmv.chat_format import CHATML_TEMPLATE, MINICPMV2_TEMPLATE
from vlmtune.models.minicpmv.image_processing import MiniCPMVImageProcessor
from vlmtune.models.minicpmv.processing import MiniCPMVProcessor

_MINICPMV_TOKENS = ["<image>", "</image>", "<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>",
                    "<point>", "</point>", "<slice>", "</slice>"]
_QWEN_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_OMNI_TOKENS = ["<|audio_start|>", "<|audio|>", "<|audio_end|>", "<|spk_bos|>", "<|spk|>", "<|spk_eos|>",
                "<|tts_bos|>", "<|tts_eos|>", "<|listen|>", "<|speak|>", "<|interrupt|>", "<|vad_start|>",
                "<|vad_end|>"]


@dataclass(frozen=True)
class TinyVariant:
    version: float
    special_tokens: list[str]
    pad_token: str
    eos_token: str
    bos_token: str | None
    use_image_id: bool
    chat_template: str
    tokenizer_extra: dict  # the official tokenizer_config.json's auto_map / tokenizer_class
    preprocessor_extra: dict  # ... and preprocessor_config.json's


VARIANTS: dict[str, TinyVariant] = {
    "minicpmv2": TinyVariant(
        version=2.0, special_tokens=["<unk>", "<s>", "</s>", *_MINICPMV_TOKENS], pad_token="<unk>", eos_token="</s>",
        bos_token="<s>", use_image_id=False, chat_template=MINICPMV2_TEMPLATE,
        tokenizer_extra={"auto_map": {"AutoTokenizer": ["tokenization_minicpmv.MiniCPMVTokenizer", None]},
                         "tokenizer_class": "MiniCPMVTokenizer"},
        preprocessor_extra={"image_processor_type": "MiniCPMVImageProcessor", "processor_class": "MiniCPMVProcessor",
                            "auto_map": {"AutoProcessor": "processing_minicpmv.MiniCPMVProcessor",
                                         "AutoImageProcessor": "image_processing_minicpmv.MiniCPMVImageProcessor"}}),
    "minicpmv2_6": TinyVariant(
        version=2.6, special_tokens=[*_QWEN_TOKENS, *_MINICPMV_TOKENS, "<image_id>", "</image_id>", "<unk>"],
        pad_token="<|endoftext|>", eos_token="<|im_end|>", bos_token=None, use_image_id=True,
        chat_template=CHATML_TEMPLATE,
        tokenizer_extra={"auto_map": {"AutoTokenizer": ["tokenization_minicpmv_fast.MiniCPMVTokenizerFast", None]},
                         "tokenizer_class": "MiniCPMVTokenizerFast"},
        preprocessor_extra={"image_processor_type": "MiniCPMVImageProcessor", "processor_class": "MiniCPMVProcessor",
                            "auto_map": {"AutoProcessor": "processing_minicpmv.MiniCPMVProcessor",
                                         "AutoImageProcessor": "image_processing_minicpmv.MiniCPMVImageProcessor"}}),
    "minicpmo2_6": TinyVariant(
        version=2.6, special_tokens=[*_QWEN_TOKENS, *_MINICPMV_TOKENS, "<image_id>", "</image_id>", "<unk>",
                                     *_OMNI_TOKENS],
        pad_token="<|endoftext|>", eos_token="<|im_end|>", bos_token=None, use_image_id=True,
        chat_template=CHATML_TEMPLATE,
        tokenizer_extra={"auto_map": {"AutoTokenizer": ["tokenization_minicpmo_fast.MiniCPMOTokenizerFast", None]},
                         "tokenizer_class": "MiniCPMOTokenizerFast"},
        preprocessor_extra={"image_processor_type": "MiniCPMVImageProcessor", "processor_class": "MiniCPMOProcessor",
                            "auto_map": {"AutoProcessor": "processing_minicpmo.MiniCPMOProcessor",
                                         "AutoImageProcessor": "image_processing_minicpmv.MiniCPMVImageProcessor"}}),
}


def build_tiny_tokenizer(variant: str):
    """A small byte-level BPE tokenizer with `variant`'s special tokens (see `VARIANTS`)."""
    from vlmtune.models.bpe import build_tokenizer

    spec = _variant(variant)
    tokenizer = build_tokenizer(spec.special_tokens, pad_token=spec.pad_token, eos_token=spec.eos_token)
    tokenizer.unk_token = "<unk>"
    if spec.bos_token:
        tokenizer.bos_token = spec.bos_token
    return tokenizer


def build_tiny_processor(variant: str, scale_resolution: int = 28, patch_size: int = 14, query_num: int = 4,
                         max_slice_nums: int = 4) -> MiniCPMVProcessor:
    """A `MiniCPMVProcessor` of `variant` with a tiny tokenizer and small slicing settings."""
    spec = _variant(variant)
    image_processor = MiniCPMVImageProcessor(
        max_slice_nums=max_slice_nums, scale_resolution=scale_resolution, patch_size=patch_size,
        image_feature_size=query_num, slice_mode=True, use_image_id=spec.use_image_id, version=spec.version,
        extra=dict(spec.preprocessor_extra))
    return MiniCPMVProcessor(build_tiny_tokenizer(variant), image_processor, spec.chat_template,
                             dict(spec.tokenizer_extra))


def _variant(name: str) -> TinyVariant:
    if name not in VARIANTS:
        raise VlmtuneError(f"no tiny MiniCPM-V variant {name!r}; choose one of {', '.join(VARIANTS)}")
    return VARIANTS[name]
