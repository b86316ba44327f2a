"""`vlmtune report RUN`: one self-contained report.html for a run folder.

    vlmtune report runs/demo        # writes runs/demo/report.html and prints its path

Reads straight down: run folder (`run.read_run`) -> curves (`plots.curves`) -> HTML
(`page.render`) -> atomic write. The page needs nothing from the network (plots and image
thumbnails are inlined), so it opens offline, from a cluster's scratch disk copied to a laptop,
or attached to an issue. Sections: header (model, method, dataset, steps, time, final loss),
the resolved config, training curves, the before/after table of eval/compare.json, every
eval/*/metrics.json, an image grid of the newest predictions with the differences to the
reference marked, and how a few fixed validation samples changed during training (samples/).
Parts a run does not have yet are left out.
"""

from __future__ import annotations

from pathlib import Path

from vlmtune.fileio import atomic_write_text
from vlmtune.report.page import render
from vlmtune.report.plots import curves
from vlmtune.report.run import read_run

REPORT_NAME = "report.html"


def build_report(run: str | Path) -> Path:
    """Write RUN/report.html from what the run folder holds; returns its path.

    Raises:
        VlmtuneError: no such folder, no vlmtune.yaml in it, or an unreadable JSON file.
    """
    data = read_run(run)
    page = render(data, curves(data.metrics))
    # atomic: a browser (or a sync job) reloading the report never sees half a page; 0644: it is meant to be shared
    return atomic_write_text(data.folder / REPORT_NAME, page, mode=0o644)


def report_command(run: str) -> int:
    """Rebuild report.html for a run folder: curves, before/after metrics, predictions with diffs.

    Args:
        run: Run folder written by `vlmtune train` (it holds vlmtune.yaml and metrics.jsonl).
    """
    print(build_report(run))
    return 0


__all__ = ["build_report", "report_command", "REPORT_NAME"]
