"""`make gpu-check`: what only a GPU can check, in one pass of under 8 minutes on one H100/H200.

    make gpu-check                                   # installs the DeepSpeed and QLoRA extras, then:
    .venv/bin/python bench/gpu_check.py              # on a CUDA machine
    .venv/bin/python bench/gpu_check.py --smoke      # the same code on CPU with tiny models (a test runs it)

1. The `gpu`-marked tests (`pytest -m gpu tests bench`): among them flash-attention varlen packing
   against padded batches (tests/test_packing.py), DeepSpeed ZeRO-3 with mixed text-only / image data
   and a trained vision tower (tests/test_distributed_mixed.py), vLLM serving where vllm is installed.
2. Quick figures with bench/gpu.py's runs (fewer steps than `bench/gpu.py` itself): random-weight
   Qwen2-VL-2B LoRA with seed 002's settings (500x100 formula images, batch 4, r=64) through the seeds'
   pipeline and through vlmtune in bf16 and fp16, vlmtune QLoRA, and MiniCPM-V 2.6 LoRA with seed 004's
   config through vlmtune: samples/s, MFU, peak memory and `vlmtune plan`'s estimate of it.
A run that needs what is missing (CUDA, bitsandbytes) says "skipped" and why; a failed one says
"failed" with its first error line; rows after the time budget say "skipped: time budget".

Writes bench/results/gpu_check.json and prints one table. Without CUDA (and without --smoke) it
prints one line and exits 0.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import gpu  # bench/gpu.py: models, data, runs and figures

ROOT = gpu.ROOT
RESULTS = ROOT / "bench" / "results" / "gpu_check.json"
BUDGET_S = 420  # the runs stop starting after this (the whole check must end within 8 minutes)
TESTS_TIMEOUT_S = 240
# name, family, pipeline, method, dtype, what it needs beyond the CPU
RUNS = (
    ("Qwen2-VL-2B LoRA, seed pipeline, bf16", "qwen2_vl", "seed", "lora", "bf16", ()),
    ("Qwen2-VL-2B LoRA, vlmtune, bf16", "qwen2_vl", "vlmtune_grouped", "lora", "bf16", ()),
    ("Qwen2-VL-2B LoRA, vlmtune, fp16", "qwen2_vl", "vlmtune_grouped", "lora", "fp16", ("cuda",)),
    ("Qwen2-VL-2B QLoRA, vlmtune, bf16", "qwen2_vl", "vlmtune_grouped", "qlora", "bf16", ("cuda", "bitsandbytes")),
    ("MiniCPM-V 2.6 LoRA, vlmtune, bf16", "minicpmv2_6", "vlmtune_grouped", "lora", "bf16", ()),
)
# on CPU: the tests that stand for the GPU ones (they skip there, quickly), so the report's test half runs too
SMOKE_TESTS = ("tests/test_packing.py", "tests/test_distributed_mixed.py")


def missing(needs: tuple[str, ...], cuda: bool) -> str | None:
    """Why a run cannot run here, or None."""
    if "cuda" in needs and not cuda:
        return "needs CUDA"
    for package in (n for n in needs if n != "cuda"):
        if importlib.util.find_spec(package) is None:
            return f"needs {package} (make gpu-check installs it: pip install -e '.[qlora]')"
    return None


def run_tests(work: Path, smoke: bool) -> tuple[list[dict], float]:
    """Each `gpu`-marked test as {"test", "outcome", "seconds", "message"}, from pytest's JUnit XML."""
    report = work / "gpu_tests.xml"
    report.unlink(missing_ok=True)
    targets = list(SMOKE_TESTS) if smoke else ["tests", "bench"]
    start = time.perf_counter()
    try:
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                        f"--junitxml={report}", *targets], cwd=ROOT, timeout=TESTS_TIMEOUT_S,
                       stdout=sys.stdout, stderr=subprocess.STDOUT)
    except subprocess.TimeoutExpired:
        return [{"test": "pytest -m gpu", "outcome": "failed", "seconds": TESTS_TIMEOUT_S,
                 "message": f"did not finish within {TESTS_TIMEOUT_S} s"}], time.perf_counter() - start
    if not report.is_file():
        return [{"test": "pytest -m gpu", "outcome": "failed", "seconds": 0.0, "message": "no report written"}], \
            time.perf_counter() - start
    return junit_outcomes(report), time.perf_counter() - start


def junit_outcomes(path: Path) -> list[dict]:
    rows = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = (node.get("message") or node.text or "").strip().splitlines()[0][:160] if (
                    node.get("message") or node.text) else ""
                break
        module = case.get("classname", "").replace(".", "/") + ".py"
        rows.append({"test": f"{module}::{case.get('name')}", "outcome": outcome,
                     "seconds": float(case.get("time") or 0.0), "message": message})
    return rows


