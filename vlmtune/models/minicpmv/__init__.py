"""MiniCPM-V 2.0, MiniCPM-V 2.6 and MiniCPM-o 2.6 (vision-language part), native on transformers 5.

No code from a model folder is ever imported: the official checkpoints (config.json, safetensors with
their own weight names) load into vlmtune's classes. Modules: `version` (which architecture a
config.json describes), `configuration`, `vision`, `resampler`, `minicpm_llm` (MiniCPM-2.4B),
`modeling` (`MiniCPMVForConditionalGeneration`), `tiny` (tiny configs for tests).
"""

from vlmtune.models.minicpmv.configuration import MiniCPMOConfig, MiniCPMVConfig
from vlmtune.models.minicpmv.modeling import MiniCPMVForConditionalGeneration, load_config
from vlmtune.models.minicpmv.version import ARCHS, MINICPMO2_6, MINICPMV2, MINICPMV2_6, detect_arch

__all__ = ["ARCHS", "MINICPMO2_6", "MINICPMV2", "MINICPMV2_6", "MiniCPMOConfig", "MiniCPMVConfig",
           "MiniCPMVForConditionalGeneration", "detect_arch", "load_config"]
