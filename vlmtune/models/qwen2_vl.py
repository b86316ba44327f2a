"""Qwen2-VL (Qwen/Qwen2-VL-2B-Instruct, ...): ViT with 14px patches, 2x2 patch merger, Qwen2 LM."""

from vlmtune.models.family import Family

FAMILY = Family(
    name="qwen2_vl",
    vision=("model.visual.",),
    projector=("model.visual.merger.",),
    language_model=("model.language_model.", "lm_head."),
    end_of_turn="<|im_end|>",
    patch_factor=28,
    pixel_budget=True,
)
