"""GPU training-step benchmark on real-size models with random weights, LoRA and full fine-tuning, each
model's reference pipeline against vlmtune: Qwen2-VL-2B (the seeds' pipeline) and MiniCPM-V 2.6 (the
official MiniCPM-V finetune pipeline).

    .venv/bin/python bench/gpu.py                  # on a CUDA machine; writes bench/results/gpu.json
    .venv/bin/python bench/gpu.py --models minicpmv2_6 --work /tmp/gpu-bench   # one model; --work keeps the
                                                   # built model for a later call (and for the other model)
    .venv/bin/python bench/gpu.py --smoke          # the same code on CPU with tiny models, in seconds

Without a CUDA device (and without --smoke) it prints one line and exits 0.

Qwen2-VL-2B. The model is Qwen/Qwen2-VL-2B-Instruct's architecture with the values of its published
config.json written below (`QWEN2_VL_2B`), built with `from_config` in bf16: nothing is downloaded. Its
tokenizer is vlmtune's tiny byte-level BPE with the Qwen special tokens (the real vocabulary size,
151,936, is kept in the embedding and head); token ids do not change the cost of a step. The data are
vlmtune's synthetic LaTeX formula images resized to seed 002's fixed 500x100 (height x width) for every
pipeline, so a sample has the same tokens in each (about 130-190: 72 image tokens, the prompt, an answer
of 1-40 tokens). Pipelines, each run in its own process (peak memory is per process, and Liger patches
classes):
  - seed: bench/seed_pipeline.py's `process_func` (the seeds' `Dataset.map`, tensors as lists),
    `DataCollatorForSeq2Seq` padded batches of 4 in random order, transformers' default attention
    (sdpa), no Liger, bf16 weights without autocast as the seeds load them;
  - vlmtune_grouped: `vlmtune train`, padded batches of 4 grouped by length, model.attn_implementation
    and train.liger_kernel on auto (flash-attention 2 and Liger where installed);
  - vlmtune_packed: the same with data.packing=true: one row per step holding packs of at most 4 x the
    longest sample, so a step carries at most as many tokens as a padded batch of 4.
Both methods: LoRA r=64, alpha=16, dropout 0.05 on the language model's q/k/v/o/gate/up/down_proj;
full fine-tuning of the language model (vision tower and projector frozen, vlmtune's default; the
seeds' Qwen2-VL scripts only do LoRA, so the seed baseline swaps LoRA for the same freezing).

MiniCPM-V 2.6. vlmtune's own `MiniCPMVForConditionalGeneration` built with `_from_config` in bf16 from
the published config.json values of openbmb/MiniCPM-V-2_6 (tests/data/minicpm/published_configs.json,
"minicpmv2_6": Qwen2-7B language model, 27-layer SigLIP-400M, 64-query resampler; 8,099,175,152
parameters, as the official code builds them). Its processor is vlmtune's `MiniCPMVProcessor` with the
checkpoint's real slicing settings (scale_resolution 448, patch 14, query_num 64, max_slice_nums 9,
image ids) around the tiny tokenizer of `vlmtune.models.minicpmv.tiny_tokenizer` (512 ids, all inside
the real 151,666-entry embedding: text lengths differ somewhat from the real vocabulary's, the 64
query tokens per slice that dominate a sample do not). The data are seed 000's task: the synthetic LaTeX formulas with
seed 000's prompt, one image per sample, not resized: MiniCPM upscales each to about 448x448 pixels
(about 1,000 patches, one slice, 64 query tokens). `--minicpm-image-scale 8` enlarges every image 8x
first, so that most are cut into 2-6 cells (3-7 slices with the overview, 64 queries each). Runs follow
the seed configs: LoRA = configs/minicpmv2_6_lora.yaml (seed 004: r=64 on the LLM's q/k/v by the seeds'
regex, vision tower and resampler trained fully, embed_tokens in modules_to_save), full =
configs/minicpmv2_6_full.yaml (everything trains); batch size 2 (seed 004), one GPU (no DeepSpeed).
Pipelines:
  - official: the official finetune data path and trainer re-created on vlmtune's model
    (bench/minicpm_official_pipeline.py: per-sample processing in the main process, padding to the
    batch's longest in random order, float32 logits and full-vocabulary loss, `empty_cache` per step),
    transformers' default attention (sdpa);
  - vlmtune_grouped: `vlmtune train` with the same config, batches grouped by length, one DataLoader
    worker, attention on auto. MiniCPM has no packing (vlmtune refuses it for this family) and Liger
    has no kernels for it.
Gradient checkpointing on everywhere (the seeds turn it on).

Figures over the steps after `--warmup`: samples/s, non-padding tokens/s, trained (label) tokens/s,
padding fraction, seconds per step, model FLOPs utilisation, and the peak of
`torch.cuda.max_memory_allocated` over the whole run. A run that runs out of GPU memory is reported as
such (its peak included) and the others go on.

Model FLOPs (PaLM's convention: no recomputation from checkpointing, attention counted unmasked,
padding not counted), per sample of s tokens (image tokens included) and per image (Qwen) or slice
(MiniCPM) of p patches:
    LM matmuls, forward   F_lm  = 2 * N_lm * s          N_lm: LM weights without the embedding, plus the
                                                         head (Qwen2-VL: V x d, tied to the embedding)
    LM attention, forward F_att = 4 * L * d * s^2        L layers, d hidden size
    vision, forward       F_vis = 2 * N_vis * p + 4 * L_v * d_v * p^2   (N_vis without position tables)
    resampler, forward    F_res = 2 * p * (d_v * d + 2 * d^2) + 6 * Q * d^2 + 4 * Q * p * d   (MiniCPM:
                          kv_proj and key/value projections on the p patches; query, output and final
                          projections on the Q = 64 queries; the cross-attention)
    a step: m_lm * F_lm + 3 * F_att + m_vis * F_vis + m_res * F_res, where a part whose weights train
    costs 3x its forward (input and weight gradients), a frozen part that gradients pass through 2x
    (input gradients: the LM under LoRA, whose r=64 adapter matmuls are left out), a frozen part at the
    start of the graph 1x. Qwen2-VL: LoRA 2*F_lm + 3*F_att + F_vis, full 3*F_lm + 3*F_att + F_vis;
    MiniCPM-V 2.6 (vision and resampler train in both): LoRA 2*F_lm + 3*(F_att + F_vis + F_res), full
    3*(F_lm + F_att + F_vis + F_res).
MFU = model FLOPs per second / the device's dense bf16 peak (`PEAK_BF16`, or --peak-tflops).
Padding tokens do no useful work and are not counted: that is where packing and grouping show.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "gpu.json"
MODELS = ("qwen2_vl", "minicpmv2_6")
# the reference pipeline first: ratios are taken against it
PIPELINES = {"qwen2_vl": ("seed", "vlmtune_grouped", "vlmtune_packed"),
             "minicpmv2_6": ("official", "vlmtune_grouped")}
PROMPT = "你是一个LaText OCR助手,目标是读取用户输入的照片，转换成LaTex公式。"  # seed 002's prompt
IMAGE_HW = (500, 100)  # seed 002: resized_height=500, resized_width=100
BATCH = 4  # the Qwen seeds' per-device batch size
MINICPM_PROMPT = "这张图对应的LaTex公式是什么？"  # seed 000's question
MINICPM_BATCH = 2  # seed 004's per_device_train_batch_size
MINICPM_CONFIGS = {method: ROOT / "configs" / f"minicpmv2_6_{method}.yaml" for method in ("lora", "full")}
PUBLISHED_MINICPM = ROOT / "tests" / "data" / "minicpm" / "published_configs.json"
# openbmb/MiniCPM-V-2_6's slicing settings (its preprocessor_config.json and config.json)
MINICPM_SLICING = {"scale_resolution": 448, "patch_size": 14, "query_num": 64, "max_slice_nums": 9}

# Qwen/Qwen2-VL-2B-Instruct config.json (published values; the special token ids come from the tokenizer)
QWEN2_VL_2B = {
    "text": {"vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
             "num_attention_heads": 12, "num_key_value_heads": 2, "hidden_act": "silu",
             "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "use_sliding_window": False,
             "sliding_window": 32768, "max_window_layers": 28, "attention_dropout": 0.0,
             "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}},
    "vision": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_channels": 3,
               "hidden_size": 1536, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
    "tie_word_embeddings": True,
}
# Dense bf16 peak, FLOP/s, by a substring of torch.cuda.get_device_name() (vendor data sheets).
PEAK_BF16 = {"H200": 989.4e12, "H100 PCIe": 756e12, "H100": 989.4e12, "A100": 312e12, "L40S": 362.1e12,
             "A10G": 70e12, "L4": 121e12, "RTX 4090": 165.2e12}


# --- preparation (parent process) -----------------------------------------------------------

def qwen2_vl_2b_config(tokenizer):
    """`QWEN2_VL_2B` as a `Qwen2VLConfig`, with the special token ids of `tokenizer`."""
    from transformers import Qwen2VLConfig

    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in [
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}
    text = dict(QWEN2_VL_2B["text"], layer_types=["full_attention"] * QWEN2_VL_2B["text"]["num_hidden_layers"],
                bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"), pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"))
    return Qwen2VLConfig(text_config=text, vision_config=QWEN2_VL_2B["vision"],
                         tie_word_embeddings=QWEN2_VL_2B["tie_word_embeddings"], **ids)


def minicpmv2_6_config(tokenizer):
    """openbmb/MiniCPM-V-2_6's published config.json values as a `MiniCPMVConfig`, with the special token
    ids of `tokenizer` (their values do not change the model's size or cost)."""
    from vlmtune.models.minicpmv.configuration import MiniCPMVConfig

    values = json.loads(PUBLISHED_MINICPM.read_text(encoding="utf-8"))["configs"]["minicpmv2_6"]
    ids = {"bos_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}  # the 2.6 config names <|endoftext|> as bos
    return MiniCPMVConfig(**{**values, **ids})


def build_qwen_model(work: Path, smoke: bool) -> Path:
    """The Qwen model folder: tiny Qwen2-VL for --smoke, else the 2B architecture with random bf16 weights."""
    from vlmtune.models.tiny import build_tiny_model

    tiny = work / "tiny"
    if not (tiny / "config.json").is_file():
        # pixel budget 256^2: seed 002's 504x112 images are not shrunk
        build_tiny_model("qwen2_vl", tiny, hidden=128, layers=2, heads=4, vision_dim=32, vision_depth=2,
                         image_size=256)
    if smoke:
        return tiny
    model_dir = work / "qwen2_vl_2b"
    if (model_dir / "config.json").is_file():
        return model_dir
    import torch
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    processor = AutoProcessor.from_pretrained(tiny)
    config = qwen2_vl_2b_config(processor.tokenizer)
    torch.manual_seed(0)
    with torch.device("cuda"):  # random init of 2.2B parameters is minutes on CPU, seconds here
        model = Qwen2VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    del model
    return model_dir


def build_minicpm_model(work: Path, smoke: bool) -> Path:
    """The MiniCPM model folder: tiny MiniCPM-V 2.6 for --smoke (images of about 112x56 px and up are
    sliced, 4 queries per slice), else MiniCPM-V 2.6's architecture with random bf16 weights."""
    if smoke:
        from vlmtune.models.tiny import build_tiny_model

        tiny = work / "tiny_minicpmv2_6"
        if not (tiny / "config.json").is_file():
            build_tiny_model("minicpmv2_6", tiny, hidden=64, layers=2, heads=4, vision_dim=32, vision_depth=2,
                             image_size=112)
        return tiny
    model_dir = work / "minicpmv2_6"
    if (model_dir / "config.json").is_file():
        return model_dir
    import torch

    from vlmtune.models.minicpmv.modeling import MiniCPMVForConditionalGeneration
    from vlmtune.models.minicpmv.tiny_tokenizer import build_tiny_processor

    processor = build_tiny_processor("minicpmv2_6", **MINICPM_SLICING)
    config = minicpmv2_6_config(processor.tokenizer)
    torch.manual_seed(0)
    with torch.device("cuda"):  # 8.1B parameters
        model = MiniCPMVForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    del model
    return model_dir


def prepare_qwen_data(work: Path, n: int, model_dir: Path) -> tuple[Path, int]:
    """The synthetic LaTeX data in vlmtune's and the seeds' formats; returns vlmtune's training file and the
    longest sample in tokens."""
    sys.path.insert(0, str(ROOT / "bench"))
    from seed_pipeline import write_seed_json

    from vlmtune.data.encode import Encoder
    from vlmtune.data.formats import load_samples
    from vlmtune.data.synth import make_latex
    from vlmtune.models import family_for
    from vlmtune.models.load import load_processor

    train_json, _ = make_latex(work / "latex", n, 0, seed=0, prompt=PROMPT)
    records = json.loads(train_json.read_text(encoding="utf-8"))
    write_seed_json(records, work / "latex", work / "seed_train.json")
    family = family_for(model_dir)
    encoder = Encoder(load_processor(model_dir, family), family, image_size=(IMAGE_HW[1], IMAGE_HW[0]))
    return train_json, max(encoder.count_tokens(s) for s in load_samples(train_json))


def prepare_minicpm_data(work: Path, n: int, scale: float) -> Path:
    """Seed 000's task in the MiniCPM format that both MiniCPM pipelines read (absolute image paths); with
    `scale` != 1 every image is first enlarged that many times (bicubic)."""
    from PIL import Image

    from vlmtune.data.synth import make_latex

    train_json, _ = make_latex(work / "latex_minicpm", n, 0, seed=0, prompt=MINICPM_PROMPT)
    records = json.loads(train_json.read_text(encoding="utf-8"))
    images = work / f"minicpm_images_x{scale:g}"
    images.mkdir(exist_ok=True)
    for record in records:
        source = (train_json.parent / record["image"]).resolve()
        if scale != 1:
            target = images / source.name
            with Image.open(source) as im:
                im.resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.BICUBIC).save(target)
            source = target.resolve()
        record["image"] = str(source)
    out = work / f"minicpm_train_x{scale:g}.json"
    out.write_text(json.dumps(records, ensure_ascii=False, indent=2), encoding="utf-8")
    return out


# --- step meter -----------------------------------------------------------------------------

def model_shape(model) -> dict:
    """What the FLOPs formulas need (module docstring), read from the model as built: weight counts per part
    (LoRA adapters and peft's frozen copies of modules_to_save left out), sizes, and each part's
    multiplier (3: its weights train, 2: frozen but gradients pass through, 1: frozen at the start)."""
    config = model.config
    if hasattr(config, "llm_config"):  # vlmtune's MiniCPM-V 2.x
        text, vision = config.llm_config(), config.vision_settings()
        prefixes = {"lm": ".llm.", "vision": ".vpm.", "projector": ".resampler."}
        vision_layers, vision_hidden, queries = vision["num_hidden_layers"], vision["hidden_size"], config.query_num
    else:  # Qwen2-VL: the merger (projector) is part of `visual`
        text, vision = config.text_config, config.vision_config
        prefixes = {"lm": ".language_model.", "vision": ".visual."}
        vision_layers, vision_hidden, queries = vision.depth, vision.embed_dim, 0
    named = [(n, p) for n, p in model.named_parameters() if ".original_module." not in f".{n}"]
    counts = {"lm": 0, "vision": 0, "projector": 0}
    trained: set[str] = set()
    for name, p in named:
        dotted = f".{name}"
        part = "lm" if ".lm_head." in dotted else next((k for k, pre in prefixes.items() if pre in dotted), None)
        # lookups are not matmuls: embeddings and position tables are not counted
        lookup = any(k in name for k in ("embed_tokens", "position_embedding", "pos_embed"))
        if part is None or "lora_" in name or lookup:
            continue
        # a bitsandbytes 4-bit weight (QLoRA) stores two values per byte; its quant_state knows the shape
        shape = getattr(getattr(p, "quant_state", None), "shape", None)
        counts[part] += math.prod(shape) if shape is not None else p.numel()
        if p.requires_grad:
            trained.add(part)
    if not any(".lm_head." in f".{n}" for n, _ in named):  # tied head: the embedding matrix, used as a matmul
        counts["lm"] += text.vocab_size * text.hidden_size
    vision_mult = 3 if "vision" in trained else 1
    return {"n_lm": counts["lm"], "n_vision": counts["vision"], "n_projector": counts["projector"],
            "layers": text.num_hidden_layers, "hidden": text.hidden_size, "vision_layers": vision_layers,
            "vision_hidden": vision_hidden, "queries": queries,
            "multipliers": {"lm": 3 if "lm" in trained else 2, "vision": vision_mult,
                            "projector": 3 if "projector" in trained else (2 if vision_mult == 3 else 1)},
            "parameters": sum(p.numel() for _, p in named),
            "trainable_parameters": sum(p.numel() for _, p in named if p.requires_grad)}


def step_flops(shape: dict, lengths: list[int], patches: list[int]) -> float:
    """Model FLOPs of one training forward+backward: samples of `lengths` tokens, images or slices of `patches`."""
    s, m = shape, shape["multipliers"]
    d, d_v, q = s["hidden"], s["vision_hidden"], s["queries"]
    f_lm = sum(2 * s["n_lm"] * n for n in lengths)
    f_att = sum(4 * s["layers"] * d * n * n for n in lengths)
    f_vis = sum(2 * s["n_vision"] * p + 4 * s["vision_layers"] * d_v * p * p for p in patches)
    f_res = sum(2 * p * (d_v * d + 2 * d * d) + 6 * q * d * d + 4 * q * p * d for p in patches) if q else 0
    return m["lm"] * f_lm + 3 * f_att + m["vision"] * f_vis + m["projector"] * f_res


class StepMeter:
    """A TrainerCallback: per optimizer step, its end time (after a CUDA sync), and per training
    forward, the samples, tokens, images and model FLOPs of the batch (module docstring)."""

    def __init__(self):
        from transformers import TrainerCallback

        self.step_ends: list[float] = []
        self.batches: list[dict] = []
        self.shape: dict = {}
        meter = self

        class Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, **kwargs):
                meter.begin(model)

            def on_step_end(self, args, state, control, **kwargs):
                meter.step_end()

        self.callback = Callback()

    def begin(self, model) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self.shape = model_shape(model)
        model.register_forward_pre_hook(self.count, with_kwargs=True)

    def count(self, module, args, kwargs) -> None:
        # The official MiniCPM trainer keeps the labels from the model; it calls `count_official` instead.
        if not module.training or kwargs.get("labels") is None:
            return
        ids, labels = kwargs["input_ids"], kwargs["labels"]
        if "attention_mask" in kwargs and kwargs["attention_mask"] is not None:  # padded rows
            lengths = kwargs["attention_mask"].sum(dim=1).tolist()
        else:  # a packed row: samples start where the text positions restart at 0
            starts = (kwargs["position_ids"][0, 0] == 0).nonzero().flatten().tolist() + [ids.shape[1]]
            lengths = [b - a for a, b in zip(starts, starts[1:])]
        if kwargs.get("image_grid_thw") is not None:  # Qwen: one row per image
            patches = kwargs["image_grid_thw"].prod(dim=1).tolist()
        elif kwargs.get("tgt_sizes") is not None:  # MiniCPM: one row per slice
            patches = kwargs["tgt_sizes"].prod(dim=1).tolist()
        else:
            patches = []
        self.record(lengths, ids.numel(), int((labels[..., 1:] != -100).sum()), patches)

    def count_official(self, batch: dict, labels) -> None:
        """A batch of bench/minicpm_official_pipeline.py (labels already shifted, slices as lists)."""
        patches = [h * w for sizes in batch["tgt_sizes"] for h, w in sizes.reshape(-1, 2).tolist()]
        self.record(batch["attention_mask"].sum(dim=1).tolist(), batch["input_ids"].numel(),
                    int((labels != -100).sum()), patches)

    def record(self, lengths: list[int], slots: int, trained: int, patches: list[int]) -> None:
        self.batches.append({"samples": len(lengths), "tokens": int(sum(lengths)), "slots": slots, "trained": trained,
                             "images": len(patches), "patches": int(sum(patches)),
                             "flops": float(step_flops(self.shape, lengths, patches))})

    def step_end(self) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.step_ends.append(time.perf_counter())


