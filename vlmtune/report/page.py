"""The report's HTML, one section per function, from the values `run.read_run` returns.

Everything from the run folder (config text, predictions, references, file names) goes through
`esc`: predictions are model output and routinely hold `<`, `&` and LaTeX. Images are inlined
as base64 data URIs so the file opens offline and can be mailed or attached to an issue.
"""

from __future__ import annotations

import base64
import difflib
import html
import io
import re
import time
from datetime import datetime
from pathlib import Path

from PIL import Image, ImageOps

from vlmtune.metrics import lower_is_better
from vlmtune.report.plots import Plot
from vlmtune.report.run import Evaluation, RunData, last, read_jsonl, section, to_float

GRID_SAMPLES = 24  # predictions shown in the image grid
STRIP_SAMPLES = 4  # validation samples followed through training
STRIP_STEPS = 8  # at most this many steps per followed sample (first and last always)
THUMB_SIZE = 224
# Metrics where a decrease is an improvement; every other metric is better when higher.


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def fmt(value) -> str:
    number = to_float(value)
    if number is None:
        return "—" if value is None else str(value)
    if number == int(number) and abs(number) < 1e9:
        return str(int(number))
    return f"{number:.4g}"


def fmt_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


def fmt_time(stamp: float) -> str:
    return datetime.fromtimestamp(stamp).strftime("%Y-%m-%d %H:%M")




def header(run: RunData) -> str:
    model, data, train = section(run.config, "model"), section(run.config, "data"), section(run.config, "train")
    lora, evaluation = section(run.config, "lora"), section(run.config, "eval")
    name = train.get("run_name") or run.folder.resolve().name
    method = str(train.get("method", "—"))
    if method in ("lora", "dora", "qlora") and lora:
        method += f" (r={lora.get('r')}, alpha={lora.get('alpha')})"
    dataset = str(data.get("train") or "—")
    if data.get("val"):
        dataset += f" · val {data['val']}"
    elif to_float(data.get("val_size")):
        dataset += f" · val split {data['val_size']}"
    times = [r["time"] for r in run.metrics if "time" in r]
    when = fmt_time(times[0]) if times else fmt_time(run.config_mtime)
    if times and fmt_time(times[-1]) != when:
        end = fmt_time(times[-1])
        when += f" → {end[11:] if end[:10] == when[:10] else end}"  # the end's date only when it differs
    runtime = last(run.metrics, "train_runtime")
    if runtime is None and len(times) > 1:
        runtime = times[-1] - times[0]
    final_loss = last(run.metrics, "train_loss")
    if final_loss is None:
        final_loss = last(run.metrics, "loss")
    steps, epoch = last(run.metrics, "step"), last(run.metrics, "epoch")
    facts = [
        ("model", model.get("name_or_path") or "—"),
        ("method", method),
        ("dataset", dataset),
        ("task", evaluation.get("task") or "generic"),
        ("when", when),
        ("steps", "—" if steps is None else fmt(steps) + ("" if epoch is None else f" ({epoch:.2f} epochs)")),
        ("training time", "—" if runtime is None else fmt_duration(runtime)),
        ("final train loss", fmt(final_loss)),
    ]
    eval_loss = last(run.metrics, "eval_loss")
    if eval_loss is not None:
        facts.append(("final eval loss", fmt(eval_loss)))
    tokens = last(run.metrics, "num_input_tokens_seen")
    if tokens is not None:
        facts.append(("tokens seen", f"{int(tokens):,}"))
    items = "".join(f"<div><dt>{esc(k)}</dt><dd>{esc(v)}</dd></div>"
                    for k, v in facts)
    return (f"<header><h1>{esc(name)}</h1><p class=\"path\">{esc(run.folder.resolve())}</p>"
            f"<dl class=\"facts\">{items}</dl></header>")


def config_section(run: RunData) -> str:
    return ("<section><details><summary>Resolved config (vlmtune.yaml)</summary>"
            f"<pre class=\"config\">{esc(run.config_text)}</pre></details></section>")


def curves_section(plots: list[Plot]) -> str:
    if not plots:
        return ""
    images = "".join(f"<figure class=\"{p.size}\"><img src=\"{p.uri}\" alt=\"{esc(p.title)}\"></figure>"
                     for p in plots)
    return f"<section><h2>Training curves</h2><div class=\"plots\">{images}</div></section>"


