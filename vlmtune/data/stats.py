"""`vlmtune data stats`: what a dataset holds, and how long its samples are in tokens.

    vlmtune data stats data/latex_ocr/train.json
    vlmtune data stats data/latex_ocr/train.json --model Qwen/Qwen2-VL-2B-Instruct --max-length 2048

Counts samples, turns and images, image sizes (each distinct file once, read from its header)
and text lengths in characters. With --model, each sample's length in tokens as training sees it
(chat template and image tokens included, measured with the model's own processor), as
percentiles and a histogram PNG, and how many samples --max-length would reject: the number to
look at before choosing `data.max_length` or an image pixel budget.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from vlmtune.data.sample import IMAGE, Sample
from vlmtune.errors import DataError

PERCENTILES = (50, 90, 95, 99)


@dataclass
class DataStats:
    n_samples: int
    turns: list[int] = field(default_factory=list)  # per sample
    roles: Counter = field(default_factory=Counter)  # turns by role, over all samples
    images: list[int] = field(default_factory=list)  # per sample
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)  # distinct readable file -> (width, height)
    unreadable: list[str] = field(default_factory=list)  # "FILE:INDEX: path (why)"
    answer_chars: list[int] = field(default_factory=list)  # last assistant turn, per sample
    text_chars: list[int] = field(default_factory=list)  # all turns, placeholders excluded, per sample
    tokens: list[int] = field(default_factory=list)  # per measured sample, images included
    not_measured: list[str] = field(default_factory=list)  # "FILE:INDEX: why" for samples without a token count

    def token_percentiles(self) -> dict[str, float]:
        """min, p50, p90, p95, p99 and max of the token lengths (numpy's linear interpolation)."""
        if not self.tokens:
            return {}
        values = np.percentile(self.tokens, PERCENTILES)
        out = {"min": float(min(self.tokens))}
        out.update({f"p{p}": float(v) for p, v in zip(PERCENTILES, values)})
        out["max"] = float(max(self.tokens))
        return out

    def rejected(self, max_length: int) -> int:
        """How many measured samples are longer than `max_length` tokens."""
        return sum(n > max_length for n in self.tokens)


def _number(x: float) -> str:
    return f"{x:.1f}".removesuffix(".0")


def _spread(values: list[int]) -> str:
    if not values:
        return "none"
    return f"min {_number(min(values))}, median {_number(float(np.median(values)))}, max {_number(max(values))}"


def compute_stats(samples: list[Sample], encoder=None, progress: bool = True) -> DataStats:
    """Counts and lengths of `samples`; token lengths too when an `Encoder` is given.

    A sample with a missing or unreadable image is counted but not measured in tokens.
    """
    stats = DataStats(n_samples=len(samples))
    bad_files: dict[str, str] = {}
    for sample in tqdm(samples, desc="stats", unit="sample", disable=not progress or len(samples) < 200):
        stats.turns.append(len(sample.turns))
        stats.roles.update(t.role for t in sample.turns)
        stats.images.append(len(sample.images))
        stats.answer_chars.append(len(sample.answer()))
        stats.text_chars.append(sum(len(t.text.replace(IMAGE, "")) for t in sample.turns))
        broken = []
        for path in sample.images:
            if path not in stats.sizes and path not in bad_files:
                try:
                    with Image.open(path) as im:  # the header only: no pixels decoded
                        stats.sizes[path] = im.size
                except Exception as e:
                    bad_files[path] = f"{type(e).__name__}: {e}"
            if path in bad_files:
                broken.append(path)
                stats.unreadable.append(f"{sample.source}: {path} ({bad_files[path]})")
        if encoder is None:
            continue
        if broken:
            stats.not_measured.append(f"{sample.source}: image missing or unreadable")
            continue
        try:
            stats.tokens.append(encoder.count_tokens(sample))
        except DataError as e:
            stats.not_measured.append(str(e))
    return stats


def format_stats(stats: DataStats, max_length: int | None = None, model: str | None = None) -> str:
    """The report `vlmtune data stats` prints."""
    roles = ", ".join(f"{role} {n}" for role, n in sorted(stats.roles.items()))
    widths = [w for w, _ in stats.sizes.values()]
    heights = [h for _, h in stats.sizes.values()]
    lines = [
        f"turns:          {sum(stats.turns)} ({roles or 'none'}); per sample {_spread(stats.turns)}",
        f"images:         {sum(stats.images)} in samples, {len(stats.sizes)} distinct files; "
        f"per sample {_spread(stats.images)}",
        f"image width:    {_spread(widths)} (pixels, each distinct file once)",
        f"image height:   {_spread(heights)}",
        f"answer length:  {_spread(stats.answer_chars)} (characters, last assistant turn)",
        f"text length:    {_spread(stats.text_chars)} (characters, all turns, image placeholders excluded)",
    ]
    if stats.unreadable:
        lines.append(f"unreadable:     {len(stats.unreadable)} image reference(s) missing or unreadable, first: "
                     f"{stats.unreadable[0]} — `vlmtune data check` lists them all")
    q = stats.token_percentiles()
    if q:
        mean = _number(float(np.mean(stats.tokens)))
        lines.append(f"tokens:         {', '.join(f'{k} {_number(v)}' for k, v in q.items())}, mean {mean} "
                     f"(per sample, images included{', ' + model if model else ''})")
    if stats.not_measured:
        lines.append(f"not measured:   {len(stats.not_measured)} sample(s), first: {stats.not_measured[0]}")
    if max_length is not None and (stats.tokens or stats.not_measured):
        n, total = stats.rejected(max_length), len(stats.tokens)
        share = f" ({100 * n / total:.1f}%)" if total else ""
        lines.append(f"max_length {max_length}: would reject {n} of {total} measured samples{share}")
    return "\n".join(lines)


def plot_tokens(tokens: list[int], path: str | Path, max_length: int | None = None, title: str = "") -> Path:
    """A histogram of token lengths as a PNG, with `max_length` drawn as a line."""
    # The object API draws without pyplot, so no GUI backend or global figure state is involved.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.hist(tokens, bins=min(50, max(1, len(set(tokens)))), color="#4c72b0")
    if max_length is not None:
        ax.axvline(max_length, color="#c44e52", linestyle="--", label=f"max_length {max_length}")
        ax.legend()
    ax.set_xlabel("tokens per sample (images included)")
    ax.set_ylabel("samples")
    ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