# --- one run (child process, or in-process for --smoke) -------------------------------------

def run_seed(model_dir: str, work: Path, method: str, steps: int, callbacks: list, dtype) -> None:
    """Seed 002's train.py from "load the processor" to `trainer.train()` (as bench/seed_pipeline.py),
    with the weights' dtype and the method as parameters."""
    sys.path.insert(0, str(ROOT / "bench"))
    import torch
    from datasets import Dataset
    from peft import LoraConfig, TaskType, get_peft_model
    from seed_pipeline import LORA_TARGETS, make_process_func, seed_collator
    from transformers import AutoProcessor, AutoTokenizer, Qwen2VLForConditionalGeneration, Trainer, TrainingArguments

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    processor = AutoProcessor.from_pretrained(model_dir)
    model = Qwen2VLForConditionalGeneration.from_pretrained(model_dir, dtype=dtype)
    model.enable_input_require_grads()  # the seed: needed with gradient checkpointing
    train_ds = Dataset.from_json(str(work / "seed_train.json"), cache_dir=str(work / "seed_cache"))
    train_dataset = train_ds.map(make_process_func(processor, tokenizer, PROMPT, *IMAGE_HW))
    if method == "lora":
        model = get_peft_model(model, LoraConfig(task_type=TaskType.CAUSAL_LM, target_modules=LORA_TARGETS,
                                                 inference_mode=False, r=64, lora_alpha=16, lora_dropout=0.05,
                                                 bias="none"))
    else:  # full: the language model trains, the vision tower and projector stay (vlmtune's default)
        for name, p in model.named_parameters():
            p.requires_grad = not name.startswith("model.visual.")
    args = TrainingArguments(output_dir=str(work / "seed_out"), per_device_train_batch_size=BATCH,
                             gradient_accumulation_steps=1, logging_steps=10, max_steps=steps, save_strategy="no",
                             learning_rate=1e-4, gradient_checkpointing=True, report_to="none",
                             use_cpu=not torch.cuda.is_available())
    image_token_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    Trainer(model=model, args=args, train_dataset=train_dataset, data_collator=seed_collator(tokenizer, image_token_id),
            callbacks=callbacks).train()


