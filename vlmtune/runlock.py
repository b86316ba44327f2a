"""One training run per run folder.

`RUN/train.lock` is held with an exclusive `flock` for as long as a `vlmtune train` writes into
the folder, and holds who holds it (host, PID, start time, command). The kernel drops the lock
when its process dies, however it dies, so a lock left by a killed run is free to take; its
contents then say whose it was, and the new run says it took it over.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import time
from pathlib import Path

from vlmtune.errors import VlmtuneError
from vlmtune.fileio import host

LOCK_NAME = "train.lock"


class RunLock:
    """Exclusive hold on a run folder: `with RunLock(folder): ...`, or `acquire()` / `release()`.
    `setting` names what picks the folder, for the refusal message."""

    def __init__(self, folder: str | Path, setting: str = "train.output_dir"):
        self.path = Path(folder) / LOCK_NAME
        self.setting = setting  # what a refused user changes to pick another folder
        self._fd: int | None = None
        self._created = False  # the folder was made for the lock: removed again if nothing else went in
        self.previous: dict | None = None  # the holder's details, if a dead run left the lock behind

    def acquire(self) -> RunLock:
        self._created = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise VlmtuneError(f"{self.path.parent} is in use by another training run: {_describe(holder)}. "
                               f"Wait for it to finish (or stop it), or choose another {self.setting}.") from None
        self.previous = _read(fd) or None
        details = {"host": host(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                   "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(details).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        """Empty the file (an empty lock is a free one) and let go. A folder made only to hold the
        lock (a run refused before it wrote anything) is removed again."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
        except OSError:
            pass
        folder = self.path.parent
        if self._created and [p.name for p in folder.iterdir()] == [LOCK_NAME]:
            self.path.unlink(missing_ok=True)
            folder.rmdir()
        os.close(self._fd)  # closing drops the flock
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read(fd: int) -> dict:
    try:
        data = os.pread(fd, 65536, 0)
        return json.loads(data) if data.strip() else {}
    except (OSError, ValueError):
        return {}


def _describe(holder: dict) -> str:
    if not holder:
        return "details not written yet"
    return (f"PID {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"
            + (f" ({holder['command']})" if holder.get("command") else ""))


def describe_previous(lock: RunLock) -> str | None:
    """The message for a lock taken over from a dead run, or None."""
    if not lock.previous:
        return None
    return f"took over {lock.path} left by a run that is no longer running: {_describe(lock.previous)}"
