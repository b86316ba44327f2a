"""Training speed, memory and padding: the seeds' Qwen2-VL pipeline against `vlmtune train`.

    make bench                                   # or, with the defaults spelled out:
    .venv/bin/python bench/train_speed.py --n 1000 --steps 55 --warmup 5 --workers 1 --threads 1 --repeats 2

Both pipelines train the same tiny random-weight Qwen2-VL (hidden 128, 2 layers) with the same LoRA
(r=64, alpha=16, dropout 0.05, on the language model's q/k/v/o/gate/up/down_proj), gradient
checkpointing (the seeds turn it on), batch size 4, for the same number of optimizer steps, on the
same 1,000 synthetic LaTeX formula images resized to seed 002's fixed 500x100 (height x width).
Answers of 1-40 tokens make the samples 133-189 tokens long, so padding matters. The baseline is
bench/seed_pipeline.py; vlmtune is `vlmtune.train.train(config)` with `data.num_workers=1`.

Each run is its own subprocess, so that its peak memory is its own. The runs alternate: vlmtune,
seed, vlmtune, seed. The seed's `Dataset.map` (minutes) runs in its first run only; the
second reuses the map cache and repeats the steady-state figures. Each figure is a median over runs,
and every ratio compares runs minutes apart, since other jobs on a shared CPU slow both sides.
Every main process gets one torch thread (`--threads`): on a 2-core machine that other jobs load,
two threads on these tiny matrices wait on each other (a step takes 4-5x longer) and the noise
swamps what is measured. vlmtune's DataLoader workers use one thread each (PyTorch's default).

Figures, per pipeline:
  - time to first step: from the call of the pipeline function (imports done) to the end of
    optimizer step 1: reading and preparing 1,000 samples, loading the model, step 1;
  - non-padding tokens/s: attention-mask tokens of the batches of steps warmup+1..steps, over the
    time between the ends of step `warmup` and of the last step (a forward pre-hook counts them).
    55 steps with 5 of warm-up time 50 steps: one mega-batch of vlmtune's length grouping (200
    samples sorted by length), so its window is not biased towards long or short samples;
  - peak memory: the larger of the main process's peak RSS (getrusage) and the peak PSS of its
    whole process tree sampled every 50 ms (DataLoader workers included; PSS splits shared pages);
  - preprocessing cache: bytes in the datasets cache folder (the seed's `Dataset.map` output);
    vlmtune writes none;
  - padding fraction: pad tokens / all tokens over the batches of all steps.
Results go to bench/results/train_speed.json; ratios are oriented so that > 1 means vlmtune is better.

`--cache` measures vlmtune's on-disk encoding cache (`data.cache_dir`) instead, without the seed
pipeline: per repeat, a run without the cache, a run that fills a fresh cache, and a second run
that reuses it (the run without the cache goes first, then last, alternately). It compares the
second run with the cache against a run without it (time to first step, steady tokens/s, CPU
seconds), reports the cache's size on disk and, per sample, encoding against reading an entry;
results go to bench/results/train_speed_cache.json.

    .venv/bin/python bench/train_speed.py --cache --repeats 2 [--workers 0]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "train_speed.json"
CACHE_RESULTS = ROOT / "bench" / "results" / "train_speed_cache.json"
PROMPT = "你是一个LaText OCR助手,目标是读取用户输入的照片，转换成LaTex公式。"  # seed 002's prompt
IMAGE_HW = (500, 100)  # seed 002: resized_height=500, resized_width=100
TARGETS = {"time_to_first_step": 10.0, "tokens_per_s": 2.0, "peak_memory": 3.0}  # issue 5's "done when"


# --- inside a pipeline's subprocess ---------------------------------------------------------

def step_clock(t0: float):
    """A TrainerCallback that timestamps the end of every optimizer step and counts the tokens of
    every training forward (padded, non-padding, trained-on)."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.t0, self.step_ends, self.batches, self.model = t0, [], [], None

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.model = model
            model.register_forward_pre_hook(self.count, with_kwargs=True)

        def count(self, module, args, kwargs):
            if module.training:
                mask, labels = kwargs["attention_mask"], kwargs["labels"]
                self.batches.append((mask.numel(), int(mask.sum()), int((labels != -100).sum())))

        def on_step_end(self, args, state, control, **kwargs):
            self.step_ends.append(time.perf_counter())

    return StepClock()


