"""How vlmtune's data path scales: 10k, 100k and 1M records, against the seeds' `Dataset.map`.

    .venv/bin/python bench/data_scale.py                          # 10k, 100k, 1M (about 20 min on 2 cores)
    .venv/bin/python bench/data_scale.py --sizes 10000 --seed-sizes 10000

The records are synthetic MiniCPM-format JSON Lines (one image, a question, a caption of 3 to 22
words), drawn on `--images` distinct small PNG images (200,000 by default; record i shows image
i mod 200,000), with one bad record in a thousand (missing image, placeholder count, role order,
empty answer, in turn), as real data has. Each measurement runs in a fresh process, so that its peak
RSS is its own:

- check: `open_records` (parse the file into memory-mapped Arrow, `data.num_proc` processes) and
  the pre-flight check with token counting by the tiny Qwen2-VL's real processor; then the same
  again with the results cached (a rerun or a resume);
- first step: `vlmtune train` (tiny Qwen2-VL, LoRA, data.on_bad_sample=skip) from process start to
  the end of the first optimizer step, with an empty cache and then with the cache of the first run;
- seed: the seeds' path on the same records (seed 002's `Dataset.from_json(...).map(process_func)`,
  bench/seed_pipeline.py), which must finish before its first step; only for --seed-sizes, with
  images at their own size (the seed's fixed 500x100 resize would store 2.7 MB of float lists per
  record on disk).

Peak RSS is the main process's (ru_maxrss), and, separately, the largest worker's (pages it shares
with the main process counted). CPU seconds (process and workers) and the load average are recorded
too: the machine is shared, and CPU time does not depend on what else runs. The growth exponent is
the slope of log(time) against log(records). Results: bench/results/data_scale.json (the seeds'
figures of an earlier invocation are kept for sizes this one does not run them for).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZES = [(56, 56), (84, 56), (56, 84), (112, 112), (112, 56)]
WORDS = ("a red blue green circle square triangle on the left right of small big near far above below "
         "and with two three yellow").split()


def _draw(task: tuple[str, int, int]) -> None:
    from PIL import Image, ImageDraw

    folder, start, stop = task
    for k in range(start, stop):
        w, h = SIZES[k % len(SIZES)]
        path = Path(folder) / f"{k // 1000:04d}" / f"{k}.png"
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        image = Image.new("RGB", (w, h), ((k * 37) % 256, (k * 91) % 256, (k * 53) % 256))
        x, y = (k // 7) % (w - 8), (k // 11) % (h - 8)
        ImageDraw.Draw(image).rectangle((x, y, x + 8, y + 8), fill=(255 - (k % 256), k % 199, 40))
        image.save(path, compress_level=1)


def make_images(folder: Path, n: int, procs: int) -> None:
    import multiprocessing

    step = 2000
    tasks = [(str(folder), s, min(s + step, n)) for s in range(0, n, step)]
    with multiprocessing.Pool(procs) as pool:
        for _ in pool.imap_unordered(_draw, tasks):
            pass


def make_records(path: Path, n: int, n_images: int) -> tuple[Path, int]:
    """`n` records as JSON Lines; returns the path and the number of injected bad records."""
    rng = random.Random(0)
    bad = 0
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            k = i % n_images
            caption = " ".join(rng.choice(WORDS) for _ in range(3 + i % 20))
            record = {"id": f"r{i}", "image": f"images/{k // 1000:04d}/{k}.png", "conversations": [
                {"role": "user", "content": "<image>\nWhat is in the picture?"},
                {"role": "assistant", "content": caption}]}
            if i % 1000 == 999:
                bad += 1
                kind = (i // 1000) % 4
                if kind == 0:
                    record["image"] = f"images/missing/{i}.png"
                elif kind == 1:
                    record["conversations"][0]["content"] = "<image> and <image>?"
                elif kind == 2:
                    record["conversations"].insert(1, {"role": "user", "content": "Well?"})
                else:
                    record["conversations"][1]["content"] = "  "
            f.write(json.dumps(record) + "\n")
    return path, bad


def peak() -> dict:
    return {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "workers_peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
            "cpu_s": cpu(), "load_average_1min_at_end": os.getloadavg()[0]}


def cpu() -> float:
    """CPU seconds of this process and its finished workers: what the work costs whatever else runs."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


# --- the measurements, each run as `data_scale.py --run KIND ...` in its own process -------------

