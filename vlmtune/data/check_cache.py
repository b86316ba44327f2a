"""Pre-flight results kept on disk, so that a rerun or a resume of the same data does not pay again.

    from vlmtune.data.check_cache import cached_check
    report = cached_check(table, encoder, max_length=2048, cache_root="runs/x/data_cache")

An entry, `CACHE/check/<key>.npz`, holds a `CheckReport`: every problem (index, source, kind,
message) and the token lengths. `key` hashes:

- the records (`SampleTable.key`: the dataset file's bytes, or the shards', and which rows);
- the encoder: processor settings, tokenizer, chat template, prompts, image size (the fingerprint
  of `encode_cache.py`, which also covers library versions);
- max_length, the deep flag and CHECK_VERSION.

Image files are not in the key (hashing 200,000 images would cost what the check costs); instead
the entry records the size and modification time of every image file the records name, and an
entry whose images changed since is computed again. Embedded images are in the records' bytes.
Entries are written to a temporary file and renamed into place: readers see all of one or none.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np

from vlmtune.data.check import CheckReport, Problem, check_samples
from vlmtune.data.encode_cache import encoder_description
from vlmtune.fileio import atomic_write_bytes

CHECK_VERSION = 2  # bump when check_samples reports other problems or lengths for the same input


def check_key(samples, encoder, max_length: int | None, deep: bool) -> str:
    described = encoder_description(encoder) if encoder is not None else None
    settings = json.dumps([CHECK_VERSION, samples.key, described, max_length, deep], sort_keys=True)
    return hashlib.sha256(settings.encode()).hexdigest()[:40]


def image_files_state(samples) -> str:
    """A hash of (path, size, modification time) of every image file the samples name."""
    h = hashlib.sha256()
    for path in samples.file_images():
        try:
            st = os.stat(path)
            h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{path}\0missing\n".encode())
    return h.hexdigest()


def _save(path: Path, report: CheckReport, images: str) -> None:
    problems = [[p.index, p.source, p.kind, p.message] for p in report.problems]
    buffer = io.BytesIO()
    np.savez(buffer, n_samples=np.int64(report.n_samples), lengths=np.asarray(report.token_lengths, dtype=np.int64),
             problems=np.frombuffer(json.dumps(problems, ensure_ascii=False).encode(), dtype=np.uint8),
             images=np.frombuffer(images.encode(), dtype=np.uint8))
    atomic_write_bytes(path, buffer.getvalue())


def _load(path: Path, images: str) -> CheckReport | None:
    try:
        with np.load(path, allow_pickle=False) as data:
            if data["images"].tobytes().decode() != images:
                return None
            problems = json.loads(data["problems"].tobytes().decode())
            return CheckReport(n_samples=int(data["n_samples"]), problems=[Problem(*p) for p in problems],
                               token_lengths=data["lengths"].tolist())
    except (OSError, ValueError, KeyError):  # absent, or a damaged entry: computed again
        return None


def cached_check(samples, encoder=None, max_length: int | None = None, cache_root: str | Path | None = None, *,
                 deep: bool = False, num_proc: int | None = None, progress: bool = True,
                 log=print) -> CheckReport:
    """`check_samples`, or its stored result for the same records, encoder and settings.

    Without `cache_root`, or for samples that are not a `SampleTable` (no content key), it only checks.
    """
    if cache_root is None or not hasattr(samples, "key"):
        return check_samples(samples, encoder, max_length, progress, num_proc=num_proc, deep=deep)
    path = Path(cache_root) / "check" / f"{check_key(samples, encoder, max_length, deep)}.npz"
    images = image_files_state(samples)
    report = _load(path, images)
    if report is not None and report.n_samples == len(samples):
        log(f"pre-flight check of {len(samples)} samples: results reused from {path}")
        return report
    report = check_samples(samples, encoder, max_length, progress, num_proc=num_proc, deep=deep)
    try:
        _save(path, report, images)
    except OSError as e:  # the cache only saves time
        log(f"warning: cannot store the pre-flight results in {path} ({e}); the next run checks again")
    return report
