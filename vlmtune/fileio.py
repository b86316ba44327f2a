"""Files written so that a kill, a crash or a full disk never leaves half of one behind.

Everything vlmtune writes that a later command reads (checkpoints, merged models, result files)
is first written under a temporary name beside its destination and renamed into place once
complete. Temporary names carry the writer's host and PID (`.NAME.tmp-HOST-PID`), so a later
run can tell the leftovers of a dead process from the work of a live one and remove them.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
from pathlib import Path

from vlmtune.errors import VlmtuneError

TEMP_MARK = ".tmp-"


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


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` to `path` through a temporary sibling and a rename: all of it or nothing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        with tmp.open("w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise disk_full_error(e, path) or e
    return path


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