def run_check(data: str, model: str, cache: str, num_proc: int) -> dict:
    from vlmtune.data.check_cache import cached_check
    from vlmtune.data.encode import Encoder
    from vlmtune.data.table import open_records
    from vlmtune.models import family_for
    from vlmtune.models.load import load_processor

    family = family_for(model)
    encoder = Encoder(load_processor(model, family), family, max_length=2048)
    out = {}
    for attempt in ("cold", "cached"):
        t0, c0, load = time.perf_counter(), cpu(), os.getloadavg()[0]
        table = open_records(data, None, cache, num_proc, progress=False)
        t1 = time.perf_counter()
        report = cached_check(table, encoder, 2048, cache, num_proc=num_proc, progress=False, log=lambda m: None)
        t2 = time.perf_counter()
        out[attempt] = {"read_s": t1 - t0, "check_s": t2 - t1, "preflight_s": t2 - t0, "cpu_s": cpu() - c0,
                        "load_average_1min_at_start": load}
        out["bad"] = len(report.bad_indices)
    return {**out, **peak()}


def run_first_step(data: str, model: str, run: str, cache: str, num_proc: int, started: float) -> dict:
    from transformers import TrainerCallback

    from vlmtune.config import load_config
    from vlmtune.train import train

    class FirstStep(TrainerCallback):
        at = None

        def on_step_end(self, args, state, control, **kwargs):
            FirstStep.at = time.time()
            control.should_training_stop = True

    config = load_config(None, [f"model.name_or_path={model}", f"data.train={data}", f"train.output_dir={run}",
                                f"data.cache_dir={cache}", f"data.num_proc={num_proc}", "data.on_bad_sample=skip",
                                "train.max_steps=1", "train.batch_size=4", "train.grad_accum=1", "lora.r=4",
                                "train.save_steps=1000", "eval.num_samples=0", "train.logging_steps=1"])
    train(config, callbacks=[FirstStep()])
    return {"first_step_s": FirstStep.at - started, **peak()}


def run_seed(data: str, model: str, cache: str) -> dict:
    sys.path.insert(0, str(ROOT / "bench"))
    from datasets import Dataset
    from PIL import Image
    from transformers import AutoProcessor, AutoTokenizer

    from seed_pipeline import make_process_func

    seed_json = Path(cache) / "seed.jsonl"
    base = Path(data).parent
    with open(data, encoding="utf-8") as src, seed_json.open("w", encoding="utf-8") as dst:
        for line in src:  # the seeds' file: the user turn is the image path (csv2json.py)
            r = json.loads(line)
            if not (base / r["image"]).is_file() or not r["conversations"][-1]["content"].strip():
                continue  # the seed has no check: a bad record would stop it in the middle of map
            dst.write(json.dumps({"id": r["id"], "conversations": [
                {"role": "user", "value": str(base / r["image"])},
                {"role": "assistant", "value": r["conversations"][-1]["content"]}]}) + "\n")
    tokenizer = AutoTokenizer.from_pretrained(model)
    processor = AutoProcessor.from_pretrained(model)
    t0 = time.perf_counter()
    ds = Dataset.from_json(str(seed_json), cache_dir=str(Path(cache) / "hf"))
    funcs = {}

    def process(example):  # images at their own size: the seed's resize arguments set to it
        path = example["conversations"][0]["value"]
        with Image.open(path) as im:
            w, h = im.size
        if (h, w) not in funcs:
            funcs[(h, w)] = make_process_func(processor, tokenizer, "What is in the picture?", h, w)
        return funcs[(h, w)](example)

    ds.map(process)
    return {"map_s": time.perf_counter() - t0, **peak()}


def child(kind: str, args: list[str], timeout: float) -> dict:
    started = time.time()
    cmd = [sys.executable, __file__, "--run", kind, "--started", repr(started), *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"timed_out_after_s": timeout}
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        return {"failed": (done.stderr or done.stdout)[-2000:]}
    return json.loads(lines[-1][len("RESULT "):])


