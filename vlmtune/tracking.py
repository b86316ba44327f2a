"""Send validation predictions to the trackers as images with captions, and to `samples/`.

Scalars reach SwanLab, TensorBoard and W&B through transformers' own callbacks (`report_to`);
what those do not log is the (image, prediction, reference) triple the tutorials look at by hand.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

MAX_IMAGES = 8


def start_trackers(config, out: Path) -> None:
    """Point the trackers at the run folder. SwanLab without an API key logs locally
    (`swanlab watch RUN/swanlog` serves the dashboard), as the tutorials' users expect offline."""
    t = config.train
    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(out / "tensorboard"))
    os.environ.setdefault("WANDB_PROJECT", t.project)
    if "swanlab" in t.report_to:
        import swanlab

        from vlmtune.config import config_to_dict

        # transformers' callback calls swanlab.get_run(), which raises in swanlab 0.10 when no run
        # exists yet: starting the run here also gives it the full vlmtune config.
        mode = os.environ.get("SWANLAB_MODE") or ("online" if os.environ.get("SWANLAB_API_KEY") else "local")
        swanlab.init(project=t.project, name=t.run_name or out.name, mode=mode, log_dir=str(out / "swanlog"),
                     config=config_to_dict(config), reinit=True)


def _swanlab_run():
    import swanlab

    try:
        return swanlab.get_run()
    except RuntimeError:  # swanlab 0.10: no active run
        return None


def _caption(row: dict) -> str:
    more = len(row.get("references") or [None]) - 1  # an evaluation item can have several references
    reward = f"\nreward: {row['scores']['reward']:.3f}" if "reward" in (row.get("scores") or {}) else ""
    return f"pred: {row['prediction']}\nref:  {row['reference']}" + (f" (+{more} more)" if more > 0 else "") + reward


def write_samples_file(out_dir: Path, rows: list[dict], step: int, folder: str = "samples") -> Path:
    folder = Path(out_dir) / folder
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step:06d}.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def log_predictions(trainer, rows: list[dict], step: int, tag: str = "val", folder: str = "samples") -> None:
    """Log up to MAX_IMAGES triples to every active tracker (under `tag`/) and all rows to RUN/`folder`/.
    GRPO logs its sampled answers with their rewards as tag "train", folder "completions"."""
    write_samples_file(Path(trainer.args.output_dir), rows, step, folder)
    report_to = trainer.args.report_to or []
    shown = [r for r in rows if r["images"]][:MAX_IMAGES]
    if not shown:
        return
    if "swanlab" in report_to:
        import swanlab

        if _swanlab_run() is not None:
            swanlab.log({f"{tag}/predictions": [swanlab.Image(r["images"][0], caption=_caption(r)) for r in shown]},
                        step=step)
    if "tensorboard" in report_to:
        from transformers.integrations import TensorBoardCallback

        for cb in trainer.callback_handler.callbacks:
            writer = getattr(cb, "tb_writer", None) if isinstance(cb, TensorBoardCallback) else None
            if writer is None:
                continue
            for i, r in enumerate(shown):
                with Image.open(r["images"][0]) as im:
                    pixels = np.asarray(im.convert("RGB"))
                writer.add_image(f"{tag}/image_{i}", pixels, step, dataformats="HWC")
                writer.add_text(f"{tag}/prediction_{i}", _caption(r).replace("\n", "  \n"), step)
            writer.flush()
    if "wandb" in report_to:
        import wandb

        if wandb.run is not None:
            wandb.log({f"{tag}/predictions": [wandb.Image(r["images"][0], caption=_caption(r)) for r in shown]}, step=step)