def run_child(pipeline: str, work: Path, steps: int, warmup: int, workers: int, threads: int, result: Path,
              cache_dir: str | None = None) -> None:
    import torch

    torch.set_num_threads(threads)

    if pipeline == "seed":
        sys.path.insert(0, str(ROOT / "bench"))
        from seed_pipeline import run_seed_pipeline

        t0 = time.perf_counter()
        clock = step_clock(t0)
        run_seed_pipeline(str(work / "model"), str(work / "seed_train.json"), str(work / "seed_out"),
                          str(work / "seed_cache"), PROMPT, steps, [clock], *IMAGE_HW)
    else:
        from vlmtune.config import load_config
        from vlmtune.train import train

        config = load_config(None, [
            f"model.name_or_path={work / 'model'}", f"data.train={work / 'latex' / 'train.json'}",
            f"data.image_size=[{IMAGE_HW[1]}, {IMAGE_HW[0]}]", f"data.num_workers={workers}",
            "lora.r=64", "lora.alpha=16", "lora.dropout=0.05", "train.batch_size=4", "train.grad_accum=1",
            f"train.max_steps={steps}", "train.learning_rate=1e-4", "train.gradient_checkpointing=true",
            "train.logging_steps=10", "train.save_steps=100", "eval.num_samples=0",
            f"train.output_dir={work / 'vlmtune_out'}", *([f"data.cache_dir={cache_dir}"] if cache_dir else [])])
        t0 = time.perf_counter()
        clock = step_clock(t0)
        train(config, callbacks=[clock])

    ends, batches = clock.step_ends, clock.batches
    assert len(ends) == steps and len(batches) == steps, (len(ends), len(batches))
    timed = batches[warmup:]
    seconds = ends[-1] - ends[warmup - 1]
    padded, real, trained = (sum(b[k] for b in batches) for k in range(3))
    out = {
        "time_to_first_step_s": ends[0] - t0,
        "steady_seconds": seconds,
        "tokens_per_s": sum(b[1] for b in timed) / seconds,
        "trained_tokens_per_s": sum(b[2] for b in timed) / seconds,
        "samples_per_s": 4 * len(timed) / seconds,
        "padding_fraction": 1 - real / padded,
        "tokens": {"padded": padded, "non_padding": real, "trained": trained},
        "max_rss_self_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "max_rss_children_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
        "trainable_parameters": sum(p.numel() for p in clock.model.parameters() if p.requires_grad),
        "torch_threads": torch.get_num_threads(),
        "cpu_seconds": sum(getattr(resource.getrusage(who), f) for f in ("ru_utime", "ru_stime")
                           for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)),  # workers included
    }
    result.write_text(json.dumps(out, indent=2))


# --- the parent ----------------------------------------------------------------------------

def prepare(work: Path, n: int) -> None:
    """The tiny model, the synthetic LaTeX data, and the same records in the seeds' file format."""
    sys.path.insert(0, str(ROOT / "bench"))
    from seed_pipeline import write_seed_json

    from vlmtune.data.synth import make_latex
    from vlmtune.models.tiny import build_tiny_model

    if not (work / "model" / "config.json").is_file():
        # The pixel budget must hold seed 002's 504x112 images, which the processor would shrink otherwise.
        build_tiny_model("qwen2_vl", work / "model", hidden=128, layers=2, heads=4, vision_dim=32, vision_depth=2,
                         image_size=256)
    train_json, _ = make_latex(work / "latex", n, 0, seed=0)
    records = json.loads(train_json.read_text(encoding="utf-8"))
    write_seed_json(records, work / "latex", work / "seed_train.json")