def change_cell(metric: str, before, after) -> str:
    b, a = to_float(before), to_float(after)
    if a is None or b is None:
        return "<td class=\"same\">—</td>"
    delta = a - b
    if delta == 0:
        return "<td class=\"same\">= 0</td>"
    better = (delta < 0) == lower_is_better(metric)
    arrow = "▲" if delta > 0 else "▼"
    relative = f" ({delta / abs(b):+.0%})" if b else ""
    return f"<td class=\"{'better' if better else 'worse'}\">{arrow} {delta:+.4g}{esc(relative)}</td>"


def compare_section(run: RunData) -> str:
    compare = run.compare
    if not compare:
        return ""
    before, after = str(compare.get("before", "before")), str(compare.get("after", "after"))
    by_name = compare.get("metrics") if isinstance(compare.get("metrics"), dict) else {}
    b_metrics = by_name.get(before) if isinstance(by_name.get(before), dict) else {}
    a_metrics = by_name.get(after) if isinstance(by_name.get(after), dict) else {}
    names = list(dict.fromkeys([*b_metrics, *a_metrics]))
    if not names:
        return ""
    rows = "".join(f"<tr><th>{esc(m)}{' <small>(lower is better)</small>' if lower_is_better(m) else ''}</th>"
                   f"<td>{esc(fmt(b_metrics.get(m)))}</td><td>{esc(fmt(a_metrics.get(m)))}</td>"
                   f"{change_cell(m, b_metrics.get(m), a_metrics.get(m))}</tr>" for m in names)
    task = f" · task {esc(compare['task'])}" if compare.get("task") else ""
    started = (run.config.get("model") or {}).get("name_or_path") if isinstance(run.config, dict) else None
    base = f"before: {esc(before)}" + (f" <small>({esc(started)})</small>" if before == "base" and started else "")
    return (f"<section><h2>Before / after</h2><p class=\"note\">eval/compare.json{task}</p>"
            f"<table class=\"compare\"><thead><tr><th>metric</th><th>{base}</th>"
            f"<th>after: {esc(after)}</th><th>change</th></tr></thead><tbody>{rows}</tbody></table></section>")


def _eval_order(name: str) -> tuple:
    if name == "base":
        return (0, 0, name)
    match = re.fullmatch(r"checkpoint-(\d+)", name)
    if match:
        return (1, int(match.group(1)), name)
    return (3, 0, name) if name == "final" else (2, 0, name)


def evaluations_section(run: RunData) -> str:
    evals = [e for e in sorted(run.evaluations.values(), key=lambda e: _eval_order(e.name)) if e.info]
    if not evals:
        return ""
    metric_names = list(dict.fromkeys(m for e in evals for m in (e.info.get("metrics") or {})))
    head = "".join(f"<th>{esc(m)}</th>" for m in ["evaluation", "task", "n", "adapter", *metric_names])
    rows = []
    for e in evals:
        metrics = e.info.get("metrics") or {}
        adapter = e.info.get("adapter")
        cells = [esc(e.name), esc(e.info.get("task") or "—"), esc(fmt(e.info.get("n"))),
                 esc(Path(adapter).name if adapter else "none (base model)")]
        cells += [esc(fmt(metrics.get(m))) for m in metric_names]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return (f"<section><h2>Evaluations</h2><div class=\"scroll\"><table><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table></div></section>")


def diff_html(reference: str, prediction: str) -> str:
    """The prediction with character-level differences to the reference marked: text the
    prediction lacks in <ins class="miss">, text it has in excess in <del class="extra">
    (the edits that would turn the prediction into the reference)."""
    out = []
    for ref_part, pred_part in diff_segments(reference, prediction):
        if ref_part == pred_part:
            out.append(esc(pred_part))
            continue
        if pred_part:
            out.append(f"<del class=\"extra\" title=\"extra in the prediction\">{esc(pred_part)}</del>")
        if ref_part:
            out.append(f"<ins class=\"miss\" title=\"missing from the prediction\">{esc(ref_part)}</ins>")
    return "".join(out)


