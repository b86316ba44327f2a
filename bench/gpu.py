"""GPU training-step benchmark: a real-size Qwen2-VL-2B with random weights, LoRA and full
fine-tuning, the seeds' pipeline against vlmtune.

    .venv/bin/python bench/gpu.py                  # on a CUDA machine; writes bench/results/gpu.json
    .venv/bin/python bench/gpu.py --smoke          # the same code on CPU with a tiny model, in seconds

Without a CUDA device (and without --smoke) it prints one line and exits 0.

The model is Qwen/Qwen2-VL-2B-Instruct's architecture with the values of its published config.json
written below (`QWEN2_VL_2B`), built with `from_config` in bf16: nothing is downloaded. Its tokenizer
is vlmtune's tiny byte-level BPE with the Qwen special tokens (the real vocabulary size, 151,936, is
kept in the embedding and head); token ids do not change the cost of a step. The data are
vlmtune's synthetic LaTeX formula images resized to seed 002's fixed 500x100 (height x width) for
every pipeline, so a sample has the same tokens in each (about 130-190: 72 image tokens, the prompt,
an answer of 1-40 tokens).

Pipelines, each run in its own process (peak memory is per process, and Liger patches classes):
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
Gradient checkpointing on everywhere (the seeds turn it on).

Figures over the steps after `--warmup`: samples/s, non-padding tokens/s, trained (label) tokens/s,
padding fraction, seconds per step, model FLOPs utilisation, and the peak of
`torch.cuda.max_memory_allocated` over the whole run.

Model FLOPs (PaLM's convention: no recomputation from checkpointing, attention counted unmasked),
per sample of s tokens (image tokens included) and per image of p patches:
    LM matmuls, forward   F_lm  = 2 * N_lm * s          N_lm: LM weights without the embedding, plus
                                                         the head (V x d, tied to the embedding)
    LM attention, forward F_att = 4 * L * d * s^2        L layers, d hidden size
    vision, forward       F_vis = 2 * N_vis * p + 4 * L_v * d_v * p^2   (frozen: no backward)
    full fine-tuning:  3 * F_lm + 3 * F_att + F_vis     (backward: input and weight gradients)
    LoRA:              2 * F_lm + 3 * F_att + F_vis     (backward: input gradients only; the
                                                         adapters' r=64 matmuls are left out)
MFU = model FLOPs per second / the device's dense bf16 peak (`PEAK_BF16`, or --peak-tflops).
Padding tokens do no useful work and are not counted: that is where packing shows.
"""

from __future__ import annotations

import argparse
import json
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
PROMPT = "你是一个LaText OCR助手,目标是读取用户输入的照片，转换成LaTex公式。"  # seed 002's prompt
IMAGE_HW = (500, 100)  # seed 002: resized_height=500, resized_width=100
BATCH = 4  # the seeds' per-device batch size
PIPELINES = ("seed", "vlmtune_grouped", "vlmtune_packed")

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


def build_model(work: Path, smoke: bool) -> Path:
    """The model folder: tiny Qwen2-VL for --smoke, else the 2B architecture with random bf16 weights."""
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


def prepare_data(work: Path, n: int, model_dir: Path) -> int:
    """The synthetic LaTeX data in vlmtune's and the seeds' formats; returns the longest sample in tokens."""
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
    return max(encoder.count_tokens(s) for s in load_samples(train_json))


# --- one pipeline (child process, or in-process for --smoke) --------------------------------

class StepMeter:
    """A TrainerCallback: per optimizer step, its end time (after a CUDA sync), and per training
    forward, the samples, tokens and model FLOPs of the batch (module docstring)."""

    def __init__(self, method: str):
        from transformers import TrainerCallback

        self.method = method
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
        config = model.config
        text, vision = config.text_config, config.vision_config
        named = [(n, p) for n, p in model.named_parameters() if "lora_" not in n]
        n_lm = sum(p.numel() for n, p in named if "language_model." in n and "embed_tokens" not in n)
        n_lm += text.vocab_size * text.hidden_size  # the head's matmul (tied: not a parameter of its own)
        n_vis = sum(p.numel() for n, p in named if ".visual." in f".{n}")
        self.shape = {"n_lm": n_lm, "n_vision": n_vis, "layers": text.num_hidden_layers, "hidden": text.hidden_size,
                      "vision_layers": vision.depth, "vision_hidden": vision.embed_dim,
                      "parameters": sum(p.numel() for _, p in model.named_parameters()),
                      "trainable_parameters": sum(p.numel() for _, p in model.named_parameters() if p.requires_grad)}
        model.register_forward_pre_hook(self.count, with_kwargs=True)

    def count(self, module, args, kwargs) -> None:
        if not module.training:
            return
        ids, labels = kwargs["input_ids"], kwargs["labels"]
        if "attention_mask" in kwargs and kwargs["attention_mask"] is not None:  # padded rows
            lengths = kwargs["attention_mask"].sum(dim=1).tolist()
        else:  # a packed row: samples start where the text positions restart at 0
            starts = (kwargs["position_ids"][0, 0] == 0).nonzero().flatten().tolist() + [ids.shape[1]]
            lengths = [b - a for a, b in zip(starts, starts[1:])]
        patches = kwargs["image_grid_thw"].prod(dim=1).tolist() if kwargs.get("image_grid_thw") is not None else []
        s = self.shape
        f_lm = sum(2 * s["n_lm"] * n for n in lengths)
        f_att = sum(4 * s["layers"] * s["hidden"] * n * n for n in lengths)
        f_vis = sum(2 * s["n_vision"] * p + 4 * s["vision_layers"] * s["vision_hidden"] * p * p for p in patches)
        flops = (3 if self.method == "full" else 2) * f_lm + 3 * f_att + f_vis
        self.batches.append({"samples": len(lengths), "tokens": int(sum(lengths)), "slots": ids.numel(),
                             "trained": int((labels[..., 1:] != -100).sum()), "flops": float(flops)})

    def step_end(self) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.step_ends.append(time.perf_counter())


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


