"""Two CPU processes (gloo) train on mixed data - one-image, two-image and text-only samples - with
the vision tower and projector trained fully beside LoRA, and agree with one process.

The data and the step order are in tests/mixed_data.py: eight samples, global batch 2 (one process:
batch 2; two processes: batch 1 each), two epochs, so step k trains on the same two samples
everywhere, and the steps include a rank with two images beside a rank with a text-only sample, a
rank with one image beside one with two, and both ranks text-only. With the vision pass
(vlmtune/distributed.py) every run finishes and the loss and gradient-norm curves equal the
one-process run's within `RTOL` (seen here: 3e-7 relative or less, float32 rounding of a different
reduction order); without it, the same run stops at its first step: it fails or hangs (bounded by `STALL_S`).

- DDP: `torchrun -m vlmtune.train`, as users run it (Qwen2-VL; Qwen3-VL and MiniCPM-V 2.6 too);
- FSDP2: tests/fsdp_worker.py (accelerate runs FSDP on GPUs only; the worker shards the same model with
  torch's `fully_shard` the way accelerate does);
- two "nodes": two torchrun launchers (`--nnodes 2`, one process each, rendezvous on 127.0.0.1) write
  one run folder;
- DeepSpeed ZeRO-3 on GPUs: marked `gpu`.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, clean_env, free_port, read_jsonl, run_cli
from mixed_data import SEED, mixed_records, n_images, step_pairs, write_mixed

RTOL = 1e-5  # loss and grad_norm per step, relative; seen: <= 3e-7
WEIGHT_ATOL = 1e-4  # final trained weights (LoRA, vision tower, projector); seen: 2.3e-5 after 8 steps
HANG_S = 300  # a run that should finish: with the pass it takes 16-25 s here
STALL_S = 75  # the negative control's bound: the same run stops at its first step (it hangs, or fails)
STEPS = 8  # 2 epochs of 4 steps

pytestmark = [pytest.mark.skipif(sys.platform == "win32", reason="gloo on Windows is not supported here"),
              pytest.mark.long]


def overrides(model: Path, data: str, out: Path, batch: int) -> list[str]:
    return [f"model.name_or_path={model}", f"data.train={data}", f"train.output_dir={out}", "train.epochs=2",
            "train.max_steps=-1", f"train.batch_size={batch}", "train.grad_accum=1", "train.logging_steps=1",
            "train.save_steps=4", "train.lr_scheduler=constant", "train.learning_rate=0.001", f"train.seed={SEED}",
            "train.freeze_vision=false", "train.freeze_projector=false", "lora.r=4", "lora.alpha=8",
            "lora.dropout=0.0", "eval.num_samples=0"]


def curve(records: list[dict]) -> list[tuple[int, float, float]]:
    return [(r["step"], r["loss"], r["grad_norm"]) for r in records if "loss" in r]


def assert_same_curve(got: list, want: list) -> float:
    """Equal steps, losses and gradient norms within RTOL; returns the largest relative difference."""
    assert [s for s, _, _ in got] == [s for s, _, _ in want] == list(range(1, STEPS + 1))
    worst = 0.0
    for (step, loss, norm), (_, loss0, norm0) in zip(got, want):
        for a, b in ((loss, loss0), (norm, norm0)):
            worst = max(worst, abs(a - b) / abs(b))
    assert worst <= RTOL, (worst, got, want)
    return worst


def torchrun(nproc: int, target: list[str], *, nnodes: int = 1, node_rank: int = 0, port: int | None = None,
             **env) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--nnodes", str(nnodes),
            "--node_rank", str(node_rank), "--master_addr", "127.0.0.1", "--master_port", str(port or free_port()),
            *target]


def run_bounded(command: list[str], timeout: float, **env) -> tuple[int | None, str]:
    """Run `command` in its own process group; (exit status, or None if still running after `timeout`
    seconds, then killed with its whole group; stdout+stderr)."""
    with open(os.devnull, "rb") as stdin:
        proc = subprocess.Popen(command, cwd=ROOT, env=clean_env(**env), stdin=stdin, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, _ = proc.communicate()
        return None, out


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (torchrun starts each worker in a session of its own,
    so killing torchrun's process group leaves hung workers behind, holding the output pipe)."""
    import psutil  # accelerate's dependency

    try:
        root = psutil.Process(pid)
        family = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for proc in family:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=30)


