"""Qwen2-VL (Qwen/Qwen2-VL-2B-Instruct, ...): ViT with 14px patches, 2x2 patch merger, Qwen2 LM."""

from vlmtune.models.family import Family, PlanGeometry, VisionBlock

FAMILY = Family(
    name="qwen2_vl",
    vision=("model.visual.",),
    projector=("model.visual.merger.",),
    language_model=("model.language_model.", "lm_head."),
    end_of_turn="<|im_end|>",
    patch_factor=28,
    pixel_budget=True,
    packable=True,
    vision_cache=True,
    dummy_vision_pass="hook",  # text-only batches run the tower on a blank image (vlmtune/distributed.py)
    # vision blocks: LayerNorm, fc1 -> quick_gelu -> fc2 (x and sigmoid(1.702x) are kept for backward)
    plan=PlanGeometry(images="qwen", vision=VisionBlock(
        prefix="model.visual.blocks.0", norms=("norm1", "norm2"), fused_qkv=True, gated_mlp=False, rms_norm=False,
        act_saves=2, roles=(("qkv", ("attn.qkv",)), ("o", ("attn.proj",)), ("up", ("mlp.fc1",)),
                            ("down", ("mlp.fc2",))))),
)
