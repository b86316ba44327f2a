"""Files written so that a kill, a crash or a full disk never leaves half of one behind.

Everything vlmtune writes that a later command reads (checkpoints, merged models, result files)
is first written under a temporary name beside its destination and renamed into place once
complete. Temporary names carry the writer's host and PID (`.NAME.tmp-HOST-PID`), so a later
run can tell the leftovers of a dead process from the work of a live one and remove them.
Cache entries (`atomic_write_bytes`) are the exception: many processes write the same entry at
once, so they take unique temporary names. Tensor files (`dump_tensors`, `parse_tensors`) carry
a checksum, so a damaged cache entry is detected and recomputed.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from vlmtune.errors import VlmtuneError

if TYPE_CHECKING:  # torch loads only where tensor files are written: `vlmtune data convert` never needs it
    import torch

TEMP_MARK = ".tmp-"
TENSOR_FILE_VERSION = 2  # in every tensor file's metadata; bump when `dump_tensors` writes another layout


def host() -> str:
    return socket.gethostname()


def temp_sibling(path: str | Path) -> Path:
    """A hidden temporary name beside `path` owned by this process: `.NAME.tmp-HOST-PID`."""
    path = Path(path)
    return path.with_name(f".{path.name}{TEMP_MARK}{host()}-{os.getpid()}")


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this machine (a zombie counts as dead)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


def temp_owner(path: Path) -> tuple[str, int] | None:
    """(host, pid) of a name made by `temp_sibling`, or None for any other name."""
    name = path.name
    if not name.startswith(".") or TEMP_MARK not in name:
        return None
    owner = name.rsplit(TEMP_MARK, 1)[1]
    host_name, _, pid = owner.rpartition("-")
    return (host_name, int(pid)) if host_name and pid.isdigit() else None


def clean_stale_temps(folder: str | Path) -> list[Path]:
    """Remove the temporary files and folders in `folder` left by dead processes of this host.

    Temporaries of live processes, and of other hosts (whose processes cannot be checked from
    here), are left alone. Returns what was removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in sorted(folder.iterdir()):
        owner = temp_owner(path)
        if owner is None or owner[0] != host() or owner[1] == os.getpid() or pid_alive(owner[1]):
            continue
        remove(path)
        removed.append(path)
    return removed


def remove(path: Path) -> None:
    """Delete a file or a folder tree; missing is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str, mode: int | None = None) -> Path:
    """Write `text` to `path` through a temporary sibling and a rename: all of it or nothing.

    The text is written as it is (no newline translation: CSV rows keep their "\r\n"). `mode`
    sets the file's permissions; None leaves those of a new file under the umask.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        with tmp.open("w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            tmp.chmod(mode)
        tmp.replace(path)
    except BaseException as e:  # Ctrl-C included: no temporary file is left behind
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise disk_full_error(e, path) or e
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """`data` at `path`, all or nothing, for cache entries that several processes (DataLoader
    workers, DDP ranks) may write at once: a uniquely named temporary file beside it, then a rename
    (the last one wins; they hold the same bytes). Not synced to disk: a lost entry is recomputed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide the entries from other users sharing the folder
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def tensors_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """A CRC-32 of names, dtypes, shapes and bytes, in key order (it only catches damage, and is
    4x faster to check on every read than a SHA-256)."""
    import torch

    crc = 0
    for name, value in tensors.items():
        crc = zlib.crc32(f"{name}|{value.dtype}|{tuple(value.shape)};".encode(), crc)
        crc = zlib.crc32(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data, crc)
    return f"{crc:08x}"


def dump_tensors(tensors: dict[str, torch.Tensor], key: str, source: str = "") -> bytes:
    """A safetensors file holding `tensors`, their order, `key` and a checksum (see `parse_tensors`)."""
    from safetensors.torch import save

    meta = {"version": str(TENSOR_FILE_VERSION), "key": key, "source": source, "order": json.dumps(list(tensors)),
            "checksum": tensors_checksum(tensors)}
    return save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta)


def parse_tensors(data: bytes, key: str) -> dict[str, torch.Tensor]:
    """The tensors of a `dump_tensors` file, in their original order.

    Raises:
        Exception: a partial or damaged file (truncated header or data, wrong key or version,
            checksum mismatch).
    """
    from safetensors.torch import load

    header_len = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8: 8 + header_len]).get("__metadata__") or {}
    if meta.get("key") != key or meta.get("version") != str(TENSOR_FILE_VERSION):
        raise ValueError(f"the entry is for key {meta.get('key')}, version {meta.get('version')}")
    loaded = load(data)
    tensors = {name: loaded[name] for name in json.loads(meta["order"])}
    if tensors_checksum(tensors) != meta["checksum"]:
        raise ValueError("checksum mismatch")
    return tensors


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def is_disk_full(exc: BaseException) -> bool:
    """An out-of-space error, however the writing library reported it (OSError ENOSPC, torch's
    `inline_container.cc` "file write failed", safetensors' I/O error text)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(exc).lower()
        if "no space left" in text or "disk quota" in text or "file write failed" in text:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def disk_full_error(exc: BaseException, path: str | Path, needed: int | None = None,
                    what: str | None = None) -> VlmtuneError | None:
    """A clear "no space left on ..." error for `exc` if it is one (else None): where, how much
    is free, how much was needed."""
    if not is_disk_full(exc):
        return None
    path = Path(path)
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    need = f"; it needs about {human_bytes(needed)}" if needed else ""
    return VlmtuneError(f"no space left on {probe} ({human_bytes(free)} free) while writing {what or path}{need}. "
                        "Free some space or write elsewhere; nothing half-written was kept.")


@contextmanager
def removed_on_failure(temp: Path, out: str | Path, what: str) -> Iterator[None]:
    """Delete the temporary folder `temp` (being built for `out`) if the block fails, and turn a
    full disk into a clear error about `what`."""
    try:
        yield
    except BaseException as e:
        shutil.rmtree(temp, ignore_errors=True)
        full = disk_full_error(e, out, what=what)
        if full:
            raise full from None
        raise
