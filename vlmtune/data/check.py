"""Pre-flight check: find every bad sample before any weights are loaded or steps are taken.

    vlmtune data check data/train.json --model Qwen/Qwen2-VL-2B-Instruct --max-length 2048

Each problem is printed as `FILE:INDEX: what is wrong`. The same check runs at the start of
`vlmtune train`; with `on_bad_sample: skip` the bad records are written to `rejected_train.jsonl` and
training goes on without them, otherwise training stops before it starts.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from vlmtune.data.images import open_image
from vlmtune.data.sample import IMAGE, Sample
from vlmtune.data.table import fork_pool, resolve_num_proc, worker_setup
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
    processes: int = 1  # how many processes checked the samples

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


def _image_problem(path: str, deep: bool, seen: dict) -> tuple[str, str] | None:
    """What is wrong with one image, or None; its (width, height) goes into `seen["sizes"]`.

    The default reads the header only (format, size): that finds missing, empty and non-image
    files, and gives the size token counting needs, without decoding a pixel. `deep` decodes every
    pixel too, which also finds truncated and corrupt image data. An image shared by many records
    is opened once per process (`seen`)."""
    if path in seen["problems"]:
        return seen["problems"][path]
    if path in seen["sizes"]:
        return None
    problem = None
    if path.startswith(("http://", "https://")):
        problem = ("image is a URL", f"image {path} is a URL; download it first (vlmtune reads local files)")
    else:
        try:
            with open_image(path) as im:
                if deep:
                    im.load()
                seen["sizes"][path] = im.size
        except FileNotFoundError:
            problem = ("missing image", f"image not found: {path}")
        except Exception as e:  # whatever a broken file makes PIL raise
            problem = ("unreadable image", f"image cannot be read: {path} ({type(e).__name__}: {e})")
    if problem is not None:
        seen["problems"][path] = problem
    return problem


def _structure_problems(sample: Sample, deep: bool = False, seen: dict | None = None) -> list[tuple[str, str]]:
    seen = {"sizes": {}, "problems": {}} if seen is None else seen
    problems = [p for p in (_image_problem(path, deep, seen) for path in sample.images) if p is not None]
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


def sample_problems(sample: Sample, encoder=None, max_length: int | None = None, deep: bool = False,
                    seen: dict | None = None) -> list[tuple[str, str]]:
    """(kind, message) of every problem of one sample, as `check_samples` finds them; for records
    checked one at a time as they arrive (a streamed dataset)."""
    seen = {"sizes": {}, "problems": {}} if seen is None else seen
    problems = _structure_problems(sample, deep, seen)
    if problems or encoder is None:
        return problems
    n = encoder.count_tokens_batch([sample], seen["sizes"])[0]
    if isinstance(n, DataError):
        return [("cannot encode", str(n).split(": ", 1)[-1])]
    if max_length and n > max_length:
        return [("too long", f"{n} tokens (images included) > max_length {max_length}")]
    return []


_JOB: dict = {}  # what the forked check workers inherit: the samples, the encoder, the settings
MIN_PER_PROCESS = 256  # below this many samples per process, starting processes costs more than it saves


def _check_range(task: tuple[int, int]) -> tuple[list[tuple], list[int]]:
    """Samples `start` to `stop`: their problems as (index, source, kind, message) and the token
    lengths of those that are sound and encode, in order. Runs in a worker or in this process."""
    start, stop = task
    job = _JOB
    samples, encoder, max_length = job["samples"], job["encoder"], job["max_length"]
    seen = job.setdefault("seen", {"sizes": {}, "problems": {}})  # per process
    chunk = samples.chunk(start, stop) if hasattr(samples, "chunk") else samples[start:stop]
    problems: list[tuple] = []
    sound: list[tuple[int, Sample]] = []
    for i, sample in enumerate(chunk, start=start):
        structural = _structure_problems(sample, job["deep"], seen)
        problems += [(i, sample.source, kind, message) for kind, message in structural]
        if encoder is not None and not structural:
            sound.append((i, sample))
    lengths: list[int] = []
    if sound:
        counts = encoder.count_tokens_batch([s for _, s in sound], seen["sizes"])
        for (i, sample), n in zip(sound, counts):
            if isinstance(n, DataError):
                problems.append((i, sample.source, "cannot encode", str(n).split(": ", 1)[-1]))
                continue
            lengths.append(n)
            if max_length and n > max_length:
                problems.append((i, sample.source, "too long", f"{n} tokens (images included) > max_length {max_length}"))
    problems.sort(key=lambda p: p[0])  # stable: a sample's own problems keep their order
    return problems, lengths


def check_samples(samples: Sequence[Sample], encoder=None, max_length: int | None = None,
                  progress: bool = True, *, num_proc: int | None = None, deep: bool = False) -> CheckReport:
    """Every problem of every sample; token lengths too when an `encoder` is given.

    The samples are checked in chunks by `num_proc` processes (None: every core; 1: this process
    only), forked so that they share the samples and the encoder instead of copying them; the report
    is the same whatever the number. Tokens are counted a chunk at a time (`Encoder.count_tokens_batch`),
    with image sizes from the headers read by the check itself.

    Args:
        samples: a list of samples or a `SampleTable`.
        encoder: measures token lengths (images included); None checks structure only.
        max_length: flag samples longer than this (needs `encoder`).
        deep: decode every image fully, which also finds truncated or corrupt image data.
    """
    n = len(samples)
    procs = min(resolve_num_proc(num_proc), max(1, n // MIN_PER_PROCESS))
    size = max(64, min(1000, -(-n // (procs * 8)))) if procs > 1 else 500
    tasks = [(start, min(start + size, n)) for start in range(0, n, size)]
    report = CheckReport(n_samples=n, processes=procs)
    _JOB.clear()
    _JOB.update(samples=samples, encoder=encoder, max_length=max_length, deep=deep)
    pool = fork_pool(procs, worker_setup) if procs > 1 else None
    report.processes = procs if pool is not None else 1
    try:
        results = pool.imap(_check_range, tasks) if pool is not None else map(_check_range, tasks)
        with tqdm(total=n, desc="checking", unit="sample", disable=not progress or n < 200) as bar:
            for (start, stop), (problems, lengths) in zip(tasks, results):
                report.problems += [Problem(*p) for p in problems]
                report.token_lengths += lengths
                bar.update(stop - start)
    finally:
        _JOB.clear()
        if pool is not None:
            pool.terminate()
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
    if hasattr(samples, "select"):  # a SampleTable: a view of the good rows, nothing copied
        kept = samples.select([i for i in range(len(samples)) if i not in bad])
    else:
        kept = [s for i, s in enumerate(samples) if i not in bad]
    if not kept:
        raise DataError(f"every sample was rejected; see {rejected_path}")
    return kept
