"""MiniCPM-V 2.0, MiniCPM-V 2.6 and MiniCPM-o 2.6, on vlmtune's own implementation
(`vlmtune/models/minicpmv/`): the official checkpoints load as published, no remote code runs.

The parts are the official module names: `vpm` (SigLIP vision tower), `resampler` (perceiver
resampler, the projector) and `llm` (MiniCPM-2.4B, or Qwen2 / Qwen2.5 for 2.6 / o-2.6). The default
LoRA targets are the tutorials' regex: the attention projections of the language model's layers. An
answer is trained through its end of turn: `</s>` for 2.0 (`<用户>...<AI>...` prompts), `<|im_end|>`
for the ChatML versions.
"""

from vlmtune.models.family import Family, PlanGeometry, VisionBlock
from vlmtune.models.minicpmv.version import MINICPMO2_6, MINICPMV2, MINICPMV2_6

SEED_LORA_TARGETS = r"llm\..*layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)"

_FC_MLP = (("up", ("mlp.fc1",)), ("down", ("mlp.fc2",)))
TIMM_SIGLIP = VisionBlock(  # 2.0: timm ViT, fused qkv
    prefix="vpm.blocks.0", norms=("norm1", "norm2"), fused_qkv=True, gated_mlp=False, rms_norm=False, act_saves=1,
    roles=(("qkv", ("attn.qkv",)), ("o", ("attn.proj",)), *_FC_MLP))
NAVIT_SIGLIP = VisionBlock(  # 2.6, o-2.6
    prefix="vpm.encoder.layers.0", norms=("layer_norm1", "layer_norm2"), fused_qkv=False, gated_mlp=False,
    rms_norm=False, act_saves=1,
    roles=(("qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")), ("o", ("self_attn.out_proj",)),
           *_FC_MLP))


def _family(name: str, end_of_turn: str, vision: VisionBlock) -> Family:
    return Family(name=name, vision=("vpm.",), projector=("resampler.",), language_model=("llm.",),
                  lora_targets=SEED_LORA_TARGETS, end_of_turn=end_of_turn, own_implementation=True,
                  plan=PlanGeometry(images="minicpm", vision=vision), dummy_vision_pass="model")


FAMILIES = {
    MINICPMV2: _family(MINICPMV2, "</s>", TIMM_SIGLIP),
    MINICPMV2_6: _family(MINICPMV2_6, "<|im_end|>", NAVIT_SIGLIP),
    MINICPMO2_6: _family(MINICPMO2_6, "<|im_end|>", NAVIT_SIGLIP),
}
MODEL_TYPES = ("minicpmv", "minicpmo")  # config.json model_type values; `detect_arch` picks the version
