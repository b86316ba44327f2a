"""`vlmtune ui`: a web UI for runs, on 127.0.0.1 (Gradio, offline, no share links, no analytics).

    vlmtune ui runs/latex                  # one run
    vlmtune ui runs/                       # every run under a folder
    vlmtune ui runs/latex runs/coco --port 7861

Tabs:
- Chat: pick a run, a checkpoint or its base, upload images, talk; answers stream. *Compare* answers
  the same question with the base model and the tuned one side by side.
- Evaluations: a run's `eval/compare.json` as a before/after table, and `eval/NAME/predictions.jsonl`
  with the images, filterable to the wrong answers and sortable by a per-sample score.
- Runs: the runs found, with loss and metric curves from `RUN/metrics.jsonl`, re-read every few seconds
  while a run trains, and a link to its `report.html`.
- Train: start `vlmtune train` from a shipped or uploaded config, a few fields editable, as a separate
  process; its log and progress; Stop sends Ctrl-C (vlmtune saves a checkpoint and exits with 130).

The UI is thin: every answer comes from `vlmtune.generation` (`load_generator`, `Generator.stream`),
the module `eval`, `predict`, `chat` and `serve` answer through, so the UI answers as they do. The
reading of run folders (`find_runs`, `read_curves`, `read_predictions`, `select_predictions`) is plain
Python, tested without a browser.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

from vlmtune.errors import VlmtuneError
from vlmtune.listen import bind, stop_on_sigterm

CHECKPOINT_PREFIX = "checkpoint-"
# Rows of predictions drawn at once: each carries its image(s) inline.
MAX_PREDICTION_ROWS = 200


# -- reading run folders ---------------------------------------------------------------------------

def is_run(folder: Path) -> bool:
    """A folder `vlmtune train` wrote: metrics.jsonl, final/ or checkpoint-N/."""
    return folder.is_dir() and ((folder / "metrics.jsonl").is_file() or (folder / "final").is_dir()
                                or any(folder.glob(f"{CHECKPOINT_PREFIX}*")))


def find_runs(paths: list[str]) -> list[Path]:
    """The runs named by `paths`: a run itself, or the runs one or two levels under a folder."""
    runs: list[Path] = []
    for p in map(Path, paths):
        if is_run(p):
            found = [p]
        elif p.is_dir():
            found = sorted({r for r in [*p.glob("*"), *p.glob("*/*")] if is_run(r)})
        else:
            found = []
        runs += [r for r in found if r not in runs]
    return runs


def checkpoints(run: Path) -> list[Path]:
    """A run's checkpoint-N folders, oldest first."""
    found = [c for c in run.glob(f"{CHECKPOINT_PREFIX}*") if c.is_dir() and c.name[len(CHECKPOINT_PREFIX):].isdigit()]
    return sorted(found, key=lambda c: int(c.name[len(CHECKPOINT_PREFIX):]))


def chat_sources(paths: list[str]) -> list[str]:
    """What the Chat tab can load: each run (its final weights or newest checkpoint), then each of its
    checkpoints; an argument that is neither a run nor a folder of runs (a checkpoint, a model folder,
    a hub id) as given."""
    sources: list[str] = []
    for p in paths:
        runs = find_runs([p])
        if not runs:
            runs_sources = [p]
        else:
            runs_sources = [s for r in runs for s in [str(r), *map(str, checkpoints(r))]]
        sources += [s for s in runs_sources if s not in sources]
    return sources


