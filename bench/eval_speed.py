"""Batched `vlmtune eval` generation against the seeds' per-sample `predict()` loop.

    .venv/bin/python bench/eval_speed.py        # about 2-3 minutes on 2 CPU cores, offline

Not a test: it prints a table and writes bench/results/eval_speed.json. Both sides run the same
model on the same 64 synthetic validation samples, greedy:

  batched     `evaluate.generate` (what `vlmtune eval` runs): prompts from the run's Encoder,
              16 per batch, padded on the left, max_new_tokens derived from the references.
  per-sample  seed 002's `predict()`: one `processor(text=[...], images=...)` call and one
              `model.generate` per sample, with the same max_new_tokens (a fair comparison)...
  ... 8192    ...and with the seeds' own max_new_tokens=8192, which costs nothing extra only
              because this model stops at its end-of-turn token (checked first: a sample that
              does not would run to the model's position limit).

The model is a tiny Qwen2-VL (hidden 128) trained for 100 steps on `vlmtune data synth caption`
data, so that it answers like a fine-tuned model ("a red circle") and stops. Each method is
warmed up once, then the three run in turn, 3 times; the table shows the median.

Torch runs on one CPU thread unless `--threads N` says otherwise: on a small machine shared with
other jobs, multi-threaded kernels wait for descheduled threads and the same run swings 5-15x
from one try to the next (measured: batched 16 took 0.45 s on 1 thread, 3.8-7.5 s on 2).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from PIL import Image

from vlmtune.config import load_config
from vlmtune.data.formats import load_samples
from vlmtune.data.sample import IMAGE
from vlmtune.data.synth import make_caption
from vlmtune.generation import derive_max_new_tokens, generate, load_target, make_encoder, resolve_target
from vlmtune.models.tiny import build_tiny_model
from vlmtune.train import train

N_SAMPLES = 64
BATCH_SIZE = 16
REPEATS = 3
TRAIN_STEPS = 100
SEEDS_MAX_NEW_TOKENS = 8192
RESULTS = Path(__file__).parent / "results" / "eval_speed.json"


def seeds_messages(sample) -> list[dict]:
    """Seed 002's message shape: one user turn, the image then the text. The text is the sample's
    own ("\\nCOCO Yes:", as trained), so both sides give the model the very same tokens."""
    text = sample.turns[0].text
    assert text.startswith(IMAGE) and len(sample.images) == 1
    return [{"role": "user", "content": [{"type": "image", "image": sample.images[0]},
                                         {"type": "text", "text": text[len(IMAGE):]}]}]


@torch.no_grad()
def seeds_predict(messages: list[dict], model, processor, max_new_tokens: int) -> tuple[str, bool]:
    """Seed 002's `predict()`, line for line; `qwen_vl_utils.process_vision_info` is replaced by
    opening the image (it would only round 112x112 to a multiple of 28, which it already is).
    Also returns whether generation stopped on its own (before max_new_tokens)."""
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    image_inputs = [Image.open(part["image"]).convert("RGB") for part in messages[0]["content"] if part["type"] == "image"]
    inputs = processor(text=[text], images=image_inputs, videos=None, padding=True, return_tensors="pt")
    inputs = inputs.to(model.device)
    generated_ids = model.generate(**inputs, max_new_tokens=max_new_tokens)
    generated_ids_trimmed = [out_ids[len(in_ids):] for in_ids, out_ids in zip(inputs.input_ids, generated_ids)]
    output_text = processor.batch_decode(generated_ids_trimmed, skip_special_tokens=True,
                                         clean_up_tokenization_spaces=False)
    return output_text[0], len(generated_ids_trimmed[0]) < max_new_tokens


def build(root: Path) -> tuple[Path, Path]:
    """The tiny model trained on synthetic captions (a run folder), and the validation file."""
    tiny = build_tiny_model("qwen2_vl", root / "tiny", hidden=128, vision_dim=64)
    train_file, val_file = make_caption(root / "data", n=400, val=N_SAMPLES, seed=0)
    run = train(load_config(None, [
        f"model.name_or_path={tiny}", f"data.train={train_file}", "train.method=full", "train.freeze_vision=false",
        "train.freeze_projector=false", "train.learning_rate=0.002", "train.lr_scheduler=cosine",
        "train.warmup_ratio=0.05", f"train.max_steps={TRAIN_STEPS}", "train.batch_size=4", "train.grad_accum=1",
        "eval.num_samples=0", "train.save_steps=100000", "train.logging_steps=50", f"train.output_dir={root / 'run'}"]))
    return run, val_file


def main() -> int:
    parser = argparse.ArgumentParser(description="Batched vlmtune eval vs the seeds' per-sample loop.")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1, see above)")
    torch.set_num_threads(parser.parse_args().threads)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vlmtune-bench-") as tmp:
        run, val_file = build(Path(tmp))
        trained_s = time.perf_counter() - started
        target = resolve_target(str(run), None, None)
        model, processor, family = load_target(target)
        encoder = make_encoder(target.config, processor, family)
        samples = load_samples(val_file)[:N_SAMPLES]
        messages = [seeds_messages(s) for s in samples]
        max_new_tokens = derive_max_new_tokens(encoder.tokenizer, samples)

        def batched(subset=samples):
            return generate(model, encoder, subset, BATCH_SIZE, max_new_tokens, progress=False)

        def per_sample(tokens: int):
            def loop(subset=messages):
                return [seeds_predict(m, model, processor, tokens) for m in subset]
            return loop

        methods = {"batched": batched, "per-sample": per_sample(max_new_tokens)}
        batched(samples[:BATCH_SIZE])  # warm-up
        # A first pass of the loop warms it up too, and tells whether the 8192 row is affordable:
        # only if every answer stops on its own, as the seeds assume.
        stops = sum(stopped for _, stopped in methods["per-sample"]())
        if stops == len(samples):
            methods["per-sample 8192"] = per_sample(SEEDS_MAX_NEW_TOKENS)
        else:
            print(f"skipping the max_new_tokens={SEEDS_MAX_NEW_TOKENS} row: {len(samples) - stops} answers did not "
                  "stop before the derived limit, so they would run to the position limit", file=sys.stderr)

        times: dict[str, list[float]] = {name: [] for name in methods}
        outputs: dict[str, list[str]] = {}
        for _ in range(REPEATS):  # round-robin, so that load from other processes hits all methods alike
            for name, method in methods.items():
                t0 = time.perf_counter()
                out = method()
                times[name].append(time.perf_counter() - t0)
                outputs[name] = out if name == "batched" else [text.strip() for text, _ in out]

    references = [s.answer() for s in samples]
    rows = []
    base = statistics.median(times["batched"])
    for name, ts in times.items():
        median = statistics.median(ts)
        preds = outputs[name]
        rows.append({
            "method": name,
            "max_new_tokens": SEEDS_MAX_NEW_TOKENS if name.endswith("8192") else max_new_tokens,
            "batch_size": BATCH_SIZE if name == "batched" else 1,
            "seconds": [round(t, 3) for t in ts], "median_s": round(median, 3),
            "samples_per_s": round(len(samples) / median, 2),
            "speedup_of_batched": round(median / base, 2),
            "agreement_with_batched": sum(a == b for a, b in zip(preds, outputs["batched"])) / len(samples),
            "exact_match": sum(p == r for p, r in zip(preds, references)) / len(samples),
        })

    header = f"{'method':<18}{'max_new':>8}{'batch':>6}{'median s':>10}{'samples/s':>11}{'batched x':>11}{'agree':>8}{'EM':>7}"
    print("\n" + header)
    for r in rows:
        print(f"{r['method']:<18}{r['max_new_tokens']:>8}{r['batch_size']:>6}{r['median_s']:>10.2f}"
              f"{r['samples_per_s']:>11.2f}{r['speedup_of_batched']:>10.2f}x{r['agreement_with_batched']:>8.0%}"
              f"{r['exact_match']:>7.0%}")
    print(f"({len(samples)} samples, median of {REPEATS}; 'batched x' = how many times faster batched is; "
          f"'agree' = same prediction as batched; EM = exact match with the reference)")

    result = {
        "benchmark": "batched vlmtune eval generation vs the seeds' per-sample predict() loop",
        "model": {"family": "qwen2_vl", "hidden": 128, "layers": 2, "vision_dim": 64, "train_steps": TRAIN_STEPS,
                  "method": "full"},
        "data": {"kind": "synth caption", "samples": len(samples)},
        "decoding": "greedy",
        "repeats": REPEATS,
        "rows": rows,
        "ratio_batched_vs_per_sample": rows[1]["speedup_of_batched"],
        "environment": {"device": str(model.device), "torch_threads": torch.get_num_threads(),
                        "torch": torch.__version__, "transformers": transformers.__version__,
                        "python": platform.python_version(), "machine": platform.machine()},
        "setup_s": round(trained_s, 1),
        "total_s": round(time.perf_counter() - started, 1),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS} (total {result['total_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