def qwen_run_config(spec: dict, work: Path, packed: bool, dtype_name: str):
    """The `vlmtune train` config of a Qwen run (padded batches grouped by length, or packed)."""
    from vlmtune.config import load_config

    longest, steps = spec["longest"], spec["steps"]
    overrides = [
        f"model.name_or_path={spec['model']}", f"model.dtype={dtype_name}", f"data.train={spec['train_json']}",
        f"data.image_size=[{IMAGE_HW[1]}, {IMAGE_HW[0]}]", f"data.max_length={longest}", "data.num_workers=1",
        f"train.method={spec['method']}", "lora.r=64", "lora.alpha=16", "lora.dropout=0.05", "train.grad_accum=1",
        f"train.max_steps={steps}", "train.learning_rate=1e-4", "train.gradient_checkpointing=true",
        "train.logging_steps=10", f"train.save_steps={steps + 1}", "eval.num_samples=0",
        f"train.output_dir={work / 'vlmtune_out'}"]
    if packed:  # one pack per step, holding at most what a padded batch of 4 holds
        overrides += ["data.packing=true", f"data.pack_length={BATCH * longest}", "train.batch_size=1"]
    else:
        overrides += [f"train.batch_size={BATCH}", "data.group_by_length=true"]
    return load_config(None, overrides)


