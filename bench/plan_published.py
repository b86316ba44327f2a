"""`vlmtune plan` for the configurations whose memory use is published, beside the published numbers.

    .venv/bin/python bench/plan_published.py      # prints the table, writes bench/results/plan_published.json

The models are described by the values of their published config.json files (written here into
temporary folders; `vlmtune plan` reads nothing else, so no weights are needed):
- MiniCPM-V 2.6 (openbmb/MiniCPM-V-2_6): SigLIP-400M (hidden 1152, 27 layers, MLP 4304, patch 14,
  980 px position table) + a 64-query resampler + Qwen2-7B (hidden 3584, 28 layers, 28 heads, 4 kv
  heads, MLP 18944, vocabulary 151,666, untied); slices of 448 px, at most 9 besides the whole image.
- MiniCPM-o 2.6 (openbmb/MiniCPM-o-2_6): the same vision part + Qwen2.5-7B (same sizes, vocabulary
  151,700); audio and TTS not built (init_audio / init_tts false, as seed 000 loads it).

Published figures:
- seed 000 (MiniCPM-o 2.6 LoRA on LaTeX OCR): "显存占用：约25GB" (about 25 GB). Its script: one GPU,
  bf16, batch 1, gradient checkpointing, model_max_length 2048, max_slice_nums 9, LoRA r=64 alpha 16
  dropout 0.1 on the language model's q/k/v/o_proj, and `modules_to_save` embed_tokens, resampler
  and (tune_vision) the vision tower: trained fully, next to their frozen originals.
- OpenBMB/MiniCPM-V finetune/readme.md, "Memory Usage Statistics": A100 80 GiB, DeepSpeed ZeRO-3
  with the optimizer and the parameters offloaded to the CPU, gradient checkpointing, max length
  2048, batch size 1: LoRA 14.4 / 13.6 / 13.1 GiB and full fine-tuning 16.0 / 15.8 / 15.63 GiB on
  2 / 4 / 8 GPUs. The readme lists MiniCPM-o 2.6, MiniCPM-V 2.6 (and older models) for these scripts;
  the same numbers were first published for MiniCPM-Llama3-V 2.5. Their LoRA script trains the vision
  tower (tune_vision true), the resampler and the embeddings too; the LoRA targets are the language
  model's attention projections.
The LaTeX OCR images of seed 000 are small (about 500 x 100 px), so MiniCPM does not slice them:
one 448-px image, 1,024 patches, 64 tokens. The readme's data is unknown: planned at the worst case
the slice settings allow (10 images of 1,024 patches, 640 tokens) and at one image.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results" / "plan_published.json"

VISION = {"hidden_size": 1152, "image_size": 980, "intermediate_size": 4304, "model_type": "siglip",
          "num_attention_heads": 16, "num_hidden_layers": 27, "patch_size": 14}
QWEN2_7B = {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
            "num_key_value_heads": 4, "max_position_embeddings": 32768, "tie_word_embeddings": False}
COMMON = {"query_num": 64, "image_size": 448, "patch_size": 14, "drop_vision_last_layer": False, "version": "2.6",
          "slice_config": {"max_slice_nums": 9, "patch_size": 14, "scale_resolution": 448}, "vision_config": VISION}
MODELS = {
    "MiniCPM-V 2.6": {"model_type": "minicpmv", "vocab_size": 151666, **QWEN2_7B, **COMMON},
    "MiniCPM-o 2.6": {"model_type": "minicpmo", "vocab_size": 151700, **QWEN2_7B, **COMMON},
}
ZERO3_OFFLOAD = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"},
                                       "offload_param": {"device": "cpu"}}}
ATTENTION = r"llm\..*layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)"

# (configuration, model, published GiB or None, gpus, run-config overrides, image size or None for the worst case)
SEED_000 = ["train.method=lora", "lora.r=64", "lora.alpha=16", "lora.dropout=0.1", f"lora.targets={ATTENTION}",
            "lora.modules_to_save=[embed_tokens]", "train.freeze_vision=false", "train.freeze_projector=false",
            "train.batch_size=1", "train.grad_accum=1", "train.gradient_checkpointing=true", "data.max_length=2048"]
README_LORA = ["train.method=lora", "lora.r=64", "lora.dropout=0.05", f"lora.targets={ATTENTION}",
               "lora.modules_to_save=[embed_tokens]", "train.freeze_vision=false", "train.freeze_projector=false",
               "train.batch_size=1", "train.gradient_checkpointing=true", "data.max_length=2048"]
README_FULL = ["train.method=full", "train.freeze_vision=false", "train.freeze_projector=false",
               "train.batch_size=1", "train.gradient_checkpointing=true", "data.max_length=2048"]


def scenarios() -> list[dict]:
    rows = [
        {"configuration": "seed 000: MiniCPM-o 2.6 LoRA, 1 GPU, LaTeX OCR images (1 slice)", "model": "MiniCPM-o 2.6",
         "published_gib": 25 * 1e9 / 2 ** 30, "published": "about 25 GB", "gpus": 1, "overrides": SEED_000,
         "image_size": [500, 100]},
        {"configuration": "seed 000: MiniCPM-o 2.6 LoRA, 1 GPU, images of 10 slices", "model": "MiniCPM-o 2.6",
         "published_gib": 25 * 1e9 / 2 ** 30, "published": "about 25 GB", "gpus": 1, "overrides": SEED_000,
         "image_size": None},
    ]
    for method, overrides, published in (("LoRA", README_LORA, (14.4, 13.6, 13.1)),
                                         ("full", README_FULL, (16.0, 15.8, 15.63))):
        for gpus, gib in zip((2, 4, 8), published):
            for image, label in ((None, "10 slices"), ([448, 448], "1 slice")):
                rows.append({"configuration": f"MiniCPM-V 2.6 {method}, ZeRO-3 + CPU offload, {gpus} GPUs, {label}",
                             "model": "MiniCPM-V 2.6", "published_gib": gib, "published": f"{gib} GiB", "gpus": gpus,
                             "overrides": [*overrides, "train.deepspeed=DS"], "image_size": image})
    return rows


def main() -> int:
    from vlmtune.config import load_config
    from vlmtune.plan.estimate import GiB
    from vlmtune.plan.summary import summarize
    from vlmtune.plan import make_plan

    out = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        summaries = {}
        for name, config in MODELS.items():
            folder = tmp / name.replace(" ", "_")
            folder.mkdir()
            (folder / "config.json").write_text(json.dumps(config))
            summaries[name] = (folder, summarize(folder))
        ds = tmp / "zero3_offload.json"
        ds.write_text(json.dumps(ZERO3_OFFLOAD))
        for row in scenarios():
            folder, summary = summaries[row["model"]]
            overrides = [o.replace("=DS", f"={ds}") for o in row["overrides"]]
            overrides += [f"model.name_or_path={folder}", "model.dtype=bf16", "data.train=unused.json"]
            if row["image_size"]:
                overrides.append(f"data.image_size={json.dumps(row['image_size'])}")
            plan = make_plan(load_config(None, overrides), "cuda", row["gpus"], 1, summary=summary)
            e = plan.estimate
            result = {**{k: row[k] for k in ("configuration", "published", "published_gib", "gpus")},
                      "estimate_gib": round(e.total / GiB, 2), "tensor_peak_gib": round(e.tensors / GiB, 2),
                      "ratio": round(e.total / GiB / row["published_gib"], 3), "peak_moment": e.moment,
                      "components_gib": {k: round(getattr(e, k) / GiB, 2) for k in
                                         ("weights", "optimizer", "gradients", "activations", "transient", "batch",
                                          "overhead")},
                      "trainable_parameters": plan.trainable.count(), "tokens_per_image": plan.tokens_per_image}
            out.append(result)
            print(f"{row['configuration']:<64} published {row['published']:>12}  plan {e.total / GiB:6.1f} GiB "
                  f"(tensors {e.tensors / GiB:5.1f})  {e.moment}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"rows": out}, indent=2, ensure_ascii=False))
    print(f"results in {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
