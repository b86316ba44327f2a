"""Any other `AutoModelForImageTextToText` model (LLaVA, Idefics3, SmolVLM, Gemma 3, InternVL,
PaliGemma, MiniCPM-V 4.x ...): transformers 5 names the parts consistently enough to cover them
with a few prefixes. The end-of-turn token is found from the chat template at run time."""

from vlmtune.models.family import Family

FAMILY = Family(
    name="generic",
    vision=("model.vision_tower.", "model.vision_model.", "model.visual.", "model.vpm."),
    projector=("model.multi_modal_projector.", "model.connector.", "model.mlp1.", "model.resampler.",
               "model.visual.merger."),
    language_model=("model.language_model.", "model.text_model.", "model.llm.", "lm_head."),
    # where the processor's blank image suits the model's get_image_features; if not, said when it matters
    dummy_vision_pass="hook",
)
