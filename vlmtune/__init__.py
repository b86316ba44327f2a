"""vlmtune: fine-tune vision-language models and measure how much better they got."""

__version__ = "0.1.0"