def _tree_memory(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in bytes, summed over the process and its descendants."""
    import psutil

    try:
        procs = [psutil.Process(pid)]
        procs += procs[0].children(recursive=True)
    except psutil.NoSuchProcess:
        return 0, 0
    rss = pss = 0
    for p in procs:
        try:
            for line in Path(f"/proc/{p.pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1]) * 1024
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
        except (OSError, ValueError):
            pass  # the process ended between listing and reading
    return rss, pss


def run_pipeline(pipeline: str, work: Path, args, fresh_cache: bool = True, cache_dir: Path | None = None) -> dict:
    """One pipeline in a fresh subprocess, its process tree's memory sampled every 50 ms.

    `fresh_cache=False` lets the seed pipeline reuse the `Dataset.map` result of its previous run:
    such a run repeats the steady-state figures only (its start and memory are not the seed's)."""
    for folder in ("seed_out", "vlmtune_out", *(["seed_cache"] if pipeline == "seed" and fresh_cache else [])):
        shutil.rmtree(work / folder, ignore_errors=True)
    result = work / f"result_{pipeline}.json"
    result.unlink(missing_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads)}
    command = [sys.executable, __file__, "--child", pipeline, "--work", str(work), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--workers", str(args.workers), "--threads", str(args.threads),
               "--result", str(result), *(["--cache-dir", str(cache_dir)] if cache_dir else [])]
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    with (work / f"log_{pipeline}.txt").open("w") as log:
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        peak = {"rss": 0, "pss": 0}

        def sample():
            while proc.poll() is None:
                rss, pss = _tree_memory(proc.pid)
                peak["rss"], peak["pss"] = max(peak["rss"], rss), max(peak["pss"], pss)
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        code = proc.wait()
        sampler.join()
    if code != 0 or not result.is_file():
        tail = (work / f"log_{pipeline}.txt").read_text(errors="replace")[-4000:]
        raise SystemExit(f"the {pipeline} pipeline failed (exit {code}); the end of its log:\n{tail}")
    out = json.loads(result.read_text())
    cache = work / "seed_cache"
    out["cache_bytes"] = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file()) if pipeline == "seed" else 0
    out["fresh_cache"] = fresh_cache
    out["tree_peak_rss_bytes"], out["tree_peak_pss_bytes"] = peak["rss"], peak["pss"]
    out["peak_memory_bytes"] = max(out["max_rss_self_bytes"], peak["pss"])
    out["wall_s"] = time.perf_counter() - started
    out["load_average_before"] = load_before
    return out


STEADY = ("tokens_per_s", "trained_tokens_per_s", "samples_per_s", "padding_fraction")
START = ("time_to_first_step_s", "peak_memory_bytes", "cache_bytes")


def summarize(runs: list[dict]) -> dict:
    """Medians over a pipeline's runs: steady-state figures over all of them, start-up figures
    (first step, peak memory, cache) over those that started from nothing."""
    cold = [r for r in runs if r["fresh_cache"]]
    out = {**cold[0], **{k: statistics.median(r[k] for r in runs) for k in STEADY},
           **{k: statistics.median(r[k] for r in cold) for k in START}}
    out["runs"], out["runs_from_nothing"] = len(runs), len(cold)
    return out


def ratios(seed: dict, ours: dict) -> dict:
    def better_lower(a, b):  # seed / vlmtune
        return a / b if b else float("inf")

    return {
        "time_to_first_step": better_lower(seed["time_to_first_step_s"], ours["time_to_first_step_s"]),
        "tokens_per_s": ours["tokens_per_s"] / seed["tokens_per_s"],
        "trained_tokens_per_s": ours["trained_tokens_per_s"] / seed["trained_tokens_per_s"],
        "samples_per_s": ours["samples_per_s"] / seed["samples_per_s"],
        "peak_memory": better_lower(seed["peak_memory_bytes"], ours["peak_memory_bytes"]),
        "cache_bytes": better_lower(seed["cache_bytes"], ours["cache_bytes"]),
        "padding_fraction": better_lower(seed["padding_fraction"], ours["padding_fraction"]),
    }


