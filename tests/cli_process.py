"""Run `vlmtune` commands in real, separate processes without paying for Python's start-up each time.

A fresh `python -m vlmtune.cli` spends about 8 of its 10 seconds here importing torch, transformers
and peft before it reads its first argument. The tests run hundreds of commands, so they go through
a fork server instead: one clean process (started with the test environment: offline, one thread)
imports vlmtune once, and every command is a child forked from it that calls `vlmtune.cli.main` with
its arguments, its own stdout/stderr files and exit code. Each child is a real process: it can be
killed with SIGKILL, interrupted with SIGINT or SIGTERM, and it dies without touching the tests.

`tests/test_check.py` still runs `python -m vlmtune.cli` as a plain subprocess, so the start-up
path itself is covered too.
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PRELOAD = ["vlmtune.cli", "vlmtune.train", "vlmtune.evaluate", "vlmtune.infer", "vlmtune.merge",
           "vlmtune.data.check", "vlmtune.data.stats", "vlmtune.models.tiny"]
_context = None


def _child(target: str, args: list[str], env: dict[str, str], out: str, err: str) -> None:
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, out), (2, err)):
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(handle, fd)
        os.close(handle)
    sys.stdout = open(1, "w", encoding="utf-8", buffering=1, closefd=False)
    sys.stderr = open(2, "w", encoding="utf-8", buffering=1, closefd=False)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    sys.argv = ["vlmtune", *args]
    code = 1
    try:
        module, function = target.split(":")
        result = getattr(importlib.import_module(module), function)(args)
        code = result if isinstance(result, int) else 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # as Python itself would: traceback on stderr, exit 1 (130 for Ctrl-C)
        import traceback

        traceback.print_exc()
        code = 130 if isinstance(sys.exc_info()[1], KeyboardInterrupt) else 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _ctx(env: dict[str, str]):
    """The fork server's context, started on first use with the test environment."""
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
        saved = dict(os.environ)
        os.environ.clear()
        os.environ.update(env)
        os.environ["PYTHONPATH"] = os.pathsep.join([env.get("PYTHONPATH", ""), str(Path(__file__).parent)])
        try:
            from multiprocessing import forkserver

            forkserver.ensure_running()
        finally:
            os.environ.clear()
            os.environ.update(saved)
    return _context


class Forked:
    """A command running in a forked child; a small part of `subprocess.Popen`'s interface."""

    def __init__(self, target: str, args: list[str], env: dict[str, str]):
        self.args = args
        self._dir = tempfile.mkdtemp(prefix="vlmtune-cli-")
        self._out, self._err = f"{self._dir}/stdout", f"{self._dir}/stderr"
        self._process = _ctx(env).Process(target=_child, args=(target, args, env, self._out, self._err))
        self._process.start()
        self.pid = self._process.pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None and not self._process.is_alive():
            self._process.join()
            self.returncode = self._process.exitcode
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.poll()

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def read(self) -> tuple[str, str]:
        """What the command has written so far to stdout and stderr."""
        return (Path(self._out).read_text(encoding="utf-8", errors="replace"),
                Path(self._err).read_text(encoding="utf-8", errors="replace"))

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        try:
            self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self.wait()
            raise
        return self.read()


def start(args: list[str], env: dict[str, str], target: str = "vlmtune.cli:main") -> Forked:
    return Forked(target, args, env)


def run(args: list[str], env: dict[str, str], timeout: float = 240,
        target: str = "vlmtune.cli:main") -> subprocess.CompletedProcess:
    """Like `subprocess.run(..., capture_output=True, text=True)` for a `vlmtune` command."""
    child = start(args, env, target)
    started = time.time()
    try:
        out, err = child.communicate(timeout)
    except subprocess.TimeoutExpired:
        raise subprocess.TimeoutExpired(args, time.time() - started) from None
    finally:
        shutil.rmtree(child._dir, ignore_errors=True)
    return subprocess.CompletedProcess(["vlmtune", *args], child.returncode, out, err)


def wait_for_lines(process, path, n: int, timeout: float = 120) -> None:
    """Wait until `path` holds at least `n` lines written by the running command `process`; fail the
    test if the command ends first or the lines do not come within `timeout` seconds."""
    import time

    import pytest

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_bytes().splitlines()) >= n:
            return
        if process.poll() is not None:
            pytest.fail(f"the command ended (rc {process.returncode}) before {n} lines in {path}: {process.read()[1]}")
        time.sleep(0.05)
    process.kill()
    pytest.fail(f"no {n} lines in {path} after {timeout} s")