def diff_segments(reference: str, prediction: str) -> list[tuple[str, str]]:
    """(reference part, prediction part) pairs from difflib's opcodes; equal parts are equal pairs.

    A match of one or two characters between two changes ("squa[r]e" against "ci[r]cle") is
    folded into one change: marking it reads as noise, while "square -> circle" reads as a word.
    """
    segments: list[list[str]] = []  # [ref, pred, "equal" | "change"]
    matcher = difflib.SequenceMatcher(None, reference, prediction, autojunk=False)
    for op, r1, r2, p1, p2 in matcher.get_opcodes():
        segments.append([reference[r1:r2], prediction[p1:p2], "equal" if op == "equal" else "change"])
    for i in range(1, len(segments) - 1):
        if segments[i][2] == "equal" and len(segments[i][0]) <= 2 and \
                segments[i - 1][2] == segments[i + 1][2] == "change":
            segments[i][2] = "change"
    merged: list[list[str]] = []
    for ref, pred, kind in segments:
        if merged and kind == "change" and merged[-1][2] == "change":
            merged[-1][0] += ref
            merged[-1][1] += pred
        else:
            merged.append([ref, pred, kind])
    return [(ref, pred) for ref, pred, _ in merged]


def references_of(record: dict) -> list[str]:
    """Every accepted answer of a row: `references` (a list, written since evaluation items have
    several), else `reference` (one, or a list in files written by hand)."""
    ref = record.get("references") if isinstance(record.get("references"), list) else record.get("reference")
    refs = ref if isinstance(ref, list) else [ref]
    return [str(r) for r in refs if r is not None] or [""]


def other_references(references: list[str], shown: str) -> str:
    """The references not shown in full, folded away in a <details> (no script needed)."""
    others = list(references)
    others.remove(shown)
    if not others:
        return ""
    items = "".join(f"<li>{esc(r)}</li>" for r in others)
    return f"<details class=\"refs\"><summary>+{len(others)} more</summary><ul>{items}</ul></details>"


def closest(references: list[str], prediction: str) -> str:
    return max(references, key=lambda r: difflib.SequenceMatcher(None, r, prediction, autojunk=False).ratio())


def is_exact(record: dict) -> bool:
    score = to_float((record.get("scores") or {}).get("exact_match"))
    if score is not None:
        return score >= 0.5
    prediction = str(record.get("prediction") or "").strip()
    return any(prediction == r.strip() for r in references_of(record))


def mark(exact: bool) -> str:
    return "<span class=\"mark ok\" title=\"exact match\">✓</span>" if exact else \
        "<span class=\"mark bad\" title=\"not an exact match\">✗</span>"