def table(seed: dict, ours: dict, r: dict) -> str:
    mib = 1024 ** 2

    def ratio(x: float) -> str:
        return "no cache" if x == float("inf") else f"{x:.2f}x"

    rows = [
        ("time to first step (1,000 samples)", f"{seed['time_to_first_step_s']:.1f} s",
         f"{ours['time_to_first_step_s']:.1f} s", r["time_to_first_step"], "time_to_first_step"),
        ("non-padding tokens/s (steady)", f"{seed['tokens_per_s']:.0f}", f"{ours['tokens_per_s']:.0f}",
         r["tokens_per_s"], "tokens_per_s"),
        ("samples/s (steady)", f"{seed['samples_per_s']:.1f}", f"{ours['samples_per_s']:.1f}",
         r["samples_per_s"], None),
        ("trained (label) tokens/s", f"{seed['trained_tokens_per_s']:.0f}", f"{ours['trained_tokens_per_s']:.0f}",
         r["trained_tokens_per_s"], None),
        ("peak memory", f"{seed['peak_memory_bytes'] / mib:.0f} MiB", f"{ours['peak_memory_bytes'] / mib:.0f} MiB",
         r["peak_memory"], "peak_memory"),
        ("preprocessing cache on disk", f"{seed['cache_bytes'] / mib:.0f} MiB", f"{ours['cache_bytes'] / mib:.0f} MiB",
         r["cache_bytes"], None),
        ("padding fraction", f"{seed['padding_fraction']:.1%}", f"{ours['padding_fraction']:.1%}",
         r["padding_fraction"], None),
    ]
    lines = [f"{'':38} {'seed pipeline':>14} {'vlmtune':>12} {'vlmtune better by':>18}  target",
             "-" * 96]
    for name, a, b, x, target in rows:
        goal = ""
        if target:
            goal = f">= {TARGETS[target]:g}x " + ("met" if x >= TARGETS[target] else "MISSED")
        lines.append(f"{name:38} {a:>14} {b:>12} {ratio(x):>18}  {goal}")
    return "\n".join(lines)


def encode_vs_read(encoder, samples: list, folder: Path) -> dict:
    """Median time to encode one of `samples`, and to read it back from a cache entry instead
    (hashing its image file for the key, reading, checking the checksum), on one thread."""
    from vlmtune.data.encode_cache import EncodeCache

    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        cache = EncodeCache(tmp, encoder)
        encode_s, read_s, sizes = [], [], []
        for sample in samples:
            t = time.perf_counter()
            tensors = encoder.encode(sample)
            encode_s.append(time.perf_counter() - t)
            cache.store(cache.key(sample), tensors)
        for sample in samples:
            t = time.perf_counter()
            assert cache.load(cache.key(sample)) is not None
            read_s.append(time.perf_counter() - t)
            sizes.append(cache.path(cache.key(sample)).stat().st_size)
    return {"samples": len(samples), "encode_ms": 1000 * statistics.median(encode_s),
            "cache_read_ms": 1000 * statistics.median(read_s), "entry_bytes": statistics.median(sizes)}


def per_sample_costs(work: Path, n: int = 40) -> dict:
    """`encode_vs_read` for the benchmark's samples (504x112 PNG formulas, the runs' encoder), and for
    640x480 JPEG photos encoded at full resolution (a pixel budget of 640*480; 1,564 patches)."""
    import numpy as np
    import torch
    from PIL import Image

    from vlmtune.data.encode import Encoder
    from vlmtune.data.formats import load_samples
    from vlmtune.data.sample import IMAGE, Sample, Turn
    from vlmtune.models import family_for
    from vlmtune.models.load import load_processor

    torch.set_num_threads(1)
    family = family_for(work / "model")
    formulas = encode_vs_read(
        Encoder(load_processor(work / "model", family), family, image_size=(IMAGE_HW[1], IMAGE_HW[0]), max_length=2048),
        load_samples(str(work / "latex" / "train.json"))[:n], work)
    rng = np.random.default_rng(0)
    photos = []
    for i in range(n):
        path = work / "photos" / f"{i}.jpg"
        path.parent.mkdir(exist_ok=True)
        smooth = rng.random((48, 64, 3)).repeat(10, 0).repeat(10, 1) * 200 + rng.random((480, 640, 3)) * 55
        Image.fromarray(smooth.astype(np.uint8)).save(path, quality=90)
        photos.append(Sample(images=[str(path)], turns=[Turn("user", f"{IMAGE}\nDescribe the picture."),
                                                        Turn("assistant", "a photo")], source=f"photo {i}"))
    photo_encoder = Encoder(load_processor(work / "model", family, max_pixels=640 * 480), family, max_length=4096)
    return {"formula_504x112_png": formulas, "photo_640x480_jpeg": encode_vs_read(photo_encoder, photos, work)}


