"""Pre-flight check: find every bad sample before any weights are loaded or steps are taken.

    vlmtune data check data/train.json --model Qwen/Qwen2-VL-2B-Instruct --max-length 2048

Each problem is printed as `FILE:INDEX: what is wrong`. The same check runs at the start of
`vlmtune train`; with `on_bad_sample: skip` the bad records are written to `rejected_train.jsonl` and
training goes on without them, otherwise training stops before it starts.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from vlmtune.data.sample import IMAGE, Sample
from vlmtune.errors import DataError
from vlmtune.fileio import atomic_write_text

MAX_LISTED = 20


@dataclass
class Problem:
    index: int  # position in the sample list
    source: str  # FILE:INDEX
    kind: str  # short category, for the summary
    message: str

    def __str__(self) -> str:
        return f"{self.source}: {self.message}"


@dataclass
class CheckReport:
    n_samples: int
    problems: list[Problem] = field(default_factory=list)
    token_lengths: list[int] = field(default_factory=list)

    @property
    def bad_indices(self) -> set[int]:
        return {p.index for p in self.problems}

    def summary(self) -> str:
        bad = len(self.bad_indices)
        lines = [f"{self.n_samples} samples, {self.n_samples - bad} ok, {bad} with problems"]
        for kind, count in Counter(p.kind for p in self.problems).most_common():
            lines.append(f"  {count:6d} x {kind}")
        if self.token_lengths:
            q = np.percentile(self.token_lengths, [50, 90, 99, 100]).astype(int)
            lines.append(f"tokens per sample (images included): p50 {q[0]}, p90 {q[1]}, p99 {q[2]}, max {q[3]}")
        return "\n".join(lines)

    def listing(self, limit: int = MAX_LISTED) -> str:
        lines = [str(p) for p in self.problems[:limit]]
        if len(self.problems) > limit:
            lines.append(f"... and {len(self.problems) - limit} more")
        return "\n".join(lines)


def _structure_problems(sample: Sample) -> list[tuple[str, str]]:
    problems = []
    for path in sample.images:
        if path.startswith(("http://", "https://")):
            problems.append(("image is a URL", f"image {path} is a URL; download it first (vlmtune reads local files)"))
            continue
        try:
            with Image.open(path) as im:
                im.verify()  # header and structure, without decoding every pixel
        except FileNotFoundError:
            problems.append(("missing image", f"image not found: {path}"))
        except Exception as e:
            problems.append(("unreadable image", f"image cannot be read: {path} ({type(e).__name__}: {e})"))
    placeholders = sample.placeholder_count
    if placeholders != len(sample.images):
        problems.append(("placeholder count != image count",
                         f"{placeholders} image placeholder(s) in the text but {len(sample.images)} image(s)"))
    turns = sample.turns
    roles = [t.role for t in turns]
    body = roles[1:] if roles[:1] == ["system"] else roles
    expected = ["user", "assistant"] * (len(body) // 2 + 1)
    if not body or body != expected[: len(body)] or body[-1] != "assistant":
        problems.append(("bad role order", f"roles {'/'.join(roles) or '(none)'}: expected an optional system turn, "
                                           "then user/assistant alternating, ending with assistant"))
    for i, turn in enumerate(turns):
        if not turn.text.replace(IMAGE, "").strip() and IMAGE not in turn.text:
            problems.append(("empty turn", f"turn {i} ({turn.role}) is empty"))
    return problems


def check_samples(samples: list[Sample], encoder=None, max_length: int | None = None,
                  progress: bool = True) -> CheckReport:
    """Every problem of every sample; token lengths too when an `encoder` is given."""
    report = CheckReport(n_samples=len(samples))
    for i, sample in enumerate(tqdm(samples, desc="checking", disable=not progress or len(samples) < 200, unit="sample")):
        structural = _structure_problems(sample)
        for kind, message in structural:
            report.problems.append(Problem(i, sample.source, kind, message))
        if encoder is None or structural:
            continue
        try:
            n = encoder.count_tokens(sample)
        except DataError as e:
            report.problems.append(Problem(i, sample.source, "cannot encode", str(e).split(": ", 1)[-1]))
            continue
        report.token_lengths.append(n)
        if max_length and n > max_length:
            report.problems.append(Problem(i, sample.source, "too long",
                                           f"{n} tokens (images included) > max_length {max_length}"))
    return report


def write_rejected(samples: list[Sample], report: CheckReport, path: Path) -> Path:
    """The bad samples with their problems, one JSON line each."""
    reasons: dict[int, list[str]] = {}
    for p in report.problems:
        reasons.setdefault(p.index, []).append(p.message)
    lines = []
    for i in sorted(reasons):
        s = samples[i]
        lines.append(json.dumps({"source": s.source, "id": s.id, "problems": reasons[i], "images": s.images,
                                 "turns": [{"role": t.role, "text": t.text} for t in s.turns]}, ensure_ascii=False) + "\n")
    # under torchrun every rank runs the check and writes this same file: each through its own temporary name
    return atomic_write_text(path, "".join(lines))


def apply_policy(samples: list[Sample], report: CheckReport, policy: str, rejected_path: Path) -> list[Sample]:
    """The samples to train on: all of them, or the good ones under `skip`.

    Raises:
        DataError: problems were found and the policy is `error`.
    """
    if not report.problems:
        return samples
    if policy == "error":
        raise DataError(f"pre-flight check failed:\n{report.listing()}\n{report.summary()}\n"
                        "Fix these records, or set data.on_bad_sample=skip to train without them.")
    write_rejected(samples, report, rejected_path)
    bad = report.bad_indices
    print(f"skipping {len(bad)} bad sample(s) of {len(samples)}; they are listed in {rejected_path}")
    kept = [s for i, s in enumerate(samples) if i not in bad]
    if not kept:
        raise DataError(f"every sample was rejected; see {rejected_path}")
    return kept
