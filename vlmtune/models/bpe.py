"""A small byte-level BPE tokenizer, trained on the spot, for the tiny test models.

Every string encodes (byte fallback), and the words the tests and the demo use are whole tokens,
so prompts are short. `vlmtune.models.tiny` (Qwen and MiniCPM-V 4.x) and
`vlmtune.models.minicpmv.tiny_tokenizer` (MiniCPM-V 2.x) build their tokenizers with it.
"""

from __future__ import annotations

# Words the byte-level BPE should know as whole tokens: chat scaffolding, the synthetic caption
# vocabulary, LaTeX commands and the seeds' prompts. Anything else still encodes byte by byte.
_CORPUS = [
    "system user assistant You are a helpful assistant.",
    "a red green blue yellow circle square triangle and on the left right top bottom of with",
    "A snow skier assessing the mountain before starting to ski. COCO Yes:",
    r"\frac \sqrt \alpha \beta \gamma \delta \theta \lambda \mu \pi \sigma \phi \omega \sum \int \infty",
    r"x^{2} y_{1} \frac{a}{b} \sqrt{x} a+b=c 0 1 2 3 4 5 6 7 8 9 ( ) [ ] { } ^ _ + - = \cdot \times",
    "你是一个LaText OCR助手,目标是读取用户输入的照片，转换成LaTex公式。这张图对应的LaTex公式是什么？",
    "What is in the image? Describe the picture. Who are they? What are they doing?",
]


def build_tokenizer(special_tokens: list[str], vocab_size: int = 512, pad_token: str = "<|endoftext|>",
                    eos_token: str = "<|im_end|>", named_tokens: dict[str, str] | None = None):
    """A byte-level BPE `PreTrainedTokenizerFast` trained on `_CORPUS`, with `special_tokens`.

    `named_tokens` ({"image_token": "<unk>", ...}) become tokenizer attributes, as processors of
    MiniCPM-V 4.x read them (`tokenizer.image_token`, `tokenizer.slice_start_token`, ...)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    extra = [t for t in special_tokens if t not in (pad_token, eos_token)]
    if named_tokens:
        extra = {**{f"extra_token_{i}": t for i, t in enumerate(t for t in extra if t not in named_tokens.values())},
                 **named_tokens}
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=pad_token, eos_token=eos_token,
                                   extra_special_tokens=extra)