def cache_main(args) -> int:
    """vlmtune without, filling and reusing the encoding cache; see the module docstring."""
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="vlmtune-bench-cache-"))
    work.mkdir(parents=True, exist_ok=True)
    out_path = Path(args.out) if args.out != str(RESULTS) else CACHE_RESULTS
    try:
        print(f"preparing the tiny model and {args.n} synthetic LaTeX samples in {work}", flush=True)
        prepare(work, args.n)
        runs: dict[str, list[dict]] = {"no_cache": [], "fill": [], "reuse": []}
        for repeat in range(args.repeats):
            cache_dir = work / f"encode_cache_{repeat}"
            shutil.rmtree(cache_dir, ignore_errors=True)
            order = [("no_cache", None), ("fill", cache_dir), ("reuse", cache_dir)]
            if repeat % 2:  # the run without the cache goes last every other time: load drifts over minutes
                order = order[1:] + order[:1]
            for name, folder in order:
                print(f"running vlmtune, {name.replace('_', ' ')} ({repeat + 1}) ...", flush=True)
                r = run_pipeline("vlmtune", work, args, cache_dir=folder)
                r["cache_disk_bytes"] = (sum(f.stat().st_size for f in cache_dir.rglob("*") if f.is_file())
                                         if folder else 0)
                r["cache_files"] = len(list(cache_dir.rglob("*.safetensors"))) if folder else 0
                runs[name].append(r)
                print(f"  first step {r['time_to_first_step_s']:.2f} s, {r['tokens_per_s']:.0f} tokens/s, "
                      f"cache {r['cache_disk_bytes'] / 2**20:.1f} MiB in {r['cache_files']} files", flush=True)
        keys = ("time_to_first_step_s", "tokens_per_s", "samples_per_s", "cpu_seconds", "peak_memory_bytes",
                "cache_disk_bytes", "cache_files")
        med = {name: {k: statistics.median(r[k] for r in rs) for k in keys} for name, rs in runs.items()}
        ratios = {"second_run_time_to_first_step": med["no_cache"]["time_to_first_step_s"]
                  / med["reuse"]["time_to_first_step_s"],
                  "second_run_tokens_per_s": med["reuse"]["tokens_per_s"] / med["no_cache"]["tokens_per_s"],
                  "second_run_cpu_seconds": med["no_cache"]["cpu_seconds"] / med["reuse"]["cpu_seconds"],
                  "fill_run_tokens_per_s": med["fill"]["tokens_per_s"] / med["no_cache"]["tokens_per_s"]}
        per_sample = per_sample_costs(work)
        samples_seen = 4 * args.steps
        print(f"\n{'':34} {'no cache':>12} {'fill cache':>12} {'reuse cache':>12} {'reuse vs none':>14}")
        print("-" * 88)
        print(f"{'time to first step':34} " + " ".join(f"{med[n]['time_to_first_step_s']:>10.2f} s" for n in runs)
              + f" {ratios['second_run_time_to_first_step']:>13.2f}x")
        print(f"{'non-padding tokens/s (steady)':34} " + " ".join(f"{med[n]['tokens_per_s']:>12.0f}" for n in runs)
              + f" {ratios['second_run_tokens_per_s']:>13.2f}x")
        print(f"{'CPU seconds, workers included':34} " + " ".join(f"{med[n]['cpu_seconds']:>10.1f} s" for n in runs)
              + f" {ratios['second_run_cpu_seconds']:>13.2f}x")
        print(f"{'cache on disk':34} {'-':>12} " + " ".join(f"{med[n]['cache_disk_bytes'] / 2**20:>8.1f} MiB"
                                                         for n in ("fill", "reuse")))
        print(f"({med['fill']['cache_files']:.0f} entries for the {samples_seen} samples the {args.steps} steps draw)")
        for name, c in per_sample.items():
            print(f"per sample ({name}, one thread): encoding {c['encode_ms']:.1f} ms, reading its cache entry "
                  f"{c['cache_read_ms']:.1f} ms ({c['encode_ms'] / c['cache_read_ms']:.1f}x), "
                  f"{c['entry_bytes'] / 2**20:.2f} MiB per entry")
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps({
            "settings": {"samples": args.n, "steps": args.steps, "warmup_steps": args.warmup, "batch_size": 4,
                         "image_height_width": IMAGE_HW, "vlmtune_num_workers": args.workers, "repeats": args.repeats,
                         "threads": args.threads, "model": "tiny qwen2_vl, hidden 128, 2 layers, vision 32x2"},
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
            "medians": med, "ratios": ratios, "per_sample": per_sample, "runs": runs}, indent=2) + "\n")
        print(f"\nwritten {out_path}")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="training samples")
    parser.add_argument("--steps", type=int, default=55, help="optimizer steps per pipeline")
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the throughput")
    parser.add_argument("--workers", type=int, default=1, help="vlmtune's data.num_workers")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each pipeline's main process")
    parser.add_argument("--repeats", type=int, default=2, help="runs per pipeline (figures are medians)")
    parser.add_argument("--work", help="folder for the model, data and caches (default: a temporary one)")
    parser.add_argument("--out", default=str(RESULTS), help="the JSON results file")
    parser.add_argument("--cache", action="store_true",
                        help="measure vlmtune's encoding cache (data.cache_dir) instead of the seed comparison")
    parser.add_argument("--child", choices=["seed", "vlmtune"], help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        run_child(args.child, Path(args.work), args.steps, args.warmup, args.workers, args.threads, Path(args.result),
                  args.cache_dir)
        return 0
    if args.cache:
        return cache_main(args)

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="vlmtune-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        print(f"preparing the tiny model and {args.n} synthetic LaTeX samples in {work}", flush=True)
        prepare(work, args.n)
        runs: dict[str, list[dict]] = {"vlmtune": [], "seed": []}
        # Alternate; the seed's `Dataset.map` (minutes) runs once, later seed runs reuse its cache and
        # repeat only the steady-state figures.
        for pipeline in ["vlmtune", "seed"] * args.repeats:
            fresh = pipeline == "vlmtune" or not runs["seed"]
            print(f"running {pipeline} ({len(runs[pipeline]) + 1}{'' if fresh else ', reusing the map cache'}) ...",
                  flush=True)
            r = run_pipeline(pipeline, work, args, fresh_cache=fresh)
            runs[pipeline].append(r)
            print(f"  first step {r['time_to_first_step_s']:.1f} s, {r['tokens_per_s']:.0f} tokens/s, "
                  f"peak {r['peak_memory_bytes'] / 2**20:.0f} MiB, wall {r['wall_s']:.0f} s", flush=True)
        seed, ours = summarize(runs["seed"]), summarize(runs["vlmtune"])
        if seed["trainable_parameters"] != ours["trainable_parameters"]:
            print(f"warning: trainable parameters differ: seed {seed['trainable_parameters']}, "
                  f"vlmtune {ours['trainable_parameters']}")
        r = ratios(seed, ours)
        print()
        print(table(seed, ours, r))
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({
            "settings": {"samples": args.n, "steps": args.steps, "warmup_steps": args.warmup, "batch_size": 4,
                         "grad_accum": 1, "image_height_width": IMAGE_HW, "vlmtune_num_workers": args.workers,
                         "repeats": args.repeats, "model": "tiny qwen2_vl, hidden 128, 2 layers, vision 32x2",
                         "lora": {"r": 64, "alpha": 16, "dropout": 0.05}, "gradient_checkpointing": True},
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
            "seed": seed, "vlmtune": ours, "ratios_vlmtune_better": r, "targets": TARGETS,
            "runs": runs}, indent=2) + "\n")
        print(f"\nwritten {out}")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
