"""MiniCPM-V 2.0, MiniCPM-V 2.6 and MiniCPM-o 2.6, on vlmtune's own implementation
(`vlmtune/models/minicpmv/`): the official checkpoints load as published, no remote code runs.

The parts are the official module names: `vpm` (SigLIP vision tower), `resampler` (perceiver
resampler, the projector) and `llm` (MiniCPM-2.4B, or Qwen2 / Qwen2.5 for 2.6 / o-2.6). The default
LoRA targets are the seeds' regex: the attention projections of the language model's layers. An
answer is trained through its end of turn: `</s>` for 2.0 (`<用户>...<AI>...` prompts), `<|im_end|>`
for the ChatML versions.
"""

from vlmtune.models.family import Family
from vlmtune.models.minicpmv.version import MINICPMO2_6, MINICPMV2, MINICPMV2_6

SEED_LORA_TARGETS = r"llm\..*layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)"


def _family(name: str, end_of_turn: str) -> Family:
    return Family(name=name, vision=("vpm.",), projector=("resampler.",), language_model=("llm.",),
                  lora_targets=SEED_LORA_TARGETS, end_of_turn=end_of_turn, native=True)


FAMILIES = {
    MINICPMV2: _family(MINICPMV2, "</s>"),
    MINICPMV2_6: _family(MINICPMV2_6, "<|im_end|>"),
    MINICPMO2_6: _family(MINICPMO2_6, "<|im_end|>"),
}
MODEL_TYPES = ("minicpmv", "minicpmo")  # config.json model_type values; `detect_arch` picks the version