class Thumbnails:
    """Downscaled images as data URIs, each file read once per report."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.cache: dict[str, str] = {}

    def resolve(self, name: str) -> Path | None:
        path = Path(name)
        candidates = [path] if path.is_absolute() else [self.folder / path, Path.cwd() / path]
        return next((p for p in candidates if p.is_file()), None)

    def img(self, name: str) -> str:
        if name not in self.cache:
            self.cache[name] = self._render(str(name))
        return self.cache[name]

    def _render(self, name: str) -> str:
        path = self.resolve(name)
        if path is None:
            return f"<div class=\"noimg\">image not found:<br>{esc(Path(name).name)}</div>"
        try:
            with Image.open(path) as image:
                jpeg = image.format == "JPEG"
                image = ImageOps.exif_transpose(image)
                image.thumbnail((THUMB_SIZE, THUMB_SIZE))
                if image.mode in ("RGBA", "LA", "P"):
                    image = image.convert("RGBA")
                    white = Image.new("RGBA", image.size, (255, 255, 255, 255))
                    image = Image.alpha_composite(white, image)
                image = image.convert("RGB" if image.mode != "L" else "L")
                buffer = io.BytesIO()
                # photos stay JPEG (a tenth of the size); drawings and scans stay lossless
                image.save(buffer, format="JPEG" if jpeg else "PNG", **({"quality": 85} if jpeg else {}))
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            return f"<div class=\"noimg\">unreadable image:<br>{esc(path.name)}<br>{esc(type(e).__name__)}</div>"
        uri = f"data:image/{'jpeg' if jpeg else 'png'};base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
        return f"<img class=\"thumb\" src=\"{uri}\" alt=\"{esc(path.name)}\">"

    def of(self, record: dict) -> str:
        images = record.get("images") or []
        images = images if isinstance(images, list) else [images]
        return "".join(self.img(str(i)) for i in images[:3]) or "<div class=\"noimg\">no image</div>"


LEGEND = ("<p class=\"legend\">In predictions, <ins class=\"miss\">text like this</ins> is missing (it is in the "
          "reference) and <del class=\"extra\">text like this</del> is extra (not in the reference). "
          "✓ exact match, ✗ not.</p>")


def grid_section(run: RunData, thumbs: Thumbnails) -> str:
    with_predictions = [e for e in run.evaluations.values() if e.predictions]
    if not with_predictions:
        return ""
    chosen: Evaluation = run.evaluations.get("final") if (run.evaluations.get("final") and
                                                          run.evaluations["final"].predictions) else \
        max(with_predictions, key=lambda e: e.predictions.stat().st_mtime)
    records, skipped = read_jsonl(chosen.predictions)
    if skipped:
        run.skipped[str(chosen.predictions.relative_to(run.folder))] = skipped
    if not records:
        return ""
    cards = []
    for number, record in enumerate(records[:GRID_SAMPLES]):
        prediction = str(record.get("prediction") or "")
        refs = references_of(record)
        reference = closest(refs, prediction)
        exact = is_exact(record)
        scores = record.get("scores") or {}
        score_text = " · ".join(f"{esc(k)} {esc(fmt(v))}" for k, v in scores.items() if k != "exact_match")
        label = f"closest of {len(refs)} references" if len(refs) > 1 else "reference"
        cards.append(
            f"<div class=\"card {'ok' if exact else 'bad'}\"><div class=\"thumbs\">{thumbs.of(record)}</div>"
            f"<div class=\"meta\">{mark(exact)} #{esc(record.get('index', number))} "
            f"<span class=\"source\">{esc(record.get('source', ''))}</span></div>"
            f"<div class=\"label\">{label}</div><div class=\"text\">{esc(reference)}</div>"
            f"{other_references(refs, reference)}"
            f"<div class=\"label\">prediction</div><div class=\"text\">{diff_html(reference, prediction)}</div>"
            + (f"<div class=\"scores\">{score_text}</div>" if score_text else "") + "</div>")
    shown = f"first {len(cards)} of {len(records)}" if len(records) > len(cards) else f"all {len(records)}"
    return (f"<section><h2>Predictions: eval/{esc(chosen.name)}</h2><p class=\"note\">{shown} samples of "
            f"{esc(chosen.predictions.relative_to(run.folder))}</p>{LEGEND}<div class=\"grid\">{''.join(cards)}</div>"
            "</section>")


def spread(items: list, k: int) -> list:
    """At most k items, evenly spaced, the first and the last always among them."""
    if len(items) <= k:
        return items
    return [items[round(i * (len(items) - 1) / (k - 1))] for i in range(k)]


def samples_section(run: RunData, thumbs: Thumbnails) -> str:
    if not run.samples:
        return ""
    steps = []  # (step, {index: record})
    for step, path in spread(run.samples, STRIP_STEPS):
        records, skipped = read_jsonl(path)
        if skipped:
            run.skipped[str(path.relative_to(run.folder))] = skipped
        steps.append((step, {r.get("index", i): r for i, r in enumerate(records)}))
    # the same validation samples are generated on at every step; follow the first few
    followed = list(dict.fromkeys(i for _, by_index in steps for i in by_index))[:STRIP_SAMPLES]
    rows = []
    for index in followed:
        seen = [(step, by_index[index]) for step, by_index in steps if index in by_index]
        first = seen[0][1]
        reference = references_of(first)
        history = "".join(
            f"<tr><th>step {step}</th><td>{mark(is_exact(r))}</td><td class=\"text\">"
            f"{diff_html(closest(reference, str(r.get('prediction') or '')), str(r.get('prediction') or ''))}</td></tr>"
            for step, r in seen)
        rows.append(f"<div class=\"follow\"><div class=\"thumbs\">{thumbs.of(first)}</div><div class=\"history\">"
                    f"<div class=\"meta\">#{esc(index)} <span class=\"source\">{esc(first.get('source', ''))}</span>"
                    f"</div><div class=\"label\">{'references' if len(reference) > 1 else 'reference'}</div>"
                    f"<div class=\"text\">{esc(reference[0])}</div>{other_references(reference, reference[0])}"
                    f"<table class=\"steps\">{history}</table></div></div>")
    if not rows:
        return ""
    return (f"<section><h2>How predictions changed during training</h2><p class=\"note\">{len(followed)} fixed "
            f"validation samples at {len(steps)} of {len(run.samples)} logged steps (samples/)</p>"
            f"{''.join(rows)}</section>")


def footer(run: RunData) -> str:
    from vlmtune import __version__

    notes = "".join(f"<li>{esc(path)}: skipped {n} unreadable line(s)</li>" for path, n in run.skipped.items())
    return (f"<footer>{'<ul>' + notes + '</ul>' if notes else ''}Generated by vlmtune {esc(__version__)} on "
            f"{fmt_time(time.time())}; rebuild with <code>vlmtune report {esc(run.folder)}</code></footer>")


CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d2330;
       background: #f5f6f8; margin: 0; }
main { max-width: 1240px; margin: 0 auto; padding: 20px 24px 40px; }
h1 { margin: 0; font-size: 26px; } h2 { font-size: 19px; margin: 0 0 10px; }
section, header { background: #fff; border: 1px solid #dde1e7; border-radius: 8px; padding: 16px 20px;
                  margin-bottom: 16px; }
.path, .note, footer, small, .source, .scores { color: #667085; }
.path { margin: 2px 0 12px; font-size: 12px; }
.facts { display: grid; grid-template-columns: repeat(auto-fill, minmax(220px, 1fr)); gap: 8px 20px; margin: 0; }
.facts dt { font-size: 11px; text-transform: uppercase; letter-spacing: .04em; color: #667085; }
.facts dd { margin: 0; font-weight: 600; overflow-wrap: anywhere; }
summary { cursor: pointer; font-weight: 600; font-size: 16px; }
pre.config { background: #f7f8fa; padding: 10px; border-radius: 6px; font-size: 12px; max-height: 480px;
             overflow: auto; }
.plots { display: flex; flex-wrap: wrap; gap: 10px; align-items: flex-start; }
.plots figure { margin: 0; } .plots img { display: block; max-width: 100%; border: 1px solid #eceff3; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { padding: 5px 12px; border-bottom: 1px solid #eceff3; text-align: left; vertical-align: top; }
thead th { background: #f7f8fa; font-size: 12px; }
.scroll { overflow-x: auto; }
td.better { color: #137333; font-weight: 600; background: #e6f4ea; }
td.worse { color: #b3261e; font-weight: 600; background: #fce8e6; }
td.same { color: #667085; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(270px, 1fr)); gap: 12px; }
.card { border: 1px solid #dde1e7; border-left: 4px solid #b3261e; border-radius: 6px; padding: 8px;
        min-width: 0; }
.card.ok { border-left-color: #137333; }
.thumbs { display: flex; gap: 4px; justify-content: center; align-items: center; min-height: 60px; }
.thumb { max-width: 100%; max-height: 224px; object-fit: contain; border: 1px solid #eceff3; }
.noimg { padding: 20px 8px; color: #667085; font-size: 12px; text-align: center; }
.meta { margin: 6px 0 2px; font-size: 12px; } .source { font-size: 11px; }
.label { font-size: 11px; text-transform: uppercase; letter-spacing: .04em; color: #667085; margin-top: 4px; }
.text { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; font-size: 12.5px;
        white-space: pre-wrap; overflow-wrap: anywhere; }
.scores { font-size: 11px; margin-top: 6px; }
details.refs summary { font-size: 11px; font-weight: 400; color: #667085; }
details.refs ul { margin: 2px 0; padding-left: 18px; font-size: 12px; }
.mark { font-weight: 700; font-size: 15px; } .mark.ok { color: #137333; } .mark.bad { color: #b3261e; }
ins.miss { background: #d3f0dc; color: #0b5d27; text-decoration: underline; }
del.extra { background: #fbd9d5; color: #a1231b; text-decoration: line-through; }
.legend { font-size: 12px; }
.follow { display: flex; gap: 14px; padding: 10px 0; border-top: 1px solid #eceff3; }
.follow .thumbs { flex: 0 0 auto; width: 180px; align-self: flex-start; }
.follow .thumb { max-height: 160px; }
.history { flex: 1; min-width: 0; }
table.steps th { white-space: nowrap; font-weight: 500; color: #667085; font-size: 12px; }
table.steps td { padding: 4px 8px; }
footer { font-size: 12px; text-align: center; }
"""


def render(run: RunData, plots: list[Plot]) -> str:
    thumbs = Thumbnails(run.folder)
    body = "".join([header(run), config_section(run), curves_section(plots), compare_section(run),
                    evaluations_section(run), grid_section(run, thumbs), samples_section(run, thumbs), footer(run)])
    name = section(run.config, "train").get("run_name") or run.folder.resolve().name
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>vlmtune report: {esc(name)}</title><style>{CSS}</style></head>"
            f"<body><main>{body}</main></body></html>\n")