@pytest.fixture(scope="module")
def mixed_for(tmp_path_factory, tiny_model_dir):
    """`mixed_for(family)`: the data, the one-process reference run (`vlmtune train`, batch 2) and its curve."""
    from vlmtune.models import family_for
    from vlmtune.models.load import load_processor

    made = {}

    def get(name: str) -> dict:
        if name in made:
            return made[name]
        model = tiny_model_dir(name)
        root = tmp_path_factory.mktemp(f"mixed_{name}")
        data = write_mixed(root)
        images = [n_images(r) for r in mixed_records(root)]
        family = family_for(model)
        pairs = [(images[a], images[b]) for a, b in step_pairs(data, load_processor(model, family), family)]
        # the situations this is about, at known steps: rank 1 text-only beside two images (the first
        # step), both ranks text-only, and fewer images on one rank than on the other
        assert pairs[0] == (2, 0) and (0, 0) in pairs and (2, 1) in pairs and (1, 1) in pairs, pairs
        config = root / "empty.yaml"  # everything is in the overrides
        config.write_text("{}\n")
        out = root / "one_process"
        result = run_cli(["train", str(config), *overrides(model, data, out, batch=2)])
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        made[name] = {"root": root, "data": data, "config": str(config), "model": model, "family": family,
                      "reference": curve(read_jsonl(out / "metrics.jsonl")), "reference_out": out, "pairs": pairs}
        return made[name]

    return get


@pytest.fixture(scope="module")
def mixed(mixed_for):
    return mixed_for("qwen2_vl")


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run / "final" / "adapter_model.safetensors")


def assert_same_weights(run: Path, reference: Path, vision: str = "visual") -> None:
    got, want = final_weights(run), final_weights(reference)
    assert set(got) == set(want)
    assert any(vision in name for name in want)  # the vision tower and projector are trained and saved
    worst = max(float((got[n] - want[n]).abs().max()) for n in want)
    assert worst <= WEIGHT_ATOL, worst


def test_ddp_with_text_only_batches_and_trained_vision_matches_one_process(mixed, tiny_qwen2_vl, tmp_path):
    out = tmp_path / "ddp"
    start = time.perf_counter()
    code, log = run_bounded(torchrun(2, ["-m", "vlmtune.train", mixed["config"],
                                         *overrides(tiny_qwen2_vl, mixed["data"], out, batch=1)]), HANG_S)
    assert code == 0, log[-5000:]
    print(f"DDP run: {time.perf_counter() - start:.1f} s")
    worst = assert_same_curve(curve(read_jsonl(out / "metrics.jsonl")), mixed["reference"])
    print(f"DDP vs one process: largest relative difference of loss / grad_norm {worst:.2e}")
    assert_same_weights(out, mixed["reference_out"])
    # the vision weights really trained: the saved tower differs from the checkpoint's
    from safetensors.torch import load_file

    base = load_file(tiny_qwen2_vl / "model.safetensors")
    trained = final_weights(out)
    name = next(n for n in trained if "visual.merger.mlp" in n and n.endswith("weight"))
    original = name.removeprefix("base_model.model.").removeprefix("model.")  # checkpoint: visual.merger...
    assert original in base and not torch.allclose(trained[name], base[original])


