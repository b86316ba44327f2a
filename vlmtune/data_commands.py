"""`vlmtune data check` and `vlmtune data stats`: the data layer's checks and statistics, with
token lengths measured by a model's own processor when one is given (`vlmtune.parts`).
"""

from __future__ import annotations

from pathlib import Path

from vlmtune.data.check import check_samples, write_rejected
from vlmtune.data.formats import load_samples, read_dataset
from vlmtune.data.stats import compute_stats, format_stats, plot_tokens
from vlmtune.errors import VlmtuneError


def _encoder(model: str, prompt: str | None, image_size: list[int] | None, max_pixels: int | None,
             max_slice_nums: int | None, trust_remote_code: bool):
    """The encoder a run of `model` with these data settings would train with."""
    from vlmtune.config import load_config
    from vlmtune.parts import run_parts

    config = load_config(None, [f"model.name_or_path={model}"])
    config.model.trust_remote_code = trust_remote_code
    d = config.data
    d.prompt, d.image_size, d.max_pixels, d.max_slice_nums = prompt, image_size, max_pixels, max_slice_nums
    return run_parts(config).encoder


def check_command(data: str, model: str | None = None, max_length: int | None = None, prompt: str | None = None,
                  format: str | None = None, image_size: list[int] | None = None,
                  max_pixels: int | None = None, max_slice_nums: int | None = None, rejected: str | None = None,
                  trust_remote_code: bool = False, deep: bool = False, num_proc: int | None = None) -> int:
    """Pre-flight check of a dataset; exits 1 when a sample has a problem.

    Args:
        data: Dataset file (JSON, JSONL or CSV in any supported format).
        model: Model folder or hub id; with it, token lengths are measured with the model's own processor.
        max_length: Flag samples longer than this many tokens (images included); needs --model.
        prompt: Text appended to user turns that hold only images (as data.prompt in a config).
        format: Force the input format (minicpm, qwen, messages, llava, csv) instead of detecting it.
        image_size: Fixed resize WIDTH HEIGHT applied to every image before counting tokens.
        max_pixels: Per-image pixel budget (Qwen families).
        max_slice_nums: Most slices per image (MiniCPM-V 2.x), as data.max_slice_nums in a config.
        rejected: Also write the bad records to this JSONL file.
        trust_remote_code: Run the Python files of the model folder (read them first) when its processor needs them.
        deep: Decode every image in full (finds truncated or corrupt pixel data); by default sizes are read from
            the file headers, which finds missing, unreadable and non-image files.
        num_proc: Processes to check with (default: every core).
    """
    samples = load_samples(data, format)
    encoder = None
    if model is not None:
        encoder = _encoder(model, prompt, image_size, max_pixels, max_slice_nums, trust_remote_code)
    elif max_length is not None:
        raise VlmtuneError("--max-length needs --model: token lengths are measured with the model's processor")
    report = check_samples(samples, encoder, max_length, num_proc=num_proc, deep=deep)
    if report.problems:
        print(report.listing())
    print(report.summary())
    if rejected and report.problems:
        print(f"bad records written to {write_rejected(samples, report, Path(rejected))}")
    return 1 if report.problems else 0


def stats_command(data: str, model: str | None = None, max_length: int | None = None, plot: str | None = None,
                  prompt: str | None = None, format: str | None = None, max_pixels: int | None = None,
                  max_slice_nums: int | None = None, trust_remote_code: bool = False) -> int:
    """Sample, turn, image and text-length statistics; token lengths and a histogram with --model.

    Args:
        data: Dataset file (JSON, JSONL or CSV in any supported format).
        model: Model folder or hub id; with it, token lengths per sample are measured with the
            model's own processor (chat template and image tokens included).
        max_length: Say how many samples are longer than this many tokens; needs --model.
        plot: Where to write the token-length histogram (PNG); default DATA_STEM.tokens.png beside
            the data. Needs --model.
        prompt: Text appended to user turns that hold only images (as data.prompt in a config).
        format: Force the input format (minicpm, qwen, messages, llava, csv) instead of detecting it.
        max_pixels: Per-image pixel budget (Qwen families), as in the training config.
        max_slice_nums: Most slices per image (MiniCPM-V 2.x), as data.max_slice_nums in the training config.
        trust_remote_code: Run the Python files of the model folder (read them first) when its processor needs them.
    """
    if model is None and (max_length is not None or plot is not None):
        raise VlmtuneError("--max-length and --plot need --model: token lengths are measured with the model's processor")
    samples, fmt = read_dataset(data, format)
    encoder = None
    if model is not None:
        encoder = _encoder(model, prompt, None, max_pixels, max_slice_nums, trust_remote_code)
    stats = compute_stats(samples, encoder)
    print(f"{data}: {stats.n_samples} samples ({fmt})")
    print(format_stats(stats, max_length, model))
    if stats.tokens:
        data_path = Path(data)
        target = Path(plot) if plot is not None else data_path.with_name(f"{data_path.stem}.tokens.png")
        plot_tokens(stats.tokens, target, max_length, title=f"{data_path.name}: {len(stats.tokens)} samples")
        print(f"histogram:      {target}")
    return 0