def run_vlmtune(spec: dict, work: Path, packed: bool, callbacks: list, dtype_name: str) -> None:
    """`vlmtune train` on the Qwen model (padded batches grouped by length, or packed)."""
    from vlmtune.train import train

    train(qwen_run_config(spec, work, packed, dtype_name), callbacks=callbacks)


def minicpm_run_config(spec: dict, work: Path, dtype_name: str):
    """The seed config of the method (configs/minicpmv2_6_*.yaml) made to run here: this model and data,
    one device without DeepSpeed, bf16 (fp32 on CPU), `steps` optimizer steps of batch 2, no evaluation
    or checkpoints; both MiniCPM pipelines take their settings from it."""
    from vlmtune.config import load_config

    steps = spec["steps"]
    return load_config(MINICPM_CONFIGS[spec["method"]], [
        f"model.name_or_path={spec['model']}", f"model.dtype={dtype_name}", f"data.train={spec['train_json']}",
        "data.val=", "data.num_workers=1", "data.group_by_length=true", f"train.batch_size={MINICPM_BATCH}",
        "train.grad_accum=1", f"train.max_steps={steps}", "train.deepspeed=", "train.report_to=[]",
        "train.eval_steps=", "train.logging_steps=10", f"train.save_steps={steps + 1}", "eval.num_samples=0",
        f"train.output_dir={work / 'vlmtune_out'}"])


