"""Training curves from metrics.jsonl, drawn with matplotlib and returned as PNG data URIs.

`Figure` is used directly instead of pyplot: no global figure state and no GUI backend, so the
report builds the same on a headless server, in a thread, or next to a notebook.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from vlmtune.report.run import series

DPI = 100
TRAIN_COLOUR, EVAL_COLOUR, OTHER_COLOUR = "#1f6fb4", "#e0701b", "#2a9d5c"


@dataclass
class Plot:
    title: str
    uri: str  # data:image/png;base64,...
    size: str  # "wide" (the loss) or "small"


def png_uri(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _axes(width: float, height: float, title: str, ylabel: str | None = None):
    fig = Figure(figsize=(width, height), layout="constrained")
    ax = fig.subplots()
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step", fontsize=9)
    if ylabel:
        ax.set_ylabel(ylabel, fontsize=9)
    ax.tick_params(labelsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    ax.grid(True, alpha=0.3)
    return fig, ax


def _line(ax, steps, values, colour, label=None):
    # markers make a short run (a handful of logs) readable; on long runs they are clutter
    marker = "o" if len(values) <= 30 else None
    ax.plot(steps, values, color=colour, marker=marker, markersize=3, linewidth=1.5, label=label)


def curves(records: list[dict[str, float]]) -> list[Plot]:
    """Loss (train and eval on the same axes), learning rate, grad norm, DPO's margin and GRPO's
    rewards and KL, and one small plot per `val_*` metric; a curve with no points is left out."""
    plots = []
    loss, eval_loss = series(records, "loss"), series(records, "eval_loss")
    if loss[0] or eval_loss[0]:
        fig, ax = _axes(7.2, 3.4, "Loss", "loss")
        if loss[0]:
            _line(ax, *loss, TRAIN_COLOUR, "train loss")
        if eval_loss[0]:
            _line(ax, *eval_loss, EVAL_COLOUR, "eval loss")
        ax.legend(fontsize=8)
        plots.append(Plot("Loss", png_uri(fig), "wide"))
    for key, title in (("learning_rate", "Learning rate"), ("grad_norm", "Gradient norm")):
        steps, values = series(records, key)
        if steps:
            fig, ax = _axes(4.6, 3.4, title)
            _line(ax, steps, values, TRAIN_COLOUR)
            if key == "learning_rate":
                ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
            plots.append(Plot(title, png_uri(fig), "small"))
    # DPO's chosen/rejected margin, GRPO's reward (and each reward's mean when there are several)
    rl_keys = ["rewards/margins", "reward", "kl"]
    rl_keys += sorted({k for r in records for k in r if k.startswith("rewards/") and k.endswith("/mean")})
    for key in rl_keys:
        steps, values = series(records, key)
        if steps:
            fig, ax = _axes(4.6, 3.4, {"reward": "Reward (sampled answers)", "rewards/margins": "DPO margin"}.get(key, key))
            _line(ax, steps, values, TRAIN_COLOUR)
            plots.append(Plot(key, png_uri(fig), "small"))
    val_keys = sorted({k for r in records for k in r if k.startswith("val_")})
    for key in val_keys:
        steps, values = series(records, key)
        if steps:
            fig, ax = _axes(3.4, 2.5, key)
            _line(ax, steps, values, OTHER_COLOUR)
            plots.append(Plot(key, png_uri(fig), "small"))
    return plots