@pytest.mark.parametrize("name", ["minicpmv2_6", "qwen3_vl"])
def test_ddp_matches_one_process_for_other_families(name, mixed_for, tmp_path):
    # MiniCPM-V 2.6: the pass of vlmtune's own model code ("model"); Qwen3-VL: the hook, with DeepStack mergers
    run = mixed_for(name)
    out = tmp_path / "ddp"
    code, log = run_bounded(torchrun(2, ["-m", "vlmtune.train", run["config"],
                                         *overrides(run["model"], run["data"], out, batch=1)]), HANG_S)
    assert code == 0, log[-5000:]
    got = curve(read_jsonl(out / "metrics.jsonl"))
    if name == "qwen3_vl":
        # transformers marks Qwen2.5-VL's and Qwen3-VL's model `accepts_loss_kwargs = False`, so the Trainer
        # never passes the step's token count: each rank takes the mean over its own label tokens and DDP
        # averages the ranks. With 11 label tokens on one rank and 4 on the other that is another loss
        # than one process's mean over 15 (seen: 6.3085 against 6.3535 at step 1). It trains, it does not
        # hang, and the vision tower is trained and saved:
        assert [s for s, _, _ in got] == list(range(1, STEPS + 1))
        assert all(math.isfinite(loss) and math.isfinite(norm) for _, loss, norm in got)
        assert any("visual" in n for n in final_weights(out))
        return
    worst = assert_same_curve(got, run["reference"])
    print(f"{name} DDP vs one process: largest relative difference of loss / grad_norm {worst:.2e}")
    assert_same_weights(out, run["reference_out"], vision=run["family"].vision[0].rstrip("."))


def test_ddp_without_the_vision_pass_fails_or_hangs(mixed, tiny_qwen2_vl, tmp_path):
    # The negative control: the same run with the pass left out (VLMTUNE_NO_VISION_PASS=1). On the first
    # step rank 1's text-only batch leaves the vision gradients unreduced; rank 0 waits in their
    # all-reduce. Seen here: it hangs in that step (gloo), until killed.
    out = tmp_path / "ddp_no_pass"
    code, log = run_bounded(torchrun(2, ["-m", "vlmtune.train", mixed["config"],
                                         *overrides(tiny_qwen2_vl, mixed["data"], out, batch=1)]),
                            STALL_S, VLMTUNE_NO_VISION_PASS="1")
    assert "trainable" in log and "vision" in log, log[-3000:]  # it got as far as training
    assert not (out / "final").exists() and not (out / "checkpoint-4").exists()
    # and no further: not one step was logged
    logged = read_jsonl(out / "metrics.jsonl") if (out / "metrics.jsonl").exists() else []
    assert not [r for r in logged if "loss" in r], logged
    if code is not None:  # failed rather than hung: with the error DDP gives for it
        assert code != 0 and ("Expected to have finished reduction" in log or "mismatch" in log), log[-5000:]


def test_fsdp2_with_text_only_batches_and_trained_vision_matches_one_process(mixed, tiny_qwen2_vl, tmp_path):
    worker = [str(ROOT / "tests" / "fsdp_worker.py")]
    settings = overrides(tiny_qwen2_vl, mixed["data"], tmp_path / "unused", batch=1)
    one = tmp_path / "one.jsonl"
    result = subprocess.run([sys.executable, *worker, str(one), *settings, "train.batch_size=2"], cwd=ROOT, env=clean_env(), capture_output=True, text=True,
                            timeout=HANG_S)
    assert result.returncode == 0, result.stderr[-4000:]
    # the worker's one process trains as `vlmtune train` does: its curve is the reference's
    one_curve = curve(read_jsonl(one))
    assert_same_curve(one_curve, mixed["reference"])

    two = tmp_path / "two.jsonl"
    code, log = run_bounded(torchrun(2, [*worker, str(two), *settings]), HANG_S)
    assert code == 0, log[-5000:]
    worst = assert_same_curve(curve(read_jsonl(two)), one_curve)
    print(f"FSDP2 vs one process: largest relative difference of loss / grad_norm {worst:.2e}")

    # negative control: without the pass the ranks' all-gathers stop matching. Seen here: gloo aborts
    # with "Received data size doesn't match expected size. Is there a distributed collective mismatch"
    # (with NCCL on GPUs that is a hang).
    three = tmp_path / "no_pass.jsonl"
    code, log = run_bounded(torchrun(2, [*worker, str(three), *settings]), STALL_S, VLMTUNE_NO_VISION_PASS="1")
    assert code != 0 and not three.exists(), log[-3000:]
    if code is not None:
        assert "mismatch" in log or "Connection reset" in log or "Connection closed" in log, log[-5000:]


