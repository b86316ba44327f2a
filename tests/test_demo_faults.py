"""`vlmtune demo` as a user mistreats it, through the command in real subprocesses: started twice
into one folder, interrupted, run again, and run too short to learn (it must say so, not pass)."""

from __future__ import annotations

import re
import signal

import pytest
from conftest import read_jsonl, run_cli, start_cli
from test_faults import finish, wait_for

pytestmark = pytest.mark.long

SMALL = ["--train-samples", "64", "--val-samples", "8"]


def logged_steps(run) -> list[int]:
    path = run / "metrics.jsonl"
    return [r["step"] for r in read_jsonl(path) if "loss" in r] if path.is_file() else []


def test_a_second_demo_is_refused_ctrl_c_keeps_a_checkpoint_and_a_rerun_that_does_not_learn_says_so(tmp_path):
    out = tmp_path / "demo"
    first = start_cli(["demo", "--out", str(out), "--steps", "100000", *SMALL])
    try:
        wait_for(lambda: logged_steps(out / "run"), what="the demo's first logged step", proc=first)
        second = run_cli(["demo", "--out", str(out), "--steps", "3", *SMALL])
        assert second.returncode == 2 and "Traceback" not in second.stderr
        assert f"{out} is in use by another training run: PID {first.pid}" in second.stderr
        assert "choose another --out" in second.stderr
        assert first.poll() is None  # the first demo runs on, its run folder untouched
        first.send_signal(signal.SIGINT)
        rc, stdout, stderr = finish(first)
    finally:
        if first.poll() is None:
            first.kill()
    assert rc == 130 and "Traceback" not in stderr, stderr[-3000:]
    stopped = re.search(r"SIGINT at step (\d+) of 100000: saved (\S+)\.", stderr)
    assert stopped, stderr[-3000:]
    step = int(stopped.group(1))
    assert stopped.group(2) == str(out / "run" / f"checkpoint-{step}")
    assert (out / "run" / f"checkpoint-{step}" / "checkpoint.json").is_file()

    # Run again: the interrupted demo's run is replaced; 3 steps teach nothing and the demo says so.
    rerun = run_cli(["demo", "--out", str(out), "--steps", "3", *SMALL])
    assert rerun.returncode == 1 and "Traceback" not in rerun.stderr, rerun.stderr[-3000:]
    assert "the demo did not show learning" in rerun.stdout
    assert not (out / "run" / f"checkpoint-{step}").exists() and (out / "run" / "final").is_dir()
    assert (out / "train.lock").read_text() == "" and (out / "run" / "train.lock").read_text() == ""