def _number(value) -> float | None:
    """A finite float, or None (null, text, NaN, infinity)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def read_curves(run: Path) -> dict[str, list[tuple[int, float | None]]]:
    """Every numeric series in `run/metrics.jsonl` as `{name: [(step, value), ...]}`.

    Non-finite values were written as null (`JsonlMetrics`); they stay None here, so a curve shows a
    gap where training diverged rather than a made-up number. A half-written last line (a run still
    writing) is skipped.
    """
    path = Path(run) / "metrics.jsonl"
    curves: dict[str, list[tuple[int, float | None]]] = {}
    if not path.is_file():
        return curves
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        step = record.get("step")
        if not isinstance(step, int):
            continue
        nonfinite = record.get("nonfinite") or {}
        for key, value in record.items():
            if key in ("step", "epoch", "time", "nonfinite"):
                continue
            if value is None and key not in nonfinite:
                continue
            if value is not None and _number(value) is None:
                continue
            curves.setdefault(key, []).append((step, _number(value)))
    return curves


def curve_rows(curves: dict[str, list[tuple[int, float | None]]], names: list[str] | None = None) -> list[dict]:
    """Long-format rows `{step, value, series}` for a line plot; None values are left out (a gap)."""
    return [{"step": step, "value": value, "series": name}
            for name, points in curves.items() if names is None or name in names
            for step, value in points if value is not None]


def run_summary(run: Path) -> dict:
    """One row of the Runs table: name, steps logged, last loss, saved checkpoints, final, report."""
    curves = read_curves(run)
    loss = [v for _, v in curves.get("loss", []) if v is not None]
    steps = max((s for points in curves.values() for s, _ in points), default=0)
    return {"run": str(run), "steps": steps, "last loss": round(loss[-1], 4) if loss else None,
            "checkpoints": len(checkpoints(run)), "final": (run / "final").is_dir(),
            "report": (run / "report.html").is_file()}


def eval_names(run: Path) -> list[str]:
    """The evaluations of a run: folders under RUN/eval holding predictions.jsonl."""
    folder = Path(run) / "eval"
    return sorted(p.parent.name for p in folder.glob("*/predictions.jsonl")) if folder.is_dir() else []


def compare_rows(run: Path) -> list[list]:
    """The before/after table of `RUN/eval/compare.json` (metric, before, after, change); or, without
    one, each evaluation's metrics.json as a column-free list (metric, value, evaluation)."""
    from vlmtune.metrics.tasks import lower_is_better

    compare = Path(run) / "eval" / "compare.json"
    if compare.is_file():
        data = json.loads(compare.read_text(encoding="utf-8"))
        before, after = data["metrics"][data["before"]], data["metrics"][data["after"]]
        rows = []
        for key, value in after.items():
            if key in before:
                delta = value - before[key]
                better = delta < 0 if lower_is_better(key) else delta > 0
                mark = "" if abs(delta) < 1e-12 else (" better" if better else " worse")
                rows.append([key, round(before[key], 4), round(value, 4), f"{delta:+.4f}{mark}"])
        return rows
    rows = []
    for name in eval_names(run):
        metrics_file = Path(run) / "eval" / name / "metrics.json"
        if metrics_file.is_file():
            for key, value in json.loads(metrics_file.read_text(encoding="utf-8"))["metrics"].items():
                rows.append([key, None, round(value, 4), name])
    return rows


def read_predictions(run: Path, name: str) -> list[dict]:
    """The rows of `RUN/eval/NAME/predictions.jsonl` (or the partial file of an evaluation still running)."""
    folder = Path(run) / "eval" / name
    path = folder / "predictions.jsonl"
    if not path.is_file():
        path = folder / "predictions.partial.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # the line being written
    return rows


def is_wrong(row: dict) -> bool:
    """A prediction that matches none of its references (exact_match < 1, or unequal text)."""
    exact = (row.get("scores") or {}).get("exact_match")
    if exact is not None:
        return exact < 1
    references = row.get("references") or [row.get("reference", "")]
    return row.get("prediction", "").strip() not in [r.strip() for r in references]


def score_names(rows: list[dict]) -> list[str]:
    """The per-sample score keys found in `rows`, in first-seen order."""
    names: list[str] = []
    for row in rows:
        names += [k for k in (row.get("scores") or {}) if k not in names]
    return names


