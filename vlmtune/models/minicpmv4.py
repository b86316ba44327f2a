"""MiniCPM-V 4.6 and 4.7 (openbmb/MiniCPM-V-4.6, openbmb/MiniCPM-V-4.7-1B), native in transformers 5.23:
NaViT-style SigLIP with a window-attention merger inside the tower, an MLP merger, Qwen3.5 LM.

Everything but one detail goes through transformers' own classes: the processor packs all patches
of all images into one `pixel_values` row of shape [1, C, patch, L], joined along L, so batches are
concatenated along the last dimension instead of the first.
"""

from vlmtune.models.family import LLM_LINEAR_REGEX, Family


def _family(name: str) -> Family:
    return Family(
        name=name,
        vision=("model.vision_tower.",),
        projector=("model.merger.",),
        language_model=("model.language_model.", "lm_head."),
        lora_targets=LLM_LINEAR_REGEX,
        end_of_turn="<|im_end|>",
        concat_dims=(("pixel_values", -1),),
        dummy_vision_pass="hook",
    )


MINICPMV4_6 = _family("minicpmv4_6")
MINICPMV4_7 = _family("minicpmv4_7")
