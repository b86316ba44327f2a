"""Training faults as a user meets them, through the `vlmtune` command in real subprocesses:
killed and interrupted runs, a second run into the same folder, finished runs, divergence, a full
disk, half-written checkpoints, and data that breaks after the pre-flight check.

What each case must show: nothing trained is lost, nothing is reported falsely (no NaN as 0, no
"done" for a broken model), and the message says what happened and what to type next.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import base_overrides, read_jsonl, run_cli, start_cli

pytestmark = pytest.mark.long

SLOW_SAVE = "fault_scripts.train_slow_save:main"


def args(model: Path, data: str, out: Path, *extra: str) -> list[str]:
    """`vlmtune train` arguments: an empty config file beside the run folder, then the overrides."""
    config = out.parent / "config.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text("{}\n")
    return ["train", str(config), *base_overrides(model, data, out, *extra)]


def wait_for(condition, timeout: float = 120, what: str = "condition", proc=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"process ended (rc {proc.returncode}) before {what}:\n{out[-2000:]}\n{err[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def logged_steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    return [r["step"] for r in read_jsonl(path) if "loss" in r]


def temps(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if ".tmp-" in p.name) if out.is_dir() else []


def incomplete(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("checkpoint-*") if not (p / "checkpoint.json").is_file())


def finish(proc, timeout: float = 120) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


# -- finished runs and new runs ---------------------------------------------------------------

def test_finished_run_is_read_only_and_continues_only_when_asked(tiny_qwen2_vl, caption_data, tmp_path):
    out = tmp_path / "run"
    base = args(tiny_qwen2_vl, caption_data["train"], out, "train.method=full", "train.save_steps=2")
    assert run_cli(base).returncode == 0
    weights = out / "final" / "model.safetensors"
    before = (weights.read_bytes(), weights.stat().st_mtime_ns)

    again = run_cli([*base, "train.resume=true"])
    assert again.returncode == 0, again.stderr
    assert "is finished" in again.stdout and "Raise train.max_steps" in again.stdout
    assert (weights.read_bytes(), weights.stat().st_mtime_ns) == before  # not touched
    assert logged_steps(out) == [1, 2]

    more = run_cli([*base, "train.resume=true", "train.max_steps=4"])
    assert more.returncode == 0, more.stderr
    assert f"resuming from {out / 'checkpoint-2'} (step 2)" in more.stdout
    assert logged_steps(out) == [1, 2, 3, 4]
    assert weights.read_bytes() != before[0]

    # a finished run whose checkpoints were deleted is not silently trained over by a new run
    for ckpt in out.glob("checkpoint-*"):
        shutil.rmtree(ckpt)
    fresh = run_cli(base)
    assert fresh.returncode == 2 and "Traceback" not in fresh.stderr
    assert "already holds a run (final, metrics.jsonl)" in fresh.stderr and "train.resume=true" in fresh.stderr
    assert logged_steps(out) == [1, 2, 3, 4]


# -- one run per folder -------------------------------------------------------------------------

def test_second_run_into_the_same_folder_is_refused_and_a_dead_runs_lock_is_taken_over(tiny_qwen2_vl,
                                                                                      caption_data, tmp_path):
    out = tmp_path / "run"
    first = start_cli(args(tiny_qwen2_vl, caption_data["train"], out, "train.max_steps=100000"))
    try:
        wait_for(lambda: logged_steps(out), what="the first run's first step", proc=first)
        holder = json.loads((out / "train.lock").read_text())
        assert holder["pid"] == first.pid
        second = run_cli(args(tiny_qwen2_vl, caption_data["train"], out, "train.resume=true"))
        assert second.returncode == 2 and "Traceback" not in second.stderr
        assert "is in use by another training run" in second.stderr
        assert f"PID {first.pid} on {holder['host']}, started {holder['started']}" in second.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    steps = logged_steps(out)
    assert len(steps) == len(set(steps))  # only the first run logged

    third = run_cli(args(tiny_qwen2_vl, caption_data["train"], out, "train.resume=true", "train.max_steps=2"))
    assert third.returncode == 0, third.stderr
    assert f"took over {out / 'train.lock'} left by a run that is no longer running: PID {first.pid}" in third.stdout
    assert (out / "train.lock").read_text() == ""  # released


# -- divergence -----------------------------------------------------------------------------------

def test_divergence_stops_the_run_and_nan_is_never_logged_as_zero(tiny_qwen2_vl, caption_data, tmp_path):
    out = tmp_path / "run"
    result = run_cli(args(tiny_qwen2_vl, caption_data["train"], out, "train.method=full", "train.learning_rate=1e30",
                          "train.max_grad_norm=0", "train.max_steps=50", "train.save_steps=1"))
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert "training diverged at step" in result.stderr
    assert "train.learning_rate (now 1e+30)" in result.stderr and "train.max_grad_norm" in result.stderr
    assert not (out / "final").exists()
    records = read_jsonl(out / "metrics.jsonl")
    bad = [r for r in records if "nonfinite" in r]
    assert bad, "the non-finite value was not logged"
    assert all(r.get("loss") != 0.0 for r in records if "loss" in r)
    step = bad[-1]["step"]
    assert f"diverged at step {step}" in result.stderr
    good = f"checkpoint-{step - 1}"
    if step > 1:
        assert f"last good checkpoint is {out / good}" in result.stderr
        assert (out / good / "checkpoint.json").is_file()
    assert not (out / f"checkpoint-{step}").exists()


# -- signals ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_a_checkpoint_and_prints_the_resume_command(tiny_qwen2_vl, caption_data, tmp_path,
                                                                  signum, code):
    out = tmp_path / "run"
    proc = start_cli(args(tiny_qwen2_vl, caption_data["train"], out, "train.max_steps=100000"))
    wait_for(lambda: logged_steps(out), what="the first step", proc=proc)
    proc.send_signal(signum)
    rc, stdout, stderr = finish(proc)
    assert rc == code, stderr[-3000:]
    assert "Traceback" not in stderr
    name = signal.Signals(signum).name
    assert "stopping after this step and saving a checkpoint" in stdout
    step = max(logged_steps(out))
    assert f"{name} at step {step} of 100000: saved {out / f'checkpoint-{step}'}" in stderr
    command = f"vlmtune train {out / 'vlmtune.yaml'} train.resume=true"
    assert command in stderr
    assert (out / f"checkpoint-{step}" / "checkpoint.json").is_file()
    assert not (out / "final").exists() and not temps(out)

    # the printed command resumes it (here with a lower step limit, so that it ends)
    resumed = run_cli(["train", str(out / "vlmtune.yaml"), "train.resume=true", f"train.max_steps={step + 2}"])
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {out / f'checkpoint-{step}'} (step {step})" in resumed.stdout
    assert logged_steps(out) == list(range(1, step + 3))


def test_second_ctrl_c_aborts_at_once_without_a_partial_checkpoint(tiny_qwen2_vl, caption_data, tmp_path):
    out = tmp_path / "run"
    proc = start_cli(args(tiny_qwen2_vl, caption_data["train"], out, "train.max_steps=100000"), target=SLOW_SAVE)
    wait_for(lambda: logged_steps(out), what="the first step", proc=proc)
    proc.send_signal(signal.SIGINT)  # first: stop after this step and save...
    wait_for(lambda: temps(out), what="the checkpoint being written", proc=proc)
    proc.send_signal(signal.SIGINT)  # ...second, while the checkpoint is half written: abort
    rc, _, stderr = finish(proc)
    assert rc == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    assert not list(out.glob("checkpoint-*")) and not temps(out)
    assert not (out / "final").exists()


# -- checkpoints: kills during a save, incomplete folders, a full disk ----------------------------

def test_kill_during_a_save_leaves_no_checkpoint_and_resume_skips_incomplete_ones(tiny_qwen2_vl, caption_data,
                                                                                 tmp_path):
    out = tmp_path / "run"
    run = args(tiny_qwen2_vl, caption_data["train"], out, "train.method=full", "train.save_steps=2",
               "train.max_steps=6")
    first = run_cli([*run, "train.max_steps=2"])  # checkpoint-2 complete, then a run that dies saving 4
    assert first.returncode == 0, first.stderr
    shutil.rmtree(out / "final")
    proc = start_cli([*run, "train.resume=true"], target=SLOW_SAVE)
    wait_for(lambda: [t for t in temps(out) if "checkpoint-4" in t], what="checkpoint-4 being written", proc=proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "checkpoint-4").exists()
    stale = temps(out)
    assert stale and all(t.startswith(".checkpoint-4.tmp-") for t in stale)

    # A checkpoint-6 folder cut short some other way (copied by hand, a crash of an older version)
    shutil.copytree(out / "checkpoint-2", out / "checkpoint-6")
    (out / "checkpoint-6" / "model.safetensors").write_bytes(b"truncated")

    resumed = run_cli([*run, "train.resume=true"])
    assert resumed.returncode == 0, resumed.stderr
    assert f"removed {out / stale[0]}, left half-written by a process that died" in resumed.stdout
    assert f"skipping {out / 'checkpoint-6'}: incomplete (model.safetensors is 9 bytes" in resumed.stdout
    assert f"resuming from {out / 'checkpoint-2'} (step 2)" in resumed.stdout
    assert not temps(out)


def _mount_small_filesystem(folder: Path, size: str) -> bool:
    folder.mkdir(parents=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True).returncode == 0


def test_full_disk_during_a_save_says_so_and_keeps_nothing_half_written(tiny_qwen2_vl, caption_data, tmp_path):
    disk = tmp_path / "small"
    if not _mount_small_filesystem(disk, "600k"):
        pytest.skip("cannot mount a small tmpfs here (needs root and mount permission)")
    try:
        out = disk / "run"
        result = run_cli(args(tiny_qwen2_vl, caption_data["train"], out, "train.method=full", "train.save_steps=1"))
        assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
        assert "Traceback" not in result.stderr and "inline_container" not in result.stderr
        assert f"no space left on {disk}" in result.stderr
        assert "while writing" in result.stderr and "it needs about" in result.stderr
        assert not list(out.glob("checkpoint-*")) and not temps(out) and not (out / "final").exists()
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


# -- data that breaks after the pre-flight check ---------------------------------------------------

def _data_copy(caption_data, tmp_path) -> tuple[str, Path]:
    """A private copy of the 4-sample caption set (its images are changed by the test)."""
    folder = tmp_path / "data"
    shutil.copytree(caption_data["folder"], folder)
    return str(folder / "train.json"), folder / "images" / "t2.png"


@pytest.mark.parametrize("policy", ["skip", "error"])
def test_image_broken_mid_run_follows_on_bad_sample(tiny_qwen2_vl, caption_data, tmp_path, policy):
    data, image = _data_copy(caption_data, tmp_path)
    out = tmp_path / "run"
    steps = 80 if policy == "skip" else 100000
    proc = start_cli(args(tiny_qwen2_vl, data, out, f"data.on_bad_sample={policy}", f"train.max_steps={steps}",
                          "train.save_steps=100000"))
    wait_for(lambda: logged_steps(out), what="the first step", proc=proc)
    image.write_bytes(b"not a png any more")
    rc, stdout, stderr = finish(proc, timeout=300)
    assert "Traceback" not in stderr
    source = f"{data}:2"
    if policy == "skip":
        assert rc == 0, stderr[-3000:]
        assert max(logged_steps(out)) == steps and (out / "final").is_dir()
        rejected = read_jsonl(out / "rejected_train.jsonl")
        assert rejected and {r["source"] for r in rejected} == {source}
        assert "cannot identify image file" in rejected[0]["problems"][0]
        assert f"skipping {source}" in stdout
    else:
        assert rc == 2, stderr[-3000:]
        assert f"{source}: cannot be loaded during training" in stderr
        step = max(logged_steps(out))
        assert f"Saved {out / f'checkpoint-{step}'} (step {step})" in stderr
        assert "train.resume=true" in stderr
        assert (out / f"checkpoint-{step}" / "checkpoint.json").is_file() and not (out / "final").exists()
