"""Frozen vision tower, computed once per image (`train.cache_vision_features`) against computing it
at every step, on CPU, with a tiny Qwen2-VL whose vision tower is most of a LoRA step.

    .venv/bin/python bench/vision_cache.py            # about 2 minutes on 2 CPU cores, offline

Not a test: it prints a table and writes bench/results/vision_cache.json. Both runs are
`vlmtune.train.train(config)` on the same model and data with the same seed: a random-weight
Qwen2-VL with a wide, deep vision tower (embed 192, depth 8, 224x224 images: 256 patches, 64 image
tokens each) and a small language model (hidden 64, 2 layers), LoRA on the language model, batch 4,
`--epochs` passes over `--n` synthetic caption images. A callback timestamps every optimizer step.

  epoch 1     the cache fills: every image still goes through the vision tower once;
  epochs 2+   the cache serves every image: the vision tower does not run.

The runs alternate (uncached, cached, ...) `--repeats` times in this one process, and each figure
is a median; ratios compare runs seconds apart. Torch runs on one thread (`--threads`): on a
shared 2-core machine two threads on these small matrices mostly wait for each other.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "vision_cache.json"
MODEL = {"hidden": 64, "layers": 2, "vision_dim": 192, "vision_depth": 8, "image_size": 224}


class StepClock(TrainerCallback):
    def __init__(self):
        self.ends: list[float] = []
        self.epoch_ends: list[int] = []  # number of steps done at each epoch's end

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())

    def on_epoch_end(self, args, state, control, **kwargs):
        self.epoch_ends.append(len(self.ends))


def one_run(model: Path, data: Path, out: Path, cached: bool, epochs: int) -> dict:
    from vlmtune.config import load_config
    from vlmtune.train import train

    config = load_config(None, [
        f"model.name_or_path={model}", f"data.train={data}", f"train.output_dir={out}", "data.num_workers=0",
        "lora.r=8", "lora.alpha=16", "lora.dropout=0.0", "train.batch_size=4", "train.grad_accum=1",
        f"train.epochs={epochs}", "train.learning_rate=1e-4", "train.logging_steps=1000", "train.save_steps=100000",
        "eval.num_samples=0", f"train.cache_vision_features={str(cached).lower()}"])
    clock = StepClock()
    started = time.perf_counter()
    train(config, callbacks=[clock])
    ends, marks = clock.ends, clock.epoch_ends
    first_epoch = ends[marks[0] - 1] - clock.start
    later = ends[-1] - ends[marks[0] - 1]
    later_steps = len(ends) - marks[0]
    return {"cached": cached, "steps": len(ends), "steps_per_epoch": marks[0], "wall_s": time.perf_counter() - started,
            "first_epoch_s": first_epoch, "later_epochs_s": later,
            "first_epoch_step_s": first_epoch / marks[0], "later_epoch_step_s": later / later_steps,
            "train_s": ends[-1] - clock.start}


def vision_share(model: Path, data: Path) -> float:
    """Fraction of an uncached training step's forward+backward time spent in the vision tower, on
    one batch of 4: the vision tower alone (no grad, as it is frozen) over the whole step."""
    from vlmtune.config import load_config
    from vlmtune.data.collate import Collator, EncodedDataset
    from vlmtune.data.encode import Encoder
    from vlmtune.data.formats import load_samples
    from vlmtune.models import family_for
    from vlmtune.models.load import load_model, load_processor
    from vlmtune.tuning import prepare_model

    family = family_for(model)
    processor = load_processor(model, family)
    dataset = EncodedDataset(load_samples(str(data))[:4], Encoder(processor, family))
    batch = Collator(processor.tokenizer.pad_token_id)([dataset[i] for i in range(4)])
    config = load_config(None, ["lora.r=8", "lora.dropout=0.0"])
    net = prepare_model(load_model(model, torch.float32), family, config.train, config.lora)
    net.train()

    def timed(fn, repeats: int = 5) -> float:
        fn()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    def step():
        net.zero_grad()
        net(**batch).loss.backward()

    def vision():
        with torch.no_grad():
            net.get_image_features(batch["pixel_values"], batch["image_grid_thw"])

    return timed(vision) / timed(step)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=48, help="training images")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="runs per setting (figures are medians)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from vlmtune.data.synth import make_caption
    from vlmtune.models.tiny import build_tiny_model

    with tempfile.TemporaryDirectory(prefix="vlmtune-vision-cache-") as tmp:
        work = Path(tmp)
        model = build_tiny_model("qwen2_vl", work / "model", **MODEL)
        data, _ = make_caption(work / "data", args.n, 0, seed=0, size=MODEL["image_size"])
        share = vision_share(model, data)
        print(f"vision tower: {share:.0%} of an uncached step (forward + backward, batch 4)", flush=True)
        runs: dict[str, list[dict]] = {"uncached": [], "cached": []}
        for repeat in range(args.repeats):
            for cached in (False, True):
                name = "cached" if cached else "uncached"
                r = one_run(model, data, work / f"run_{name}_{repeat}", cached, args.epochs)
                runs[name].append(r)
                print(f"{name:9} epoch 1: {r['first_epoch_step_s'] * 1000:.0f} ms/step, later epochs: "
                      f"{r['later_epoch_step_s'] * 1000:.0f} ms/step, training {r['train_s']:.1f} s", flush=True)

    keys = ("first_epoch_step_s", "later_epoch_step_s", "train_s")
    med = {name: {k: statistics.median(r[k] for r in rs) for k in keys} for name, rs in runs.items()}
    ratios = {"later_epochs_step": med["uncached"]["later_epoch_step_s"] / med["cached"]["later_epoch_step_s"],
              "first_epoch_step": med["uncached"]["first_epoch_step_s"] / med["cached"]["first_epoch_step_s"],
              f"whole_run_{args.epochs}_epochs": med["uncached"]["train_s"] / med["cached"]["train_s"]}
    print(f"\n{'':30} {'uncached':>10} {'cached':>10} {'speed-up':>9}")
    print("-" * 62)
    for label, key, ratio in (("epoch 1, per step", "first_epoch_step_s", "first_epoch_step"),
                              (f"epochs 2-{args.epochs}, per step", "later_epoch_step_s", "later_epochs_step")):
        print(f"{label:30} {med['uncached'][key] * 1000:>7.0f} ms {med['cached'][key] * 1000:>7.0f} ms "
              f"{ratios[ratio]:>8.2f}x")
    whole = f"whole_run_{args.epochs}_epochs"
    print(f"{'training, ' + str(args.epochs) + ' epochs':30} {med['uncached']['train_s']:>8.1f} s "
          f"{med['cached']['train_s']:>8.1f} s {ratios[whole]:>8.2f}x")
    print(f"(vision tower share of an uncached step: {share:.0%}; the later-epoch bound is "
          f"1 / (1 - share) = {1 / max(1 - share, 1e-9):.2f}x)" if share < 1 else "")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "settings": {"images": args.n, "epochs": args.epochs, "batch_size": 4, "repeats": args.repeats,
                     "threads": args.threads, "model": {"family": "qwen2_vl", **MODEL}, "lora": {"r": 8}},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "vision_share_of_step": share, "medians": med, "ratios_cached_faster": ratios, "runs": runs},
        indent=2) + "\n")
    print(f"written {out}")
    return 0 if all(math.isfinite(v) for v in ratios.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