def test_two_nodes_train_into_one_run_folder(mixed, tiny_qwen2_vl, tmp_path):
    # Two launchers as on two machines (--nnodes 2, one process each, static rendezvous at node 0's
    # address), one run folder on a filesystem both see.
    out = tmp_path / "two_nodes"
    port = free_port()
    target = ["-m", "vlmtune.train", mixed["config"],
              *overrides(tiny_qwen2_vl, mixed["data"], out, batch=1)]
    launchers = []
    for node in (0, 1):
        launchers.append(subprocess.Popen(torchrun(1, target, nnodes=2, node_rank=node, port=port), cwd=ROOT,
                                          env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          text=True, start_new_session=True))
    logs = []
    try:
        for proc in launchers:
            logs.append(proc.communicate(timeout=HANG_S)[0])
    finally:
        for proc in launchers:
            if proc.poll() is None:
                kill_tree(proc.pid)
    assert [p.returncode for p in launchers] == [0, 0], "\n----\n".join(log[-3000:] for log in logs)
    # one run: metrics logged once per step, by the global rank 0 (node 0), same curve as one process
    assert_same_curve(curve(read_jsonl(out / "metrics.jsonl")), mixed["reference"])
    assert logs[0].count("done: run folder") == 1 and "done: run folder" not in logs[1]
    for name in ("checkpoint-4", f"checkpoint-{STEPS}"):
        state = json.loads((out / name / "trainer_state.json").read_text())
        assert (out / name / "checkpoint.json").is_file() and state["global_step"] == int(name.split("-")[1])
    assert (out / "final" / "adapter_model.safetensors").is_file() and (out / "final" / "vlmtune.yaml").is_file()
    assert_same_weights(out, mixed["reference_out"])
    assert not list(out.rglob("*.tmp")) and not list(out.rglob(".*.tmp-*"))


# --- GPUs ------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and importlib.util.find_spec("deepspeed")),
                    reason="needs a CUDA device and DeepSpeed (pip install -e '.[deepspeed]')")
def test_zero3_with_text_only_batches_and_trained_vision(mixed, tiny_qwen2_vl, tmp_path):
    """DeepSpeed ZeRO-3 (configs/deepspeed/zero3.json) on the same data: on two or more GPUs, two processes
    (the case that hangs without the pass); on one GPU, one process (ZeRO-3's partitioned parameters and
    hooks around the pass, no hang possible). Same curve as one process without DeepSpeed on the same
    GPU, within 1e-3 (GPU kernels reduce in other orders than the CPU)."""
    nproc = min(2, torch.cuda.device_count())
    fp32 = ["model.dtype=fp32", "model.attn_implementation=sdpa"]
    reference = tmp_path / "one_gpu"
    result = run_cli(["train", mixed["config"], *overrides(tiny_qwen2_vl, mixed["data"], reference, batch=2), *fp32],
                     timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    out = tmp_path / "zero3"
    batch = 2 // nproc
    code, log = run_bounded(torchrun(nproc, ["-m", "vlmtune.train", mixed["config"],
                                             *overrides(tiny_qwen2_vl, mixed["data"], out, batch=batch), *fp32,
                                             f"train.deepspeed={ROOT / 'configs' / 'deepspeed' / 'zero3.json'}"]),
                            600)
    assert code == 0, log[-6000:]
    got, want = curve(read_jsonl(out / "metrics.jsonl")), curve(read_jsonl(reference / "metrics.jsonl"))
    assert [s for s, _, _ in got] == list(range(1, STEPS + 1))
    for (_, loss, _), (_, loss0, _) in zip(got, want):
        assert abs(loss - loss0) <= 1e-3 * abs(loss0), (got, want)
    assert (out / "final" / "adapter_model.safetensors").is_file()