def run_vlmtune(model_dir: str, work: Path, method: str, packed: bool, steps: int, longest: int, callbacks: list,
                dtype_name: str) -> None:
    from vlmtune.config import load_config
    from vlmtune.train import train

    overrides = [
        f"model.name_or_path={model_dir}", f"model.dtype={dtype_name}", f"data.train={work / 'latex' / 'train.json'}",
        f"data.image_size=[{IMAGE_HW[1]}, {IMAGE_HW[0]}]", f"data.max_length={longest}", "data.num_workers=1",
        f"train.method={method}", "lora.r=64", "lora.alpha=16", "lora.dropout=0.05", "train.grad_accum=1",
        f"train.max_steps={steps}", "train.learning_rate=1e-4", "train.gradient_checkpointing=true",
        "train.logging_steps=10", f"train.save_steps={steps + 1}", "eval.num_samples=0",
        f"train.output_dir={work / 'vlmtune_out'}"]
    if packed:  # one pack per step, holding at most what a padded batch of 4 holds
        overrides += ["data.packing=true", f"data.pack_length={BATCH * longest}", "train.batch_size=1"]
    else:
        overrides += [f"train.batch_size={BATCH}", "data.group_by_length=true"]
    train(load_config(None, overrides), callbacks=callbacks)


def run_one(spec: dict) -> dict:
    """One (pipeline, method) run; returns its figures."""
    import torch

    work, method, pipeline = Path(spec["work"]), spec["method"], spec["pipeline"]
    for folder in ("seed_out", "vlmtune_out"):
        shutil.rmtree(work / folder, ignore_errors=True)
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    meter = StepMeter(method)
    if pipeline == "seed":
        run_seed(spec["model"], work, method, spec["steps"], [meter.callback], dtype)
    else:
        run_vlmtune(spec["model"], work, method, pipeline == "vlmtune_packed", spec["steps"], spec["longest"],
                    [meter.callback], "bf16" if cuda else "fp32")
    for folder in ("seed_out", "vlmtune_out"):  # a full fine-tune's final/ is 4 GB
        shutil.rmtree(work / folder, ignore_errors=True)

    warmup, ends, batches = spec["warmup"], meter.step_ends, meter.batches
    if len(ends) != spec["steps"] or len(batches) != spec["steps"]:
        raise RuntimeError(f"{pipeline}/{method}: {len(ends)} steps and {len(batches)} forwards, "
                           f"expected {spec['steps']} of each (grad_accum is 1)")
    timed, seconds = batches[warmup:], ends[-1] - ends[warmup - 1]
    total = {k: sum(b[k] for b in timed) for k in ("samples", "tokens", "slots", "trained", "flops")}
    peak = PEAK_BF16.get(next((k for k in PEAK_BF16 if cuda and k in torch.cuda.get_device_name()), ""), None)
    peak = spec["peak_tflops"] * 1e12 if spec.get("peak_tflops") else peak
    return {
        "samples_per_s": total["samples"] / seconds,
        "tokens_per_s": total["tokens"] / seconds,
        "trained_tokens_per_s": total["trained"] / seconds,
        "seconds_per_step": seconds / len(timed),
        "samples_per_step": total["samples"] / len(timed),
        "padding_fraction": 1 - total["tokens"] / total["slots"],
        "model_tflops_per_s": total["flops"] / seconds / 1e12,
        "mfu": total["flops"] / seconds / peak if peak else None,
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "peak_bf16_flops": peak,
        "steps": spec["steps"], "timed_steps": len(timed), **meter.shape,
    }


# --- the parent -----------------------------------------------------------------------------