def select_predictions(rows: list[dict], wrong_only: bool = False, sort_by: str | None = None,
                       descending: bool = False) -> list[dict]:
    """`rows` filtered to the wrong ones and sorted by the per-sample score `sort_by`; rows without that
    score go last, whichever the direction; equal scores keep file order."""
    kept = [r for r in rows if not wrong_only or is_wrong(r)]
    if not sort_by:
        return kept
    scored = [r for r in kept if _number((r.get("scores") or {}).get(sort_by)) is not None]
    unscored = [r for r in kept if _number((r.get("scores") or {}).get(sort_by)) is None]
    scored.sort(key=lambda r: r["scores"][sort_by], reverse=descending)
    return scored + unscored


def _image_tag(path: str, base: Path) -> str:
    """An inline <img> of the picture at `path` (relative paths from the data file's folder, `base`)."""
    p = Path(path)
    if not p.is_absolute():
        p = base / p
    try:
        data = base64.b64encode(p.read_bytes()).decode()
    except OSError:
        return f"<span>missing image {html.escape(str(path))}</span>"
    mime = "image/png" if p.suffix.lower() == ".png" else "image/jpeg"
    return f'<img class="vt-pred-img" src="data:{mime};base64,{data}" style="max-height:112px;max-width:224px">'


def predictions_html(rows: list[dict], base: Path = Path(".")) -> str:
    """An HTML table of predictions: images, prompt, prediction, references, scores."""
    if not rows:
        return "<p>no predictions</p>"
    head = "<tr><th>#</th><th>image</th><th>prompt</th><th>prediction</th><th>reference(s)</th><th>scores</th></tr>"
    body = []
    for row in rows[:MAX_PREDICTION_ROWS]:
        images = "".join(_image_tag(i, base) for i in row.get("images") or [])
        refs = "<br>".join(html.escape(r) for r in row.get("references") or [row.get("reference", "")])
        scores = ", ".join(f"{k} {v:.3f}" if isinstance(v, (int, float)) else f"{k} {v}"
                           for k, v in (row.get("scores") or {}).items())
        mark = "wrong" if is_wrong(row) else "right"
        body.append(f'<tr class="vt-pred vt-{mark}"><td>{row.get("index", "")}</td><td>{images}</td>'
                    f'<td>{html.escape(row.get("prompt", ""))}</td><td>{html.escape(row.get("prediction", ""))}</td>'
                    f"<td>{refs}</td><td>{scores}</td></tr>")
    more = len(rows) - MAX_PREDICTION_ROWS
    tail = f"<p>{more} more not shown</p>" if more > 0 else ""
    return f'<table class="vt-predictions">{head}{"".join(body)}</table>{tail}'


# -- answering --------------------------------------------------------------------------------------

class Models:
    """The generators loaded so far, one per source (loading is slow; answers run one at a time)."""

    def __init__(self, trust_remote_code: bool = False):
        self.trust_remote_code = trust_remote_code
        self._loaded: dict[str, object] = {}
        self._lock = threading.Lock()

    def get(self, source: str):
        from vlmtune.generation import load_generator

        with self._lock:
            if source not in self._loaded:
                self._loaded[source] = load_generator(source, trust_remote_code=self.trust_remote_code)
            return self._loaded[source]

    def base_of(self, source: str):
        """(generator, variant) answering as `source`'s untuned base: the same weights with the adapter
        off for a LoRA run, else the base model loaded with the run's processor settings."""
        from vlmtune.generation import load_generator, target_for

        gen = self.get(source)
        if "base" in gen.names and gen.default != "base":
            return gen, "base"
        key = f"{source}#base"
        with self._lock:
            if key not in self._loaded:
                self._loaded[key] = load_generator(target_for(source, self.trust_remote_code).base(), name="base",
                                                   trust_remote_code=self.trust_remote_code)
            return self._loaded[key], None


def user_message(text: str, images: list[str]) -> dict:
    """An OpenAI-style user message with image parts first, as `chat_sample` reads it."""
    parts = [{"type": "image", "image": str(Path(i).resolve())} for i in images]
    if text:
        parts.append({"type": "text", "text": text})
    return {"role": "user", "content": parts}