def run_figures(work: Path, smoke: bool, cuda: bool, n: int, steps: int, warmup: int, peak_tflops,
                deadline: float) -> list[dict]:
    """One row per entry of RUNS: its figures, or why not."""
    rows, prepared = [], {}
    for name, family, pipeline, method, dtype, needs in RUNS:
        if not cuda:  # the CPU computes in fp32
            name, dtype = name.replace(f", {dtype}", ", fp32") if "cuda" not in needs else name, (
                dtype if "cuda" in needs else "fp32")
        row = {"check": name, "family": family, "pipeline": pipeline, "method": method, "dtype": dtype}
        why = missing(needs, cuda)
        if why is None and time.time() > deadline:
            why = "time budget"
        if why is not None:
            rows.append({**row, "status": "skipped", "message": why})
            continue
        start = time.perf_counter()
        try:
            if family not in prepared:
                prepared[family] = prepare(family, work, smoke, n)
            spec = {**prepared[family], "work": str(work), "family": family, "steps": steps, "warmup": warmup,
                    "peak_tflops": peak_tflops, "method": method, "pipeline": pipeline, "dtype": row["dtype"]}
            print(f"running {name} ...", flush=True)
            figures = gpu.run_one(spec) if smoke else gpu.run_in_child(spec, work)
        except (Exception, SystemExit) as e:  # noqa: BLE001 - a failed run is a row of the report
            rows.append({**row, "status": "failed", "message": str(e).strip().splitlines()[0][:200] if str(e) else
                         type(e).__name__, "seconds": time.perf_counter() - start})
            continue
        status = "failed" if "error" in figures else "ok"
        rows.append({**row, "status": status, "message": figures.get("error", ""),
                     "seconds": time.perf_counter() - start, **figures})
    return rows


def prepare(family: str, work: Path, smoke: bool, n: int) -> dict:
    """The model folder and training data of `family` (what bench/gpu.py builds)."""
    if family == "qwen2_vl":
        model_dir = gpu.build_qwen_model(work, smoke)
        train_json, longest = gpu.prepare_qwen_data(work, n, model_dir)
        return {"model": str(model_dir), "train_json": str(train_json), "longest": longest}
    model_dir = gpu.build_minicpm_model(work, smoke)
    return {"model": str(model_dir), "train_json": str(gpu.prepare_minicpm_data(work, n, 1.0))}


def table(tests: list[dict], runs: list[dict]) -> str:
    gib = 2 ** 30

    def mem(value) -> str:
        return f"{value / gib:.1f} GiB" if value else "-"

    lines = [f"{'check':72} {'status':8} {'samples/s':>9} {'MFU':>6} {'peak mem':>9} {'plan':>9} {'seconds':>7}",
             "-" * 126]
    for t in tests:
        lines.append(f"{Path(t['test']).name[:72]:72} {t['outcome']:8} {'':>9} {'':>6} {'':>9} {'':>9} {t['seconds']:7.1f}"
                     + (f"  {t['message'][:60]}" if t["outcome"] != "passed" and t["message"] else ""))
    for r in runs:
        if r["status"] != "ok":
            lines.append(f"{r['check'][:72]:72} {r['status']:8} {r.get('message', '')[:60]}")
            continue
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
        lines.append(f"{r['check'][:72]:72} {'ok':8} {r['samples_per_s']:9.2f} {mfu:>6} "
                     f"{mem(r.get('peak_memory_bytes')):>9} {mem(r.get('plan_tensor_bytes')):>9} {r['seconds']:7.1f}")
    return "\n".join(lines)


def run_check(args) -> int:
    """`bench/gpu_check.py [--smoke]` (args: its parsed arguments, see `main`)."""
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("bench/gpu_check.py: no CUDA device here, skipped (use --smoke to exercise it on CPU)")
        return 0
    began = time.time()
    n = args.n or (12 if args.smoke else 48)
    steps = args.steps or (3 if args.smoke else 8)
    warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 3)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="vlmtune-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        tests, test_seconds = run_tests(work, args.smoke)
        runs = run_figures(work, args.smoke, cuda, n, steps, warmup, args.peak_tflops, began + BUDGET_S)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    for r in runs:  # the plan against what was measured: > 1 means the plan expected more
        peak, plan = r.get("peak_memory_bytes"), r.get("plan_tensor_bytes")
        r["plan_over_peak"] = plan / peak if peak and plan else None
    print()
    print(table(tests, runs))
    device = torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or 'cpu'})"
    out = Path(args.out or RESULTS)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({
        "device": device, "torch": torch.__version__, "smoke": args.smoke,
        "settings": {"samples": n, "steps": steps, "warmup_steps": warmup, "budget_s": BUDGET_S,
                     "qwen2_vl": {"batch_size": gpu.BATCH, "image_height_width": gpu.IMAGE_HW,
                                  "lora": {"r": 64, "alpha": 16, "dropout": 0.05}, "gradient_checkpointing": True},
                     "minicpmv2_6": {"batch_size": gpu.MINICPM_BATCH, "config": "configs/minicpmv2_6_lora.yaml"}},
        "tests": tests, "tests_seconds": test_seconds, "runs": runs,
        "failed": [t["test"] for t in tests if t["outcome"] in ("failed", "error")]
                  + [r["check"] for r in runs if r["status"] == "failed"],
        "total_seconds": time.time() - began}, indent=2) + "\n")
    tmp.replace(out)
    print(f"\nwritten {out} ({time.time() - began:.0f} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny models on CPU, few steps: checks the script runs")
    parser.add_argument("--n", type=int, default=None, help="training samples (default 48, smoke 12)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 8, smoke 3)")
    parser.add_argument("--warmup", type=int, default=None, help="steps left out of the figures (default 3, smoke 1)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak, if not known")
    parser.add_argument("--work", help="folder for the models and data (default: a temporary one)")
    parser.add_argument("--out", default=None, help="the JSON results file (default bench/results/gpu_check.json)")
    return run_check(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