def exponent(points: list[tuple[int, float]]) -> float | None:
    """Least-squares slope of log(time) on log(records)."""
    points = [(n, t) for n, t in points if t and t > 0]
    if len(points) < 2:
        return None
    xs, ys = [math.log(n) for n, _ in points], [math.log(t) for _, t in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="*", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--seed-sizes", type=int, nargs="*", default=[10_000, 100_000])
    p.add_argument("--seed-timeout", type=float, default=900)
    p.add_argument("--images", type=int, default=200_000)
    p.add_argument("--num-proc", type=int, default=os.cpu_count() or 1)
    p.add_argument("--work", default="/tmp/vlmtune_data_scale")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "data_scale.json"))
    p.add_argument("--run", help=argparse.SUPPRESS)
    p.add_argument("--started", type=float, help=argparse.SUPPRESS)
    p.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.run:
        fn = {"check": run_check, "first_step": run_first_step, "seed": run_seed}[a.run]
        extra = [a.started] if a.run == "first_step" else []
        rest = [int(x) if x.isdigit() else x for x in a.rest]
        print("RESULT " + json.dumps(fn(*rest, *extra)), flush=True)
        return

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    model = work / "tiny_qwen2_vl"
    if not model.is_dir():
        from vlmtune.models.tiny import build_tiny_model
        build_tiny_model("qwen2_vl", model)
    results = {"machine": f"{os.cpu_count()} cores", "num_proc": a.num_proc, "images": a.images, "sizes": {}}
    try:  # seed runs of an earlier invocation are kept for the sizes this one does not run them for
        earlier = json.loads(Path(a.out).read_text())["sizes"]
    except (OSError, ValueError, KeyError):
        earlier = {}
    t = time.perf_counter()
    make_images(work / "images", min(a.images, max(a.sizes)), a.num_proc)
    print(f"images ready ({time.perf_counter() - t:.0f} s)", flush=True)
    for n in a.sizes:
        data, bad = make_records(work / f"records_{n}.jsonl", n, min(a.images, n))
        row: dict = {"records": n, "bad_records": bad, "file_mib": data.stat().st_size / 2**20}
        for tag in ("check", "first_step"):
            cache = work / f"cache_{n}_{tag}"
            subprocess.run(["rm", "-rf", str(cache), str(work / f"run_{n}"), str(work / f"run_{n}_again")])
            if tag == "check":
                row["check"] = child("check", [str(data), str(model), str(cache), str(a.num_proc)], 3600)
            else:
                row["first_step"] = child("first_step", [str(data), str(model), str(work / f"run_{n}"), str(cache),
                                                         str(a.num_proc)], 3600)
                row["first_step_cached"] = child("first_step", [str(data), str(model), str(work / f"run_{n}_again"),
                                                                str(cache), str(a.num_proc)], 3600)
        if n in a.seed_sizes:
            cache = work / f"seed_{n}"
            subprocess.run(["rm", "-rf", str(cache)])
            cache.mkdir()
            row["seed_map"] = child("seed", [str(data), str(model), str(cache)], a.seed_timeout)
            subprocess.run(["rm", "-rf", str(cache)])
        elif "seed_map" in earlier.get(str(n), {}):
            row["seed_map"] = {**earlier[str(n)]["seed_map"], "from_an_earlier_invocation": True}
        results["sizes"][str(n)] = row
        print(json.dumps(row), flush=True)
        Path(a.out).write_text(json.dumps(results, indent=1) + "\n")
    points = [(int(n), r["check"].get("cold", {}).get("preflight_s")) for n, r in results["sizes"].items()]
    results["preflight_exponent"] = exponent(points)
    points = [(int(n), r["first_step"].get("first_step_s")) for n, r in results["sizes"].items()]
    results["first_step_exponent"] = exponent(points)
    points = [(int(n), r["check"].get("cold", {}).get("cpu_s")) for n, r in results["sizes"].items()]
    results["preflight_cpu_exponent"] = exponent(points)  # what the load of a shared machine does not move
    Path(a.out).write_text(json.dumps(results, indent=1) + "\n")
    print(table(results))


def table(results: dict) -> str:
    lines = ["| records | pre-flight (read + check) | its CPU time | rerun (cached) | first step | first step, cached | "
             "peak RSS main / worker | seeds' Dataset.map |", "|---|---|---|---|---|---|---|---|"]
    for n, r in results["sizes"].items():
        c, f, fc, s = r["check"], r["first_step"], r["first_step_cached"], r.get("seed_map")
        cold = c.get("cold", {})
        seed = ("not run" if s is None else f"timed out after {s['timed_out_after_s']:.0f} s" if "timed_out_after_s" in s
                else f"{s['map_s']:.0f} s, {s['peak_rss_mib']:.0f} MiB" if "map_s" in s else "failed")
        lines.append(f"| {int(n):,} | {cold.get('preflight_s', float('nan')):.1f} s ({cold.get('read_s', 0):.1f} + "
                     f"{cold.get('check_s', 0):.1f}) | {cold.get('cpu_s', float('nan')):.0f} s | "
                     f"{c.get('cached', {}).get('preflight_s', float('nan')):.1f} s | "
                     f"{f.get('first_step_s', float('nan')):.1f} s | {fc.get('first_step_s', float('nan')):.1f} s | "
                     f"{max(c.get('peak_rss_mib', 0), f.get('peak_rss_mib', 0)):.0f} / "
                     f"{max(c.get('workers_peak_rss_mib', 0), f.get('workers_peak_rss_mib', 0)):.0f} MiB | {seed} |")
    lines.append(f"growth exponent: pre-flight {results.get('preflight_exponent')} (its CPU time "
                 f"{results.get('preflight_cpu_exponent')}), first step {results.get('first_step_exponent')}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
