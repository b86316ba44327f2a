"""`vlmtune report`: a self-contained report.html from a hand-built run folder (config, metrics,
evaluations with real PNG images, compare.json, samples/), the same for runs that hold less,
clear errors for folders that are not runs, and a headless-browser render when chromium exists."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from vlmtune import cli
from vlmtune.config import RunConfig, save_config
from vlmtune.errors import VlmtuneError
from vlmtune.report import build_report
from vlmtune.report.page import diff_html
from vlmtune.report.run import read_run

PLOTS = {"Loss", "Learning rate", "Gradient norm", "val_bleu4", "val_cer", "val_exact_match"}
BASE = {"exact_match": 0.1, "cer": 0.5, "bleu4": 0.3456, "cider": 0.1234}
FINAL = {"exact_match": 0.4, "cer": 0.25, "bleu4": 0.2987, "cider": 0.8765}
# (reference, final prediction): exact matches, near misses, and text that must be escaped
SAMPLES = [
    ("a red circle", "a red square"),
    ("a blue triangle", "a blue triangle"),
    ("a green square", "<script>x</script>"),
    ("x < y & z", "x > y && z"),
    (r"\frac{a}{b} < 1", r"\frac{a}{c} < 1"),
    ("two yellow circles", "a yellow circle"),
]
COLOURS = [(220, 40, 40), (40, 80, 220), (40, 170, 80), (240, 200, 30), (150, 60, 200), (20, 20, 20)]


def draw_image(path: Path, colour: tuple[int, int, int], size=(400, 300)) -> None:
    image = Image.new("RGB", size, "white")
    ImageDraw.Draw(image).ellipse((60, 40, 340, 260), fill=colour, outline="black", width=4)
    image.save(path)


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def prediction_record(i: int, images: list[str], reference: str, prediction: str) -> dict:
    exact = float(reference == prediction)
    return {"index": i, "source": f"val.json:{i}", "images": images, "prompt": "Describe the image.",
            "reference": reference, "prediction": prediction,
            "scores": {"exact_match": exact, "cer": 0.0 if exact else 0.5}}


def write_metrics(run: Path) -> None:
    """20 logged steps as the JsonlMetrics callback writes them, strings of numbers included."""
    records = []
    for step in range(1, 21):
        record = {"step": step, "epoch": step / 10, "time": 1_700_000_000 + 3 * step,
                  "loss": 2.5 * 0.9 ** step, "learning_rate": 1e-4 * (1 - step / 20), "grad_norm": 1 + 1 / step,
                  "num_input_tokens_seen": 512 * step}
        if step == 3:
            record["loss"] = str(record["loss"])  # some loggers write numbers as strings
        records.append(record)
        if step % 5 == 0:
            records.append({"step": step, "epoch": step / 10, "time": 1_700_000_000 + 3 * step + 1,
                            "eval_loss": 2.2 * 0.93 ** step, "eval_runtime": 0.5})
        if step % 10 == 0:
            records.append({"step": step, "epoch": step / 10, "time": 1_700_000_000 + 3 * step + 2,
                            "val_exact_match": step / 50, "val_cer": 0.6 - step / 50, "val_bleu4": str(step / 40)})
    records.append({"step": 20, "epoch": 2.0, "time": 1_700_000_070, "train_runtime": 65.5, "train_loss": 0.61,
                    "train_samples_per_second": 9.8})
    write_jsonl(run / "metrics.jsonl", records)


def make_run(root: Path, full: bool = True) -> Path:
    run, data = root / "run", root / "data"
    run.mkdir(parents=True)
    config = RunConfig()
    config.model.name_or_path = "tiny/qwen2-vl"
    config.data.train, config.data.val = str(data / "train.json"), str(data / "val.json")
    config.data.prompt = "<image> & describe"  # escaped in the config section
    config.eval.task = "caption"
    config.train.output_dir = str(run)
    save_config(config, run)
    write_metrics(run)
    if not full:
        return run
    (data / "images").mkdir(parents=True)
    images = []
    for i, colour in enumerate(COLOURS):
        draw_image(data / "images" / f"{i:06d}.png", colour)
        images.append([str(data / "images" / f"{i:06d}.png")])
    for name, metrics, predictions in (("base", BASE, ["an image"] * len(SAMPLES)),
                                       ("final", FINAL, [p for _, p in SAMPLES])):
        (run / "eval" / name).mkdir(parents=True)
        info = {"name": name, "task": "caption", "n": len(SAMPLES), "model": "tiny/qwen2-vl",
                "adapter": str(run / "final") if name == "final" else None, "metrics": metrics}
        (run / "eval" / name / "metrics.json").write_text(json.dumps(info))
        write_jsonl(run / "eval" / name / "predictions.jsonl",
                    [prediction_record(i, images[i], ref, pred) for i, ((ref, _), pred) in
                     enumerate(zip(SAMPLES, predictions))])
    compare = {"task": "caption", "before": "base", "after": "final", "metrics": {"base": BASE, "final": FINAL}}
    (run / "eval" / "compare.json").write_text(json.dumps(compare))
    for step, predictions in ((10, ["a circle", "a triangle", "a square"]),
                              (20, ["a red circle", "a blue triangle", "a green squares"])):
        write_jsonl(run / "samples" / f"step-{step:06d}.jsonl",
                    [prediction_record(i, images[i], SAMPLES[i][0], p) for i, p in enumerate(predictions)])
    return run


class Page(HTMLParser):
    """Collects the parts of report.html the tests look at."""

    def __init__(self, text: str):
        super().__init__()
        self.images: list[dict] = []  # attributes of every <img>
        self.links: list[str] = []  # every src/href value
        self.tags: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if tag == "img":
            self.images.append(attrs)
        self.links += [v for k, v in attrs.items() if k in ("src", "href") and v]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> tuple[Path, Path, str]:
    run = make_run(tmp_path_factory.mktemp("full"))
    path = build_report(run)
    return run, path, path.read_text(encoding="utf-8")


def decode(uri: str) -> Image.Image:
    assert uri.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))


def test_report_is_one_offline_file_with_plots_and_thumbnails(full_run):
    run, path, text = full_run
    assert path == run / "report.html"
    assert sorted(p.name for p in run.iterdir()) == ["eval", "metrics.jsonl", "report.html", "samples",
                                                     "vlmtune.yaml"]  # no temp file left behind
    page = Page(text)
    assert page.links and all(link.startswith("data:image/") for link in page.links)
    assert not re.search(r"(?:src|href|url)\s*[=(]\s*[\"']?\s*(?:https?:)?//", text, flags=re.I)
    assert "<link" not in text and "@import" not in text
    assert text.count('<img src="data:image/png;base64,') + text.count('<img class="thumb" src="data:image/png;'
                                                                         'base64,') == len(page.images)

    plots = [img for img in page.images if img.get("class") != "thumb"]
    assert {img["alt"] for img in plots} == PLOTS
    assert all(decode(img["src"]).size[0] >= 300 for img in plots)
    thumbs = [img for img in page.images if img.get("class") == "thumb"]
    assert len(thumbs) == len(SAMPLES) + 3  # the grid (eval/final) and 3 samples followed through training
    assert all(decode(img["src"]).size == (224, 168) for img in thumbs)  # 400x300 downscaled, aspect kept
    assert decode(thumbs[0]["src"]).convert("RGB").getpixel((112, 84)) == COLOURS[0]


def test_header_config_and_before_after_table(full_run):
    _, _, text = full_run
    for fact in ("tiny/qwen2-vl", "lora (r=64, alpha=16)", "train.json", "caption", "1m 06s", "0.61",
                 "10,240", "(2.00 epochs)"):
        assert fact in text
    assert "<details><summary>Resolved config" in text and "&lt;image&gt; &amp; describe" in text
    rows = dict(re.findall(r"<tr><th>(\w+)[^<]*(?:<small>[^<]*</small>)?</th>(.*?)</tr>", text))
    assert rows["cider"].startswith("<td>0.1234</td><td>0.8765</td><td class=\"better\">▲ +0.7531")
    assert rows["cer"].startswith("<td>0.5</td><td>0.25</td><td class=\"better\">▼ -0.25 (-50%)")  # lower is better
    assert rows["bleu4"].startswith("<td>0.3456</td><td>0.2987</td><td class=\"worse\">▼ -0.0469")
    assert "<td>0.1</td><td>0.4</td><td class=\"better\">▲ +0.3" in rows["exact_match"]


def test_predictions_are_escaped_diffed_and_marked(full_run):
    _, _, text = full_run
    assert "<script" not in text
    # the prediction as shown: the diff's missing parts dropped, its extra parts unwrapped
    shown = re.sub(r'<del class="extra"[^>]*>(.*?)</del>', r"\1", re.sub(r'<ins class="miss".*?</ins>', "", text))
    assert "&lt;script&gt;x&lt;/script&gt;" in shown and "x &gt; y &amp;&amp; z" in shown
    assert "Predictions: eval/final" in text and "all 6 samples" in text
    marked = diff_html("a red circle", "a red square")
    assert marked in text  # one change, "square" for "circle", not letters matched by chance ("r", "e")
    assert re.sub(r' title="[^"]*"', "", marked) == ('a red <del class="extra">squar</del>'
                                                     '<ins class="miss">circl</ins>e')
    assert '<del class="extra" title="extra in the prediction">' in text
    assert '<ins class="miss" title="missing from the prediction">' in text
    assert text.count('<div class="card ok">') == 1 and text.count('<div class="card bad">') == 5
    assert "How predictions changed during training" in text
    assert "<tr><th>step 10</th>" in text and "<tr><th>step 20</th>" in text


@pytest.mark.parametrize("reference, prediction", [*SAMPLES, ("", "abc"), ("abc", ""), ("ab&c", "<b>")])
def test_diff_keeps_both_texts(reference, prediction):
    """Dropping the missing parts gives back the prediction; dropping the extra ones, the reference."""
    marked = diff_html(reference, prediction)
    unescape = __import__("html").unescape
    extra = r'<del class="extra"[^>]*>(.*?)</del>'
    miss = r'<ins class="miss"[^>]*>(.*?)</ins>'
    assert unescape(re.sub(extra, r"\1", re.sub(miss, "", marked))) == prediction
    assert unescape(re.sub(miss, r"\1", re.sub(extra, "", marked))) == reference
    assert "<" not in re.sub(f"{extra}|{miss}", "", marked)
    assert ("<del" in marked or "<ins" in marked) == (reference != prediction)


def test_metric_strings_are_numbers_and_partial_lines_are_skipped(tmp_path):
    run = make_run(tmp_path, full=False)
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 21, "loss": 0.5')  # a line still being written
    data = read_run(run)
    assert data.metrics[2]["loss"] == pytest.approx(2.5 * 0.9 ** 3)
    assert [r["val_bleu4"] for r in data.metrics if "val_bleu4" in r] == [0.25, 0.5]
    assert data.skipped == {"metrics.jsonl": 1}
    assert "metrics.jsonl: skipped 1 unreadable line(s)" in build_report(run).read_text()


def test_run_with_only_config_and_metrics(tmp_path):
    run = make_run(tmp_path, full=False)
    text = build_report(run).read_text()
    assert {img["alt"] for img in Page(text).images} == PLOTS
    for absent in ("Before / after", "Evaluations", "Predictions:", "How predictions changed"):
        assert absent not in text
    (run / "metrics.jsonl").unlink()
    text = build_report(run).read_text()
    assert "<img" not in text and "Training curves" not in text and "Resolved config" in text


def test_predictions_fallback_missing_images_and_rebuild(tmp_path):
    run = make_run(tmp_path)
    shutil.rmtree(run / "eval" / "final")
    shutil.copytree(run / "eval" / "base", run / "eval" / "checkpoint-10")
    os.utime(run / "eval" / "base" / "predictions.jsonl", (1, 1))  # checkpoint-10 is the newest
    (tmp_path / "data" / "images" / "000001.png").unlink()
    (tmp_path / "data" / "images" / "000002.png").write_bytes(b"not a png")
    first = build_report(run).read_text()
    assert "Predictions: eval/checkpoint-10" in first
    assert "image not found:<br>000001.png" in first and "unreadable image:<br>000002.png" in first
    # Evaluations table: base before checkpoints before final, whatever the file order
    assert first.index("<td>base</td>") < first.index("<td>checkpoint-10</td>")
    (run / "eval" / "compare.json").unlink()
    second = build_report(run).read_text()
    assert "Before / after" in first and "Before / after" not in second
    assert not [p for p in run.iterdir() if p.name.startswith(".report") or ".tmp-" in p.name]


def test_rows_with_several_references_show_the_closest_and_fold_the_others(tmp_path):
    run = make_run(tmp_path)
    references = ["two dogs on a beach", "a red circle & co", "x < y", "a circle"]
    row = {**prediction_record(0, [], references[0], "a red circle"), "references": references,
           "scores": {"exact_match": 0.0, "bleu4": 0.5}}
    for folder in (run / "eval" / "final", run / "samples"):
        name = "predictions.jsonl" if folder.name == "final" else "step-000010.jsonl"
        write_jsonl(folder / name, [row])
    text = build_report(run).read_text()
    card = text[text.index("Predictions: eval/final"):text.index("How predictions changed")]
    assert "closest of 4 references</div><div class=\"text\">a red circle &amp; co</div>" in card
    assert ("<details class=\"refs\"><summary>+3 more</summary><ul><li>two dogs on a beach</li>"
            "<li>x &lt; y</li><li>a circle</li></ul></details>") in card
    strip = text[text.index("How predictions changed"):]
    assert "references</div><div class=\"text\">two dogs on a beach</div>" in strip and "+3 more" in strip


def test_not_a_run_folder(tmp_path, capsys):
    with pytest.raises(VlmtuneError, match=f"{tmp_path / 'missing'}: no such run folder"):
        build_report(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VlmtuneError, match="empty.*the folder is empty.*vlmtune.yaml"):
        build_report(tmp_path / "empty")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(VlmtuneError, match="other: not a vlmtune run folder, it has no vlmtune.yaml"):
        build_report(tmp_path / "other")
    assert cli.main(["report", str(tmp_path / "missing")]) == 2
    assert "no such run folder" in capsys.readouterr().err


def test_broken_eval_json_names_the_file(tmp_path):
    run = make_run(tmp_path, full=False)
    (run / "eval" / "final").mkdir(parents=True)
    (run / "eval" / "final" / "metrics.json").write_text('{"name": "final", ')
    with pytest.raises(VlmtuneError, match=r"eval/final/metrics.json: not valid JSON"):
        build_report(run)


def test_cli_prints_the_report_path(tmp_path, capsys):
    run = make_run(tmp_path, full=False)
    assert cli.main(["report", str(run)]) == 0
    assert capsys.readouterr().out.strip() == str(run / "report.html")


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(chromium() is None, reason="chromium is not installed (apt-get install -y chromium); "
                                                "the headless render of report.html is skipped")
def test_report_renders_in_a_headless_browser(full_run, tmp_path):
    _, path, _ = full_run
    screenshot = tmp_path / "report.png"
    command = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
               f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={screenshot}", "--window-size=1280,2400",
               path.resolve().as_uri()]
    result = subprocess.run(command, capture_output=True, text=True, timeout=90, env={**os.environ, "HOME": str(tmp_path)})
    assert screenshot.is_file(), f"chromium wrote no screenshot (exit {result.returncode}):\n{result.stderr[-2000:]}"
    image = Image.open(screenshot).convert("RGB")
    assert image.size == (1280, 2400)
    colours = image.getcolors(maxcolors=1 << 20)
    assert len(colours) > 1000  # text, plots and thumbnails, not a blank or error page
    background = max(colours)[0]
    assert background < 0.9 * image.size[0] * image.size[1]
    # the red circle of sample 0 is drawn: its thumbnail loaded from the data URI
    assert any(count > 2000 and rgb == COLOURS[0] for count, rgb in colours)
    if os.environ.get("VLMTUNE_REPORT_SCREENSHOT"):
        shutil.copy(screenshot, os.environ["VLMTUNE_REPORT_SCREENSHOT"])
