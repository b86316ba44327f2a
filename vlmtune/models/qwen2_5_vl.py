"""Qwen2.5-VL: window-attention ViT (SwiGLU blocks with gate/up/down_proj), 2x2 merger, Qwen2 LM.

The vision blocks share projection names with the language model, which is why the default
LoRA regex is anchored on `language_model`.
"""

from vlmtune.models.family import Family, PlanGeometry, VisionBlock

FAMILY = Family(
    name="qwen2_5_vl",
    vision=("model.visual.",),
    projector=("model.visual.merger.",),
    language_model=("model.language_model.", "lm_head."),
    end_of_turn="<|im_end|>",
    patch_factor=28,
    pixel_budget=True,
    packable=True,
    vision_cache=True,
    dummy_vision_pass="hook",  # text-only batches run the tower on a blank image (vlmtune/distributed.py)
    plan=PlanGeometry(images="qwen", vision=VisionBlock(  # vision blocks: RMSNorm, SwiGLU
        prefix="model.visual.blocks.0", norms=("norm1", "norm2"), fused_qkv=True, gated_mlp=True, rms_norm=True,
        act_saves=1, roles=(("qkv", ("attn.qkv",)), ("o", ("attn.proj",)), ("up", ("mlp.gate_proj", "mlp.up_proj")),
                            ("down", ("mlp.down_proj",))))),
)
