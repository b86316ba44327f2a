"""MiniCPM-V 2.0, MiniCPM-V 2.6 and MiniCPM-o 2.6 (vision-language part), native on transformers 5.

No code from a model folder is ever imported: the official checkpoints (config.json, safetensors with
their own weight names) load into vlmtune's classes. Modules: `version` (which architecture a
config.json describes), `configuration`, `vision`, `resampler`, `minicpm_llm` (MiniCPM-2.4B),
`modeling` (`MiniCPMVForConditionalGeneration`), `image_processing`, `chat_format`, `processing`
(`MiniCPMVProcessor`), `tiny` / `tiny_tokenizer` (tiny checkpoints for tests).

This file imports nothing heavy: `vlmtune.models` reads `version` to pick a family at start-up, and
the model classes (torch, transformers) load only when a model does.
"""

from vlmtune.models.minicpmv.version import ARCHS, MINICPMO2_6, MINICPMV2, MINICPMV2_6, detect_arch

__all__ = ["ARCHS", "MINICPMO2_6", "MINICPMV2", "MINICPMV2_6", "detect_arch"]