def run_one(spec: dict) -> dict:
    """One (model, method, pipeline) run; returns its figures."""
    import torch

    work, method, pipeline = Path(spec["work"]), spec["method"], spec["pipeline"]
    outputs = ("seed_out", "vlmtune_out", "official_out")
    for folder in outputs:
        shutil.rmtree(work / folder, ignore_errors=True)
    cuda = torch.cuda.is_available()
    dtype_name = spec.get("dtype") or ("bf16" if cuda else "fp32")
    meter = StepMeter()
    try:
        if pipeline == "seed":
            run_seed(spec["model"], work, method, spec["steps"], [meter.callback],
                     torch.bfloat16 if cuda else torch.float32)
        elif pipeline == "official":
            sys.path.insert(0, str(ROOT / "bench"))
            from minicpm_official_pipeline import run_official

            run_official(spec["model"], Path(spec["train_json"]), work / "official_out",
                         minicpm_run_config(spec, work, dtype_name), spec["steps"], MINICPM_BATCH, [meter.callback],
                         on_batch=meter.count_official)
        elif spec["family"] == "minicpmv2_6":
            from vlmtune.train import train

            train(minicpm_run_config(spec, work, dtype_name), callbacks=[meter.callback])
        else:
            run_vlmtune(spec, work, pipeline == "vlmtune_packed", [meter.callback], dtype_name)
    except torch.OutOfMemoryError as e:  # reported as a result: the other runs still tell something
        return {"error": f"out of memory: {str(e).splitlines()[0][:200]}",
                "peak_memory_bytes": torch.cuda.max_memory_allocated() if cuda else None, **meter.shape}
    finally:
        for folder in outputs:  # a full fine-tune's final/ is 4 GB (Qwen2-VL-2B) or 16 GB (MiniCPM-V 2.6)
            shutil.rmtree(work / folder, ignore_errors=True)

    warmup, ends, batches = spec["warmup"], meter.step_ends, meter.batches
    if len(ends) != spec["steps"] or len(batches) != spec["steps"]:
        raise RuntimeError(f"{spec['family']}/{pipeline}/{method}: {len(ends)} steps and {len(batches)} forwards, "
                           f"expected {spec['steps']} of each (grad_accum is 1)")
    timed, seconds = batches[warmup:], ends[-1] - ends[warmup - 1]
    total = {k: sum(b[k] for b in timed)
             for k in ("samples", "tokens", "slots", "trained", "images", "patches", "flops")}
    peak = PEAK_BF16.get(next((k for k in PEAK_BF16 if cuda and k in torch.cuda.get_device_name()), ""), None)
    peak = spec["peak_tflops"] * 1e12 if spec.get("peak_tflops") else peak
    return {
        "samples_per_s": total["samples"] / seconds,
        "tokens_per_s": total["tokens"] / seconds,
        "trained_tokens_per_s": total["trained"] / seconds,
        "seconds_per_step": seconds / len(timed),
        "samples_per_step": total["samples"] / len(timed),
        "padding_fraction": 1 - total["tokens"] / total["slots"],
        "images_per_sample": total["images"] / total["samples"],  # MiniCPM: slices
        "patches_per_image": total["patches"] / total["images"] if total["images"] else 0.0,
        "model_tflops_per_s": total["flops"] / seconds / 1e12,
        "mfu": total["flops"] / seconds / peak if peak else None,
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "plan_tensor_bytes": plan_estimate(spec, work, dtype_name) if pipeline.startswith("vlmtune") else None,
        "peak_bf16_flops": peak,
        "steps": spec["steps"], "timed_steps": len(timed), **meter.shape,
    }


