"""Qwen3-VL: ViT with 16px patches and DeepStack mergers feeding early LM layers, Qwen3 LM."""

from vlmtune.models.family import Family

FAMILY = Family(
    name="qwen3_vl",
    vision=("model.visual.",),
    projector=("model.visual.merger.", "model.visual.deepstack_merger_list."),
    language_model=("model.language_model.", "lm_head."),
    end_of_turn="<|im_end|>",
    patch_factor=32,
    pixel_budget=True,
)