def run_in_child(spec: dict, work: Path) -> dict:
    """`run_one(spec)` in a fresh process; its output goes to a log file in `work`."""
    result = work / f"result_{spec['pipeline']}_{spec['method']}.json"
    result.unlink(missing_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "PYTHONPATH": str(ROOT)}
    log_path = work / f"log_{spec['pipeline']}_{spec['method']}.txt"
    with log_path.open("w") as log:
        code = subprocess.call([sys.executable, __file__, "--child", json.dumps(spec), "--result", str(result)],
                               env=env, stdout=log, stderr=subprocess.STDOUT)
    if code != 0 or not result.is_file():
        raise SystemExit(f"{spec['pipeline']}/{spec['method']} failed (exit {code}); the end of its log:\n"
                         f"{log_path.read_text(errors='replace')[-4000:]}")
    return json.loads(result.read_text())


def table(results: dict) -> str:
    gib = 2 ** 30
    lines = [f"{'method':6} {'pipeline':16} {'samples/s':>10} {'tokens/s':>10} {'MFU':>7} {'padding':>8} "
             f"{'s/step':>8} {'peak mem':>10}", "-" * 82]
    for method, runs in results.items():
        for pipeline, r in runs.items():
            mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
            mem = f"{r['peak_memory_bytes'] / gib:.1f} GiB" if r["peak_memory_bytes"] is not None else "n/a"
            lines.append(f"{method:6} {pipeline:16} {r['samples_per_s']:10.1f} {r['tokens_per_s']:10.0f} {mfu:>7} "
                         f"{r['padding_fraction']:8.1%} {r['seconds_per_step']:8.3f} {mem:>10}")
    return "\n".join(lines)


def ratios(runs: dict) -> dict:
    """vlmtune against the seed pipeline, > 1 is better (memory: seed / vlmtune)."""
    seed = runs["seed"]
    out = {}
    for pipeline in (p for p in runs if p != "seed"):
        r = runs[pipeline]
        out[pipeline] = {
            "samples_per_s": r["samples_per_s"] / seed["samples_per_s"],
            "tokens_per_s": r["tokens_per_s"] / seed["tokens_per_s"],
            "peak_memory": (seed["peak_memory_bytes"] / r["peak_memory_bytes"]
                            if r["peak_memory_bytes"] and seed["peak_memory_bytes"] else None),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU, few steps: checks the script runs")
    parser.add_argument("--methods", default="lora,full", help="comma-separated: lora, full")
    parser.add_argument("--n", type=int, default=None, help="training samples (default 512, smoke 24)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 40, smoke 3)")
    parser.add_argument("--warmup", type=int, default=None, help="steps left out of the figures (default 10, smoke 1)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak, if not known")
    parser.add_argument("--work", help="folder for the model and data (default: a temporary one)")
    parser.add_argument("--out", default=str(RESULTS), help="the JSON results file")
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

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="vlmtune-gpu-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        print(f"building the {'tiny' if args.smoke else 'Qwen2-VL-2B'} model and {n} samples in {work}", flush=True)
        model_dir = build_model(work, args.smoke)
        longest = prepare_data(work, n, model_dir)
        results: dict[str, dict] = {}
        for method in methods:
            for pipeline in PIPELINES:
                spec = {"work": str(work), "model": str(model_dir), "method": method, "pipeline": pipeline,
                        "steps": steps, "warmup": warmup, "longest": longest, "peak_tflops": args.peak_tflops}
                print(f"running {pipeline} ({method}) ...", flush=True)
                # --smoke stays in this process (seconds instead of a Python start-up per run; no
                # Liger on CPU, so no class is patched under the next run)
                results.setdefault(method, {})[pipeline] = run_one(spec) if args.smoke else run_in_child(spec, work)
        print()
        print(table(results))
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or 'cpu'})"
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps({
            "settings": {"smoke": args.smoke,
                         "model": "tiny qwen2_vl" if args.smoke else "Qwen2-VL-2B (random weights)",
                         "samples": n, "steps": steps, "warmup_steps": warmup, "batch_size": BATCH,
                         "image_height_width": IMAGE_HW, "longest_sample_tokens": longest,
                         "pack_length": BATCH * longest, "gradient_checkpointing": True,
                         "lora": {"r": 64, "alpha": 16, "dropout": 0.05}},
            "device": device, "torch": torch.__version__,
            "flops": "full: 3*F_lm + 3*F_att + F_vis; LoRA: 2*F_lm + 3*F_att + F_vis; F_lm = 2*N_lm*s, "
                     "F_att = 4*L*d*s^2, F_vis = 2*N_vis*p + 4*L_v*d_v*p^2 (bench/gpu.py docstring)",
            "results": results, "ratios_vlmtune_better": {m: ratios(r) for m, r in results.items()}},
            indent=2) + "\n")
        tmp.replace(out)
        print(f"\nwritten {out}")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
