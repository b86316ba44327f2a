"""Qwen3-VL: ViT with 16px patches and DeepStack mergers feeding early LM layers, Qwen3 LM."""

from vlmtune.models.family import Family, PlanGeometry, VisionBlock

FAMILY = Family(
    name="qwen3_vl",
    vision=("model.visual.",),
    projector=("model.visual.merger.", "model.visual.deepstack_merger_list."),
    language_model=("model.language_model.", "lm_head."),
    end_of_turn="<|im_end|>",
    patch_factor=32,
    pixel_budget=True,
    packable=True,
    vision_cache=True,  # its DeepStack features are cached with the image features
    dummy_vision_pass="hook",  # text-only batches run the tower on a blank image (vlmtune/distributed.py)
    # vision blocks: LayerNorm, linear_fc1 -> gelu(tanh) -> linear_fc2; the language model has q/k norms
    plan=PlanGeometry(images="qwen", qk_norm=True, vision=VisionBlock(
        prefix="model.visual.blocks.0", norms=("norm1", "norm2"), fused_qkv=True, gated_mlp=False, rms_norm=False,
        act_saves=1, roles=(("qkv", ("attn.qkv",)), ("o", ("attn.proj",)), ("up", ("mlp.linear_fc1",)),
                            ("down", ("mlp.linear_fc2",))))),
)
