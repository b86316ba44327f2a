"""Shared test fixtures: tiny models built once per session, small image datasets, and helpers
to run vlmtune in-process or as a real command.

Everything here is offline and CPU-only. The tiny models are random-weight checkpoints of the
real architectures (hidden 64, 2 text layers, vision depth 2) with a real processor, tokenizer
and chat template, built with `vlmtune.models.tiny.build_tiny_model`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]

COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")


def draw(path: Path, colour: str = "red", shape: str = "circle", size: tuple[int, int] = (112, 112)) -> str:
    """A small picture of one coloured shape at `path`; returns the absolute path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(image)
    w, h = size
    box = (w // 5, h // 5, 4 * w // 5, 4 * h // 5)
    if shape == "circle":
        d.ellipse(box, fill=colour)
    elif shape == "square":
        d.rectangle(box, fill=colour)
    else:
        d.polygon([(w // 2, h // 5), (w // 5, 4 * h // 5), (4 * w // 5, 4 * h // 5)], fill=colour)
    image.save(path)
    return str(path.resolve())


def caption_records(n: int, folder: Path, prefix: str = "img") -> list[dict]:
    """`n` MiniCPM-style (seed 004) single-turn records whose images are drawn into `folder/images`.

    Every caption has the same number of words, so every sample has the same token count (the
    distributed test relies on that to count the samples seen per step).
    """
    records = []
    for i in range(n):
        colour, shape = COLOURS[i % len(COLOURS)], SHAPES[i % len(SHAPES)]
        draw(Path(folder) / "images" / f"{prefix}{i}.png", colour, shape)
        records.append({"id": f"{prefix}{i}", "image": f"images/{prefix}{i}.png", "conversations": [
            {"role": "user", "content": "<image>\nWhat is in the image?"},
            {"role": "assistant", "content": f"a {colour} {shape}"}]})
    return records


def write_json(path: Path, records: list[dict]) -> str:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    return str(path)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for a vlmtune subprocess: offline, one thread, no tracker keys, nothing
    left behind by in-process runs (vlmtune's tracker set-up writes os.environ)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SWANLAB_", "WANDB_", "TENSORBOARD_", "RANK", "LOCAL_RANK", "WORLD_SIZE",
                                "MASTER_", "ACCELERATE_"))}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(ROOT), **extra)
    return env


def run_cli(args: list[str], timeout: float = 240, **env) -> subprocess.CompletedProcess:
    """`vlmtune ARGS` in a separate process (forked from a server that has vlmtune imported
    already; see tests/cli_process.py), with the result of `subprocess.run(capture_output=True)`."""
    import cli_process

    return cli_process.run(args, clean_env(**env), timeout)


def start_cli(args: list[str], target: str = "vlmtune.cli:main", **env):
    """`vlmtune ARGS` started in a separate process and left running (a `Popen`-like handle), for
    tests that signal or kill it. `target` runs another `module:function(args)` instead."""
    import cli_process

    return cli_process.start(args, clean_env(**env), target)


def base_overrides(model: Path, data: str, out: Path, *extra: str) -> list[str]:
    """Dotted overrides for a short, quiet, fast run of the tiny model."""
    return [f"model.name_or_path={model}", f"data.train={data}", f"train.output_dir={out}",
            "train.batch_size=2", "train.grad_accum=1", "train.logging_steps=1", "train.save_steps=1000",
            "train.max_steps=2", "train.lr_scheduler=constant", "lora.r=4", "lora.alpha=8", "lora.dropout=0.0",
            "eval.num_samples=0", *extra]


@pytest.fixture(autouse=True)
def _restore_environ():
    """In-process training sets tracker variables in os.environ; keep them from leaking across tests."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """`tiny_model_dir(family)`: the folder of a tiny model of that family, built once per session."""
    from vlmtune.models.tiny import build_tiny_model

    built: dict[str, Path] = {}

    def get(family: str = "qwen2_vl") -> Path:
        if family not in built:
            built[family] = build_tiny_model(family, tmp_path_factory.mktemp(f"tiny_{family}") / "model")
        return built[family]

    return get


@pytest.fixture(scope="session")
def tiny_qwen2_vl(tiny_model_dir) -> Path:
    return tiny_model_dir("qwen2_vl")


@pytest.fixture(scope="session")
def caption_data(tmp_path_factory) -> dict[str, str]:
    """A 4-sample training file and a 2-sample validation file of 112x112 shape pictures."""
    folder = tmp_path_factory.mktemp("captions")
    return {"train": write_json(folder / "train.json", caption_records(4, folder, "t")),
            "val": write_json(folder / "val.json", caption_records(2, folder, "v")),
            "folder": str(folder)}


@pytest.fixture(scope="session")
def qwen2_vl_parts(tiny_qwen2_vl):
    """(processor, family) of the tiny qwen2_vl, loaded the way `vlmtune train` loads them."""
    from vlmtune.models import family_for
    from vlmtune.models.load import load_processor

    family = family_for(tiny_qwen2_vl)
    return load_processor(tiny_qwen2_vl, family), family


@pytest.fixture(scope="session")
def cli_run(tmp_path_factory, tiny_qwen2_vl, caption_data) -> dict:
    """One `vlmtune train CONFIG key=value ...` run as a real command: LoRA, checkpoints every 2
    steps, validation with generation, TensorBoard and SwanLab (local mode, no API key)."""
    root = tmp_path_factory.mktemp("cli_run")
    out = root / "run"
    config = root / "config.yaml"
    config.write_text(
        "model:\n"
        f"  name_or_path: {tiny_qwen2_vl}\n"
        "data:\n"
        f"  train: {caption_data['train']}\n"
        f"  val: {caption_data['val']}\n"
        "lora:\n"
        "  r: 4\n"
        "train:\n"
        "  max_steps: 4\n"
        "  batch_size: 2\n"
        "  grad_accum: 1\n"
        "  logging_steps: 1\n"
        "  save_steps: 2\n"
        "  eval_steps: 2\n"
        "  report_to: [tensorboard, swanlab]\n"
        "  output_dir: will-be-overridden\n"
        "eval:\n"
        "  num_samples: 2\n"
        "  max_new_tokens: 4\n")
    result = run_cli(["train", str(config), f"train.output_dir={out}", "train.learning_rate=0.001",
                      "lora.alpha=8"], HOME=str(root))
    return {"result": result, "out": out, "config": config,
            "overrides": [f"train.output_dir={out}", "train.learning_rate=0.001", "lora.alpha=8"]}


def trained_runs(labels) -> list[list[int]]:
    """The maximal runs of label ids that are not IGNORE_INDEX (-100), in order."""
    from vlmtune.data.encode import IGNORE_INDEX

    runs, current = [], []
    for value in labels.tolist():
        if value == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(value)
    if current:
        runs.append(current)
    return runs
