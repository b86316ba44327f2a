"""`vlmtune plan` against measured peaks: random-weight Qwen2-VL models trained on the CPU.

    .venv/bin/python bench/plan_validation.py                 # all models and cases (~8 min on 2 cores)
    .venv/bin/python bench/plan_validation.py --models tiny   # only the tiny model

Models built on the spot (nothing downloaded): the tests' tiny Qwen2-VL (hidden 64, 2 layers,
vision 32 x 2; 0.2M parameters), a mid-size one (hidden 512, 8 layers, vision 256 x 4, vocabulary
resized to 16,384 so the logits weigh as in a real model; 40M parameters), and tiny Qwen2.5-VL and
Qwen3-VL (hidden 128, vision 64 x 2: SwiGLU/RMSNorm vision blocks; q/k norms). Each case trains
`vlmtune.train.train` for 3 optimizer steps in its own process and measures step 2 (the first with
the optimizer state in place) with `tests/peak_memory.py`: tensor bytes through c10's allocator, as
`torch.cuda.max_memory_allocated()` would count them on a GPU (its docstring says why not RSS).
Then `vlmtune.plan.make_plan` estimates the same run on a CPU (`--device cpu`: fp32 unless the
case says bf16, no CUDA overhead) for the batch the step actually got: its padded length and
whether it held padding. Every sample has its own answer length, so batches of 2 or more are
padded, as real data makes them.

Cases per model: LoRA and full fine-tuning, each with and without gradient checkpointing; full
fine-tuning with the vision tower and projector, with and without checkpointing; LoRA with the
vision tower trained fully (peft modules_to_save); LoRA with dropout; one sample per batch (no
padding). The target (issue 5): every estimate within 20% of the measured peak. (vlmtune trains in
fp32 on the CPU, so the bf16 terms of the formulas are not exercised here.)
Results: bench/results/plan_validation.json and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results" / "plan_validation.json"
TOLERANCE = 0.20
WORDS = "a red green blue yellow circle square triangle and on the left right top bottom of with".split()

MODELS = {  # name -> family, build_tiny_model arguments, vocabulary, image side, samples per batch
    "tiny": {"family": "qwen2_vl", "build": {}, "vocab": None, "image": 112, "batch": 2},
    "mid": {"family": "qwen2_vl", "build": {"hidden": 512, "layers": 8, "heads": 8, "vision_dim": 256,
                                            "vision_depth": 4, "image_size": 224}, "vocab": 16384, "image": 224,
            "batch": 4},
    "tiny-2.5": {"family": "qwen2_5_vl", "build": {"hidden": 128, "vision_dim": 64, "image_size": 128}, "vocab": None,
                 "image": 128, "batch": 2},
    "tiny-3": {"family": "qwen3_vl", "build": {"hidden": 128, "vision_dim": 64, "image_size": 128}, "vocab": None,
               "image": 128, "batch": 2},
}
CASES = {  # name -> dotted overrides of the run config
    "lora": ["train.method=lora"],
    "lora+gc": ["train.method=lora", "train.gradient_checkpointing=true"],
    "full": ["train.method=full"],
    "full+gc": ["train.method=full", "train.gradient_checkpointing=true"],
    "full, vision+projector": ["train.method=full", "train.freeze_vision=false", "train.freeze_projector=false"],
    "full+gc, vision+projector": ["train.method=full", "train.freeze_vision=false", "train.freeze_projector=false",
                                  "train.gradient_checkpointing=true"],
    "lora, vision trained": ["train.method=lora", "train.freeze_vision=false"],
    "lora, dropout 0.05": ["train.method=lora", "lora.dropout=0.05"],
    "lora, batch 1": ["train.method=lora", "train.batch_size=1"],
}


def build_model(name: str, folder: Path) -> Path:
    """The model `name` of MODELS in `folder` (built once)."""
    from vlmtune.models.tiny import build_tiny_model

    spec = MODELS[name]
    path = folder / name
    if (path / "config.json").is_file():
        return path
    build_tiny_model(spec["family"], path, **spec["build"])
    if spec["vocab"]:  # a real-sized vocabulary makes the logits and embeddings weigh as they do in practice
        from transformers import AutoModelForImageTextToText

        model = AutoModelForImageTextToText.from_pretrained(path)
        model.resize_token_embeddings(spec["vocab"], mean_resizing=False)
        model.save_pretrained(path)
    return path


def write_data(folder: Path, n: int, side: int) -> Path:
    """`n` samples with `side` x `side` images and answers of n different lengths (so batches pad)."""
    from PIL import Image, ImageDraw

    (folder / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        image = Image.new("RGB", (side, side), "white")
        ImageDraw.Draw(image).ellipse((side // 5, side // 5, 4 * side // 5, 4 * side // 5), fill=WORDS[1 + i % 4])
        image.save(folder / "images" / f"{i}.png")
        answer = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(2 + 3 * i))
        records.append({"image": f"images/{i}.png", "conversations": [
            {"role": "user", "content": "<image>\nWhat is in the image?"}, {"role": "assistant", "content": answer}]})
    path = folder / "train.json"
    path.write_text(json.dumps(records))
    return path


def run_overrides(model: Path, data: Path, out: Path, name: str, case: str) -> list[str]:
    spec = MODELS[name]
    return [f"model.name_or_path={model}", "model.attn_implementation=sdpa", f"data.train={data}",
            f"data.image_size=[{spec['image']}, {spec['image']}]", "data.max_length=4096",
            f"train.output_dir={out}", f"train.batch_size={spec['batch']}", "train.grad_accum=1", "train.max_steps=3",
            "train.save_steps=1000", "train.logging_steps=1000", "train.report_to=[]", "eval.num_samples=0",
            "lora.r=16", "lora.dropout=0.0", *CASES[case]]


def measure_case(overrides: list[str]) -> dict:
    """In this process: train and measure step 2 (called through `--measure` in a fresh process)."""
    import torch

    from vlmtune.config import load_config
    sys.path.insert(0, str(ROOT / "tests"))  # the measurement is a test helper
    from peak_memory import measure_training_peak

    torch.manual_seed(0)
    m = measure_training_peak(load_config(None, overrides), step=2)
    return {"peak_bytes": m.peak_bytes, "baseline_bytes": m.baseline_bytes, "batch_shape": list(m.batch_shape),
            "padded": m.padded, "parameter_bytes": m.parameter_bytes, "optimizer_bytes": m.optimizer_bytes}


def estimate_case(overrides: list[str], measured: dict) -> dict:
    from vlmtune.config import load_config
    from vlmtune.plan import make_plan

    samples, length = measured["batch_shape"]
    config = load_config(None, [*overrides, f"data.max_length={length}"])
    plan = make_plan(config, device="cpu", padded=measured["padded"])
    e = plan.estimate
    return {"estimate_bytes": e.tensors, "moment": e.moment, "components": {
        k: getattr(e, k) for k in ("weights", "optimizer", "gradients", "activations", "transient", "batch")}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: JSON overrides, measure in this process
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.measure:
        print("MEASURED " + json.dumps(measure_case(json.loads(args.measure))))
        return 0

    rows = []
    with tempfile.TemporaryDirectory(prefix="plan_validation_") as tmp:
        tmp = Path(tmp)
        for name in args.models:
            model = build_model(name, tmp)
            data = write_data(tmp / f"data_{name}", 8, MODELS[name]["image"])
            for case in args.cases:
                overrides = run_overrides(model, data, tmp / f"run_{name}_{len(rows)}", name, case)
                env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1",
                       "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
                proc = subprocess.run([sys.executable, __file__, "--measure", json.dumps(overrides)], env=env,
                                      capture_output=True, text=True, cwd=ROOT)
                line = next((l for l in proc.stdout.splitlines() if l.startswith("MEASURED ")), None)
                if proc.returncode != 0 or line is None:
                    print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
                    raise SystemExit(f"case {name} / {case} failed")
                measured = json.loads(line.removeprefix("MEASURED "))
                estimated = estimate_case(overrides, measured)
                ratio = estimated["estimate_bytes"] / measured["peak_bytes"]
                rows.append({"model": name, "case": case, **measured, **estimated, "ratio": round(ratio, 4),
                             "within_tolerance": abs(ratio - 1) <= TOLERANCE})
                mib = 2 ** 20
                print(f"{name:<5} {case:<26} batch {measured['batch_shape']} measured "
                      f"{measured['peak_bytes'] / mib:8.2f} MiB  estimate {estimated['estimate_bytes'] / mib:8.2f} MiB"
                      f"  ratio {ratio:.3f}  ({estimated['moment']})", flush=True)
    worst = max(abs(r["ratio"] - 1) for r in rows)
    result = {"machine": platform.platform(), "python": platform.python_version(), "tolerance": TOLERANCE,
              "all_within_tolerance": all(r["within_tolerance"] for r in rows), "worst_deviation": round(worst, 4),
              "cases": rows}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    print(f"worst deviation {100 * worst:.1f}% (target {100 * TOLERANCE:.0f}%); results in {RESULTS.relative_to(ROOT)}")
    return 0 if result["all_within_tolerance"] else 1


if __name__ == "__main__":
    sys.exit(main())