def stream_answer(generator, variant: str | None, messages: list[dict], max_new_tokens: int, temperature: float):
    """The answer to `messages` piece by piece, through `Generator.stream`."""
    from vlmtune.generation import Sampling, chat_sample

    sampling = Sampling(temperature=temperature) if temperature > 0 else None
    yield from generator.stream(chat_sample(messages), max_new_tokens, sampling, variant=variant)


# -- training in a subprocess --------------------------------------------------------------------

SHIPPED_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# The fields the Train tab lets one change before starting (dotted overrides of `vlmtune train`).
TRAIN_FIELDS = ("model.name_or_path", "data.train", "data.val", "train.output_dir", "train.max_steps",
                "train.learning_rate")


class TrainJob:
    """One `vlmtune train CONFIG key=value ...` in its own process (never in the UI's: a crash or an
    out-of-memory there must not take the UI down), its output in a log file."""

    def __init__(self, config: str, overrides: list[str], log: Path):
        import subprocess

        self.config, self.overrides, self.log = config, overrides, Path(log)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("wb") as out:
            # a session of its own: a Ctrl-C in the UI's terminal reaches the UI only, which then stops
            # the run once (a second SIGINT would make it abort without saving)
            self.process = subprocess.Popen([sys.executable, "-m", "vlmtune.cli", "train", config, *overrides],
                                            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)

    @property
    def output_dir(self) -> Path | None:
        """Where the run writes, from the overrides or the config file."""
        for o in self.overrides:
            if o.startswith("train.output_dir="):
                return Path(o.split("=", 1)[1])
        try:
            from vlmtune.config import load_config

            return Path(load_config(self.config).train.output_dir)
        except Exception:  # a config the training process will reject with its own message
            return None

    def stop(self) -> None:
        """Ctrl-C: vlmtune saves a checkpoint and exits with 130."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)

    def status(self) -> str:
        """`running, step N (loss X)` or `finished: exit code C`."""
        code = self.process.poll()
        out = self.output_dir
        curves = read_curves(out) if out else {}
        steps = max((s for points in curves.values() for s, _ in points), default=0)
        loss = [v for _, v in curves.get("loss", []) if v is not None]
        progress = f"step {steps}" + (f", loss {loss[-1]:.4f}" if loss else "")
        if code is None:
            return f"running (pid {self.process.pid}): {progress}"
        meaning = {0: "done", 130: "stopped; a checkpoint was saved"}.get(code, "failed")
        return f"finished, exit code {code} ({meaning}): {progress}"

    def log_tail(self, chars: int = 6000) -> str:
        text = self.log.read_text(encoding="utf-8", errors="replace") if self.log.is_file() else ""
        return text[-chars:]


def stop_jobs(jobs: list[TrainJob]) -> None:
    """Stop the training runs still going as Ctrl-C does (each saves a checkpoint) and wait for them;
    a Ctrl-C while waiting leaves them running, and says where."""
    running = [job for job in jobs if job.process.poll() is None]
    for job in running:
        print(f"stopping the training run started here (pid {job.process.pid}, {job.output_dir}): it saves a "
              "checkpoint first; Ctrl-C again to leave it running", file=sys.stderr, flush=True)
        job.stop()
    try:
        for job in running:
            job.process.wait()
            print(f"training run {job.output_dir}: {job.status()}", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        for job in running:
            if job.process.poll() is None:
                print(f"left running: pid {job.process.pid}, writing {job.output_dir}, its log {job.log}",
                      file=sys.stderr, flush=True)


def train_overrides(values: dict[str, str]) -> list[str]:
    """`key=value` overrides for the fields given a value (blank ones keep the config's)."""
    return [f"{k}={str(v).strip()}" for k, v in values.items() if v is not None and str(v).strip()]


# -- the app ----------------------------------------------------------------------------------------

def _shown(message: dict) -> list[dict]:
    """A conversation message as the Chatbot shows it: each image as its own bubble, then the text."""
    content = message["content"]
    if isinstance(content, str):
        return [{"role": message["role"], "content": content}]
    shown = [{"role": message["role"], "content": {"path": p["image"]}} for p in content if p["type"] == "image"]
    text = "".join(p["text"] for p in content if p["type"] == "text")
    return shown + ([{"role": message["role"], "content": text}] if text else [])


def build_app(paths: list[str], models: Models | None = None, jobs: list[TrainJob] | None = None):
    """The Gradio Blocks of the UI for the runs named by `paths` (built, not launched); the training
    runs started from the page are appended to `jobs`, newest last."""
    import tempfile

    import gradio as gr

    models = models or Models()
    jobs = [] if jobs is None else jobs
    log_dir = tempfile.mkdtemp(prefix="vlmtune-ui-")
    sources = chat_sources(paths)
    runs = find_runs(paths)
    evaluated = [str(r) for r in runs if eval_names(r)]

    def chat(message, source, compare, max_new_tokens, temperature, convo, convo_base, shown, shown_base):
        message = message or {}
        text, files = (message.get("text") or "").strip(), list(message.get("files") or [])
        if not source:
            raise gr.Error("pick a run, checkpoint or model first")
        if not text and not files:
            raise gr.Error("type a question (and/or attach images)")
        asked = user_message(text, [f if isinstance(f, str) else f["path"] for f in files])
        answering = [(models.get(source), None, convo, shown)]
        if compare:
            base, variant = models.base_of(source)
            answering.append((base, variant, convo_base, shown_base))
        for _, _, c, s in answering:
            c.append(asked)
            s += _shown(asked) + [{"role": "assistant", "content": ""}]
        yield None, shown, shown_base, convo, convo_base
        # the generator answers one call at a time: the tuned model first, then the base
        for generator, variant, c, s in answering:
            answer = ""
            for piece in stream_answer(generator, variant, c, int(max_new_tokens), float(temperature)):
                answer += piece
                s[-1] = {"role": "assistant", "content": answer}
                yield None, shown, shown_base, convo, convo_base
            c.append({"role": "assistant", "content": answer})
            if not answer:
                s[-1] = {"role": "assistant", "content": "(empty answer)"}
        yield None, shown, shown_base, convo, convo_base

    def clear():
        return None, [], [], [], []

    def show_eval(run, name, wrong_only, sort_by, descending):
        if not run:
            return [], gr.update(choices=[], value=None), gr.update(choices=[""], value=""), "<p>no evaluation</p>"
        names = eval_names(Path(run))
        name = name if name in names else (names[-1] if names else None)
        rows = read_predictions(Path(run), name) if name else []
        keys = score_names(rows)
        sort_by = sort_by if sort_by in keys else None
        chosen = select_predictions(rows, wrong_only, sort_by, descending)
        summary = f"<p>{len(chosen)} of {len(rows)} predictions shown ({name})</p>"
        return (compare_rows(Path(run)), gr.update(choices=names, value=name),
                gr.update(choices=[""] + keys, value=sort_by or ""), summary + predictions_html(chosen))

    def show_run(run):
        table = [list(run_summary(r).values()) for r in runs]
        if not run:
            return table, None, None, ""
        curves = read_curves(Path(run))
        import pandas as pd

        losses = [k for k in curves if k.endswith("loss")]
        others = [k for k in curves if k not in losses and k not in ("learning_rate", "grad_norm")
                  and not k.startswith("num_") and not k.endswith(("runtime", "per_second", "_flos"))]
        columns = ["step", "value", "series"]
        report = Path(run) / "report.html"
        link = (f'<a href="/gradio_api/file={html.escape(str(report.resolve()))}" target="_blank">report.html</a>'
                if report.is_file() else "no report.html yet (`vlmtune report RUN` builds it)")
        return (table, pd.DataFrame(curve_rows(curves, losses), columns=columns),
                pd.DataFrame(curve_rows(curves, others), columns=columns), link)

    with gr.Blocks(title="vlmtune") as app:
        gr.Markdown("## vlmtune")
        with gr.Tab("Chat"):
            with gr.Row():
                source = gr.Dropdown(sources, value=sources[0] if sources else None, label="run / checkpoint / model",
                                     elem_id="vt-source", scale=3)
                compare = gr.Checkbox(label="compare with the base model", elem_id="vt-compare")
                max_new_tokens = gr.Slider(1, 1024, value=64, step=1, label="max new tokens")
                temperature = gr.Slider(0, 2, value=0, step=0.05, label="temperature (0: greedy)")
            with gr.Row():
                shown = gr.Chatbot(label="tuned", elem_id="vt-chat", height=380)
                shown_base = gr.Chatbot(label="base", elem_id="vt-chat-base", height=380, visible=False)
            box = gr.MultimodalTextbox(file_types=["image"], file_count="multiple", elem_id="vt-input", label="message",
                                       placeholder="Ask about the image(s) you attach (Enter sends)")
            reset = gr.Button("New conversation", elem_id="vt-clear")
            convo, convo_base = gr.State([]), gr.State([])
            box.submit(chat, [box, source, compare, max_new_tokens, temperature, convo, convo_base, shown, shown_base],
                       [box, shown, shown_base, convo, convo_base])
            reset.click(clear, None, [box, shown, shown_base, convo, convo_base])
            source.change(clear, None, [box, shown, shown_base, convo, convo_base])
            compare.change(lambda on: gr.update(visible=on), compare, shown_base)
        with gr.Tab("Evaluations"):
            with gr.Row():
                eval_run = gr.Dropdown(evaluated, value=evaluated[0] if evaluated else None, label="run",
                                       elem_id="vt-eval-run", allow_custom_value=True)
                eval_name = gr.Dropdown([], label="evaluation", elem_id="vt-eval-name", allow_custom_value=True)
                wrong_only = gr.Checkbox(label="only wrong answers", elem_id="vt-wrong")
                sort_by = gr.Dropdown([""], value="", label="sort by score", elem_id="vt-sort", allow_custom_value=True)
                descending = gr.Checkbox(label="descending")
            table = gr.Dataframe(headers=["metric", "before", "after", "change"], label="before / after",
                                 elem_id="vt-compare-table", interactive=False)
            predictions = gr.HTML(elem_id="vt-predictions")
            controls = [eval_run, eval_name, wrong_only, sort_by, descending]
            for c in controls:  # `input`: the user's changes, not show_eval's own updates
                c.input(show_eval, controls, [table, eval_name, sort_by, predictions])
            app.load(show_eval, controls, [table, eval_name, sort_by, predictions])
        with gr.Tab("Runs"):
            run_table = gr.Dataframe(headers=["run", "steps", "last loss", "checkpoints", "final", "report"],
                                     interactive=False, elem_id="vt-runs")
            run = gr.Dropdown([str(r) for r in runs], value=str(runs[0]) if runs else None, label="run")
            link = gr.HTML(elem_id="vt-report")
            with gr.Row():
                loss_plot = gr.LinePlot(x="step", y="value", color="series", title="loss", elem_id="vt-loss")
                metric_plot = gr.LinePlot(x="step", y="value", color="series", title="metrics")
            timer = gr.Timer(5)  # metrics.jsonl grows while a run trains
            outputs = [run_table, loss_plot, metric_plot, link]
            run.change(show_run, run, outputs)
            timer.tick(show_run, run, outputs)
            app.load(show_run, run, outputs)
        with gr.Tab("Train"):
            shipped = sorted(str(c) for c in SHIPPED_CONFIGS.glob("*.yaml")) if SHIPPED_CONFIGS.is_dir() else []
            with gr.Row():
                config = gr.Dropdown(shipped, value=shipped[0] if shipped else None, label="shipped config",
                                     allow_custom_value=True, elem_id="vt-train-config", scale=2)
                upload = gr.File(label="or upload a config (.yaml)", file_types=[".yaml", ".yml"], scale=1)
            fields = [gr.Textbox(label=f, placeholder="(as in the config)", elem_id="vt-" + f.replace(".", "-"))
                      for f in TRAIN_FIELDS]
            with gr.Row():
                start = gr.Button("Start training", variant="primary", elem_id="vt-train-start")
                stop = gr.Button("Stop (saves a checkpoint)", elem_id="vt-train-stop")
            status = gr.Textbox(label="status", interactive=False, elem_id="vt-train-status")
            log = gr.Textbox(label="log", lines=16, max_lines=16, interactive=False, autoscroll=True,
                             elem_id="vt-train-log")

            def start_training(config_path, uploaded, *values):
                if jobs and jobs[-1].process.poll() is None:
                    raise gr.Error("a training run is going; stop it first")
                chosen = uploaded or config_path
                if not chosen:
                    raise gr.Error("pick a shipped config or upload one")
                job = TrainJob(str(chosen), train_overrides(dict(zip(TRAIN_FIELDS, values))),
                               Path(log_dir) / f"train-{len(jobs) + 1}.log")
                jobs.append(job)
                return job.status(), job.log_tail()

            def stop_training():
                if jobs:
                    jobs[-1].stop()
                return watch_training()

            def watch_training():
                return (jobs[-1].status(), jobs[-1].log_tail()) if jobs else ("no training started", "")

            start.click(start_training, [config, upload, *fields], [status, log])
            stop.click(stop_training, None, [status, log])
            gr.Timer(2).tick(watch_training, None, [status, log])
    return app


def ui_command(runs: list[str], host: str = "127.0.0.1", port: int = 7860, trust_remote_code: bool = False) -> int:
    """Open a web UI (Chat, Evaluations, Runs, Train) for runs, on this machine only unless --host says otherwise.

    Args:
        runs: Run folders, folders holding runs, checkpoints or model folders (default: ./runs).
        host: Address to listen on; 127.0.0.1 keeps it on this machine, 0.0.0.0 opens it to the network.
        port: Port to listen on.
        trust_remote_code: Run model code from the model folder (needed by some families).

    Raises:
        VlmtuneError: gradio is not installed, or nothing to show.
    """
    # before gradio is imported: it reads these at import time
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    try:
        import gradio as gr
    except ImportError:
        raise VlmtuneError("vlmtune ui needs gradio: pip install 'vlmtune[ui]'") from None
    paths = list(runs) or (["runs"] if Path("runs").is_dir() else [])
    if not paths:
        raise VlmtuneError("give a run folder, a folder of runs, a checkpoint or a model (no ./runs here)")
    hub_id = lambda p: p.count("/") == 1 and not p.startswith((".", "/", "~"))  # noqa: E731 (loaded on first chat)
    missing = [p for p in paths if not Path(p).exists() and not hub_id(p)]
    if missing:
        raise VlmtuneError(f"no such folder: {', '.join(missing)}")
    bind(host, port, "vlmtune ui").close()  # a port in use is said in one line, not as gradio's traceback
    jobs: list[TrainJob] = []
    app = build_app(paths, Models(trust_remote_code), jobs)
    # the browser gets no fonts or scripts from the internet: system fonts only
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])
    allowed = [str(r.resolve()) for r in find_runs(paths)]  # report.html links
    previous = signal.signal(signal.SIGTERM, stop_on_sigterm)  # before the server starts: no moment without it
    try:
        print(f"vlmtune ui on http://{host}:{port}", flush=True)
        app.queue().launch(server_name=host, server_port=port, share=False, theme=theme, allowed_paths=allowed,
                           ssr_mode=False, mcp_server=False, quiet=True, footer_links=[], prevent_thread_lock=True)
        while True:  # until Ctrl-C or SIGTERM
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        app.close()
    stop_jobs(jobs)
    print("vlmtune ui: stopped", file=sys.stderr, flush=True)
    return 0