def plan_estimate(spec: dict, work: Path, dtype_name: str) -> int:
    """`vlmtune plan`'s estimate of the peak tensor memory of this run (what `max_memory_allocated` reports)."""
    import torch

    from vlmtune.plan import make_plan

    if spec["family"] == "minicpmv2_6":
        config = minicpm_run_config(spec, work, dtype_name)
    else:
        config = qwen_run_config(spec, work, spec["pipeline"] == "vlmtune_packed", dtype_name)
    return make_plan(config, device="cuda" if torch.cuda.is_available() else "cpu").estimate.tensors


# --- the parent -----------------------------------------------------------------------------

def run_in_child(spec: dict, work: Path) -> dict:
    """`run_one(spec)` in a fresh process; its output goes to a log file in `work`."""
    name = f"{spec['family']}_{spec['pipeline']}_{spec['method']}" + (f"_{spec['dtype']}" if spec.get("dtype") else "")
    result = work / f"result_{name}.json"
    result.unlink(missing_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "PYTHONPATH": str(ROOT)}
    log_path = work / f"log_{name}.txt"
    with log_path.open("w") as log:
        code = subprocess.call([sys.executable, __file__, "--child", json.dumps(spec), "--result", str(result)],
                               env=env, stdout=log, stderr=subprocess.STDOUT)
    if code != 0 or not result.is_file():
        raise SystemExit(f"{name} failed (exit {code}); the end of its log:\n"
                         f"{log_path.read_text(errors='replace')[-4000:]}")
    return json.loads(result.read_text())


