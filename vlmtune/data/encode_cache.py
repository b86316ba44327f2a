"""On-disk cache of encoded samples: later epochs and later runs read tensors instead of decoding,
resizing and tokenizing again.

    vlmtune train CONFIG data.cache_dir=cache/encoded

Layout: `CACHE_DIR/<encoder fingerprint>/<2 hex>/<sample key>.safetensors`, one file per sample
and mode (training inputs or generation prompt), holding exactly what `Encoder.encode` returns.

- The fingerprint hashes everything about the encoder: the processor as loaded (image processor
  settings, pixel budget overrides included; the whole tokenizer; the chat templates), the encoder
  settings (prompt, system prompt, image size, max_length, family) and the versions of the code
  that turns them into tensors (this file's CACHE_VERSION, transformers, tokenizers, Pillow,
  torch, torchvision). `fingerprint.json` beside the entries says what it was computed from.
- The sample key hashes the fingerprint, the turns (roles and text) and the bytes of every image
  file. So a changed processor, prompt, turn or image file misses; it never returns stale tensors.
- Entries are written to a temporary file in the same folder and renamed into place, so a reader
  sees a whole file or none, and any number of DataLoader workers and DDP ranks may write the same
  entry at once (they write the same bytes; the last rename wins).
- Each entry carries a checksum of its tensors: a partial or corrupted file is reported with a
  warning, encoded again and rewritten.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from importlib import metadata
from pathlib import Path

import torch

from vlmtune.data.images import image_digest
from vlmtune.data.sample import Sample
from vlmtune.errors import VlmtuneError
from vlmtune.fileio import atomic_write_bytes, dump_tensors, parse_tensors

# Bump when `Encoder` produces different tensors for the same inputs and settings.
CACHE_VERSION = 2
_LIBRARIES = ("transformers", "tokenizers", "pillow", "torch", "torchvision")


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "none"


def _tokenizer_state(tokenizer) -> str:
    """Everything a tokenizer does to text: the whole `tokenizer.json` of a fast tokenizer (model,
    normalizer, pre-tokenizer, added tokens), its special tokens and chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return json.dumps({"class": type(tokenizer).__name__, "backend": body,
                       "special": repr(tokenizer.special_tokens_map),
                       "chat_template": getattr(tokenizer, "chat_template", None)}, sort_keys=True)


def encoder_description(encoder) -> dict:
    """What the fingerprint of `encoder` is computed from, as JSON-able values."""
    processor = encoder.processor
    settings = {f.name: repr(getattr(encoder, f.name)) for f in dataclasses.fields(encoder) if f.name != "processor"}
    to_json = getattr(processor, "to_json_string", None)
    return {
        "cache_version": CACHE_VERSION,
        "libraries": {name: _version(name) for name in _LIBRARIES},
        "settings": settings,
        "processor_class": type(processor).__name__,
        "processor": to_json() if to_json else repr(processor),
        "image_token": getattr(processor, "image_token", None),
        "chat_template": getattr(processor, "chat_template", None),
        "tokenizer": _tokenizer_state(processor.tokenizer),
    }


# Keys use SHA-256: a collision would serve another sample's tensors (CPUs hash it in hardware).
def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))  # length-prefixed: no two part lists hash alike by concatenation
        h.update(part)
    return h.hexdigest()[:40]


def file_digest(path: str) -> bytes:
    """sha256 of an image file's bytes (or of an image embedded in a shard)."""
    return image_digest(path)


class EncodeCache:
    """Encoded samples of one encoder under `root`; `encode(sample)` reads or fills the cache.

    Each process (DataLoader worker, DDP rank) holds its own copy after pickling; they share only
    the files. `hits`, `misses` and `corrupt` count this copy's lookups.
    """

    def __init__(self, root: str | Path, encoder):
        self.encoder = encoder
        description = encoder_description(encoder)
        self.fingerprint = _digest(json.dumps(description, sort_keys=True).encode())
        self.folder = Path(root) / self.fingerprint[:20]
        self.hits = self.misses = self.corrupt = 0
        self._write_failed = False
        about = self.folder / "fingerprint.json"
        if not about.is_file():
            try:
                atomic_write_bytes(about, json.dumps(description, indent=1, sort_keys=True).encode())
            except OSError as e:
                raise VlmtuneError(f"data.cache_dir={root}: cannot write there ({e}); choose a writable folder "
                                   "or leave data.cache_dir unset") from None

    def key(self, sample: Sample, prompt_only: bool = False) -> str:
        """The entry name of `sample`; raises OSError when an image file cannot be read."""
        turns = json.dumps([[t.role, t.text] for t in sample.turns], ensure_ascii=False).encode()
        mode = b"prompt" if prompt_only else b"train"
        return _digest(self.fingerprint.encode(), mode, turns, *(file_digest(p) for p in sample.images))

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def load(self, key: str, source: str = "") -> dict[str, torch.Tensor] | None:
        """The cached tensors, or None when there is no entry or it is damaged (with a warning)."""
        path = self.path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            return parse_tensors(data, key)
        except Exception as e:  # whatever a damaged file makes safetensors or json raise
            self.corrupt += 1
            warnings.warn(f"{path}: damaged encoding-cache entry{' for ' + source if source else ''} "
                          f"({type(e).__name__}: {e}); encoding the sample again and rewriting the entry",
                          stacklevel=2)
            return None

    def store(self, key: str, tensors: dict[str, torch.Tensor], source: str = "") -> None:
        try:
            atomic_write_bytes(self.path(key), dump_tensors(tensors, key, source))
        except OSError as e:
            # The cache only saves time: a full or read-only disk must not stop training.
            if not self._write_failed:
                warnings.warn(f"cannot write to the encoding cache {self.folder} ({e}); going on without writing",
                              stacklevel=2)
            self._write_failed = True

    def encode(self, sample: Sample, prompt_only: bool = False) -> dict[str, torch.Tensor]:
        """`encoder.encode(sample)` (or `encode_prompt`), from the cache when it holds the entry."""
        fresh = self.encoder.encode_prompt if prompt_only else self.encoder.encode
        try:
            key = self.key(sample, prompt_only)
        except OSError:
            return fresh(sample)  # an unreadable image: let the encoder raise its own error about it
        cached = self.load(key, sample.source)
        if cached is not None:
            self.hits += 1
            return cached
        self.misses += 1
        tensors = fresh(sample)
        self.store(key, tensors, sample.source)
        return tensors