def table(results: dict) -> str:
    gib = 2 ** 30
    lines = [f"{'model':12} {'method':6} {'pipeline':16} {'samples/s':>10} {'tokens/s':>10} {'MFU':>7} "
             f"{'padding':>8} {'s/step':>8} {'peak mem':>10}", "-" * 95]
    for model, methods in results.items():
        for method, runs in methods.items():
            for pipeline, r in runs.items():
                mem = f"{r['peak_memory_bytes'] / gib:.1f} GiB" if r.get("peak_memory_bytes") is not None else "n/a"
                if "error" in r:
                    lines.append(f"{model:12} {method:6} {pipeline:16} {r['error'][:46]:>46} {mem:>10}")
                    continue
                mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
                lines.append(f"{model:12} {method:6} {pipeline:16} {r['samples_per_s']:10.1f} "
                             f"{r['tokens_per_s']:10.0f} {mfu:>7} {r['padding_fraction']:8.1%} "
                             f"{r['seconds_per_step']:8.3f} {mem:>10}")
    return "\n".join(lines)


def ratios(runs: dict, baseline: str) -> dict:
    """vlmtune against the model's reference pipeline, > 1 is better (memory: reference / vlmtune); None
    where a run has no figure (out of memory, or no CUDA for memory)."""
    ref = runs[baseline]
    out = {}
    for pipeline in (p for p in runs if p != baseline):
        r = runs[pipeline]
        ok = "error" not in r and "error" not in ref
        out[pipeline] = {
            "samples_per_s": r["samples_per_s"] / ref["samples_per_s"] if ok else None,
            "tokens_per_s": r["tokens_per_s"] / ref["tokens_per_s"] if ok else None,
            "peak_memory": (ref["peak_memory_bytes"] / r["peak_memory_bytes"]
                            if ok and r["peak_memory_bytes"] and ref["peak_memory_bytes"] else None),
        }
    return out


FLOPS = {
    "qwen2_vl": "full: 3*F_lm + 3*F_att + F_vis; LoRA: 2*F_lm + 3*F_att + F_vis; F_lm = 2*N_lm*s, "
                "F_att = 4*L*d*s^2, F_vis = 2*N_vis*p + 4*L_v*d_v*p^2 per image (bench/gpu.py docstring)",
    "minicpmv2_6": "full: 3*(F_lm + F_att + F_vis + F_res); LoRA: 2*F_lm + 3*(F_att + F_vis + F_res); F_lm, F_att "
                   "as Qwen; per slice of p patches F_vis = 2*N_vis*p + 4*L_v*d_v*p^2, F_res = 2*p*(d_v*d + 2*d^2) "
                   "+ 6*Q*d^2 + 4*Q*p*d (bench/gpu.py docstring)",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny models on CPU, few steps: checks the script runs")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated: {', '.join(MODELS)}")
    parser.add_argument("--methods", default="lora,full", help="comma-separated: lora, full")
    parser.add_argument("--n", type=int, default=None, help="training samples (default 512, smoke 24)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 40, smoke 3)")
    parser.add_argument("--warmup", type=int, default=None, help="steps left out of the figures (default 10, smoke 1)")
    parser.add_argument("--minicpm-image-scale", type=float, default=1.0,
                        help="enlarge MiniCPM's formula images this many times (8: most are sliced)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak, if not known")
    parser.add_argument("--work", help="folder for the models and data (default: a temporary one)")
    parser.add_argument("--out", default=None, help="the JSON results file (default bench/results/gpu.json)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        Path(args.result).write_text(json.dumps(run_one(json.loads(args.child)), indent=2))
        return 0

    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA device here, skipped (use --smoke to exercise it on CPU)")
        return 0
    n = args.n or (24 if args.smoke else 512)
    steps = args.steps or (3 if args.smoke else 40)
    warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 10)
    if not 0 < warmup < steps:
        raise SystemExit(f"--warmup must be between 1 and --steps - 1 ({steps - 1}), got {warmup}")
    methods = [m for m in args.methods.split(",") if m]
    if not methods or set(methods) - {"lora", "full"}:
        raise SystemExit(f"--methods takes lora and/or full, got {args.methods!r}")
    models = [m for m in args.models.split(",") if m]
    if not models or set(models) - set(MODELS):
        raise SystemExit(f"--models takes {' and/or '.join(MODELS)}, got {args.models!r}")
    if args.minicpm_image_scale <= 0:
        raise SystemExit(f"--minicpm-image-scale must be positive, got {args.minicpm_image_scale}")

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="vlmtune-gpu-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        results: dict[str, dict] = {}
        settings: dict[str, dict] = {}
        for family in models:
            name = {"qwen2_vl": "Qwen2-VL-2B", "minicpmv2_6": "MiniCPM-V 2.6"}[family]
            print(f"building the {'tiny ' + family if args.smoke else name} model and {n} samples in {work}",
                  flush=True)
            spec = {"work": str(work), "family": family, "steps": steps, "warmup": warmup,
                    "peak_tflops": args.peak_tflops}
            if family == "qwen2_vl":
                model_dir = build_qwen_model(work, args.smoke)
                train_json, longest = prepare_qwen_data(work, n, model_dir)
                spec.update(longest=longest)
                settings[family] = {"model": f"{'tiny' if args.smoke else name} (random weights)", "batch_size": BATCH,
                                    "image_height_width": IMAGE_HW, "longest_sample_tokens": longest,
                                    "pack_length": BATCH * longest, "lora": {"r": 64, "alpha": 16, "dropout": 0.05}}
            else:
                model_dir = build_minicpm_model(work, args.smoke)
                train_json = prepare_minicpm_data(work, n, args.minicpm_image_scale)
                settings[family] = {"model": f"{'tiny' if args.smoke else name} (random weights)",
                                    "batch_size": MINICPM_BATCH, "image_scale": args.minicpm_image_scale,
                                    "slicing": MINICPM_SLICING if not args.smoke else "tiny (vlmtune.models.tiny)",
                                    "configs": {m: str(MINICPM_CONFIGS[m].relative_to(ROOT)) for m in methods}}
            spec.update(model=str(model_dir), train_json=str(train_json))
            for method in methods:
                for pipeline in PIPELINES[family]:
                    print(f"running {family} {pipeline} ({method}) ...", flush=True)
                    one = {**spec, "method": method, "pipeline": pipeline}
                    # --smoke stays in this process (seconds instead of a Python start-up per run; no
                    # Liger on CPU, so no class is patched under the next run)
                    figures = run_one(one) if args.smoke else run_in_child(one, work)
                    results.setdefault(family, {}).setdefault(method, {})[pipeline] = figures
        print()
        print(table(results))
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or 'cpu'})"
        out = Path(args.out or RESULTS)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps({
            "settings": {"smoke": args.smoke, "samples": n, "steps": steps, "warmup_steps": warmup,
                         "gradient_checkpointing": True, **settings},
            "device": device, "torch": torch.__version__,
            "flops": {family: FLOPS[family] for family in results},
            "results": results,
            "ratios_vlmtune_better": {family: {m: ratios(r, PIPELINES[family][0]) for m, r in by_method.items()}
                                      for family, by_method in results.items()}},
            indent=2) + "\n")
        tmp.replace(out)
        print(f"\nwritten {out}")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
