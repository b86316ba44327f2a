"""`vlmtune ui`: the run-folder readers on their own, then the real UI in headless Chromium.

The browser test starts `vlmtune ui RUN` on a free 127.0.0.1 port with a tiny trained LoRA run,
uploads an image, asks, waits for the streamed answer, turns on compare mode (two answers), and
opens the Evaluations tab (predictions with their images). Screenshots go to the test's tmp folder
(and to $VLMTUNE_UI_SHOTS when set). It skips only where Debian's chromium is absent.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import clean_env, draw, free_port, run_cli, start_cli

from vlmtune.ui import (chat_sources, curve_rows, find_runs, is_wrong, predictions_html, read_curves,
                        read_predictions, score_names, select_predictions)

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


# -- the readers, without a browser ---------------------------------------------------------------

def test_curves_keep_nonfinite_values_as_gaps(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lines = [{"step": 1, "epoch": 0.1, "time": 1.0, "loss": 2.5, "learning_rate": 1e-3},
             {"step": 2, "epoch": 0.2, "time": 2.0, "loss": None, "nonfinite": {"loss": "nan"}, "grad_norm": None},
             {"step": 3, "epoch": 0.3, "time": 3.0, "loss": 1.5, "eval_loss": 1.9, "note": "text"}]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + '\n{"step": 4, "loss"')
    curves = read_curves(run)
    assert curves["loss"] == [(1, 2.5), (2, None), (3, 1.5)]  # the NaN stays a gap, the torn last line is skipped
    assert curves["eval_loss"] == [(3, 1.9)]
    assert "grad_norm" not in curves  # null without a nonfinite note: not logged, not a gap
    assert "note" not in curves and "epoch" not in curves and "time" not in curves
    rows = curve_rows(curves, ["loss"])
    assert rows == [{"step": 1, "value": 2.5, "series": "loss"}, {"step": 3, "value": 1.5, "series": "loss"}]
    assert read_curves(tmp_path / "nothing") == {}


def test_runs_are_found_under_a_folder_with_their_checkpoints(tmp_path):
    for name in ("a", "b"):
        (tmp_path / "runs" / name / "checkpoint-10").mkdir(parents=True)
        (tmp_path / "runs" / name / "checkpoint-2").mkdir()
    (tmp_path / "runs" / "notes").mkdir()
    runs = find_runs([str(tmp_path / "runs")])
    assert [r.name for r in runs] == ["a", "b"]
    sources = chat_sources([str(tmp_path / "runs" / "a"), "Qwen/Qwen2-VL-2B-Instruct"])
    a = tmp_path / "runs" / "a"
    assert sources == [str(a), str(a / "checkpoint-2"), str(a / "checkpoint-10"), "Qwen/Qwen2-VL-2B-Instruct"]


def test_predictions_filter_to_wrong_and_sort_by_score(tmp_path):
    image = draw(tmp_path / "x.png")
    rows = [{"index": 0, "images": [image], "prediction": "a red circle", "references": ["a red circle"],
             "scores": {"exact_match": 1.0, "cer": 0.0}},
            {"index": 1, "images": [image], "prediction": "a red", "references": ["a blue square"],
             "scores": {"exact_match": 0.0, "cer": 0.6}},
            {"index": 2, "images": [image], "prediction": "blue", "references": ["a blue circle"],
             "scores": {"exact_match": 0.0, "cer": 0.3}},
            {"index": 3, "images": [], "prediction": "x", "references": ["y"], "scores": {}}]
    assert [is_wrong(r) for r in rows] == [False, True, True, True]  # the last by its text
    assert score_names(rows) == ["exact_match", "cer"]
    assert [r["index"] for r in select_predictions(rows, wrong_only=True)] == [1, 2, 3]
    assert [r["index"] for r in select_predictions(rows, sort_by="cer")] == [0, 2, 1, 3]  # unscored last
    assert [r["index"] for r in select_predictions(rows, True, "cer", descending=True)] == [1, 2, 3]
    page = predictions_html(select_predictions(rows, True))
    assert page.count('class="vt-pred vt-wrong"') == 3 and page.count("data:image/png;base64,") == 2
    assert "a blue square" in page


def test_gradio_is_imported_only_when_the_ui_starts():
    code = ("import sys; from vlmtune.cli import main; import vlmtune.ui; main(['--help']);"
            "assert 'gradio' not in sys.modules and 'torch' not in sys.modules, 'imported too early'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "  ui " in result.stdout


def test_partial_predictions_are_read_while_an_eval_runs(tmp_path):
    folder = tmp_path / "run" / "eval" / "final"
    folder.mkdir(parents=True)
    (folder / "predictions.partial.jsonl").write_text('{"index": 0, "prediction": "a"}\n{"index": 1, "pred')
    assert read_predictions(tmp_path / "run", "final") == [{"index": 0, "prediction": "a"}]


# -- the real UI in a browser -----------------------------------------------------------------------

def wait_for_http(server, port: int, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"vlmtune ui exited with {server.returncode}:\n{server.read()[1]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise AssertionError("vlmtune ui did not answer within the time limit")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (`apt-get install chromium`; "
                                             ".ci/run installs it)")
def test_ui_in_a_real_browser(cli_run, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is in the dev extra")
    run = cli_run["out"]
    assert cli_run["result"].returncode == 0, cli_run["result"].stderr
    result = run_cli(["eval", str(run), "--compare-base", "--max-new-tokens", "3"])
    assert result.returncode == 0, result.stderr
    shots = Path(os.environ.get("VLMTUNE_UI_SHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    image = draw(tmp_path / "ask.png", "blue", "square")
    port = free_port()
    server = start_cli(["ui", str(run), "--port", str(port)], GRADIO_ANALYTICS_ENABLED="False")
    try:
        wait_for_http(server, port)
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            outside: list[str] = []  # the page must work offline: nothing fetched from elsewhere
            page.on("request", lambda r: outside.append(r.url) if not r.url.startswith(
                (f"http://127.0.0.1:{port}/", "data:", "blob:")) else None)
            try:
                drive(page, port, image, run, shots)
            except Exception:
                page.screenshot(path=str(shots / "ui_failure.png"), full_page=True)
                server.kill()
                server.wait(30)
                raise AssertionError(f"UI test failed; screenshot {shots / 'ui_failure.png'}; "
                                     f"server output:\n{server.read()[1][-4000:]}")
            browser.close()
            assert outside == [], f"the page fetched from outside this machine: {outside[:5]}"
    finally:
        server.kill()
        server.wait(30)


def drive(page, port: int, image: str, run: Path, shots: Path) -> None:
    """Chat with an image, compare mode, then the evaluations view; a screenshot of each."""
    if True:
        if True:
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_selector("#vt-input textarea", timeout=30_000)

            # one image and a question: a streamed answer appears in the tuned model's chat
            page.set_input_files("#vt-input input[type=file]", image)
            page.wait_for_selector("#vt-input .thumbnail-item img", state="attached", timeout=15_000)
            page.fill("#vt-input textarea", "What is in the image?")
            page.press("#vt-input textarea", "Enter")
            answer = page.locator("#vt-chat .bot").last
            answer.wait_for(timeout=60_000)
            page.wait_for_function(
                "() => { const b = document.querySelectorAll('#vt-chat .bot');"
                " return b.length && b[b.length-1].innerText.trim().length > 0; }", timeout=60_000)
            page.wait_for_selector("#vt-chat img", timeout=10_000)  # the uploaded image is in the conversation
            page.screenshot(path=str(shots / "ui_chat.png"), full_page=True)

            # compare mode: the same question answered by the base and by the tuned model
            page.click("#vt-clear")
            page.locator("#vt-compare input[type=checkbox]").check()
            page.wait_for_selector("#vt-chat-base", state="visible", timeout=10_000)
            # another file: the browser fires no change event for the file it already holds
            page.set_input_files("#vt-input input[type=file]", draw(shots / "ask2.png", "green", "triangle"))
            page.wait_for_selector("#vt-input .thumbnail-item img", state="attached", timeout=15_000)
            page.fill("#vt-input textarea", "Describe it.")
            page.press("#vt-input textarea", "Enter")
            page.wait_for_function(
                "() => ['#vt-chat', '#vt-chat-base'].every(id => { const b = document.querySelectorAll(id + ' .bot');"
                " return b.length && b[b.length-1].innerText.trim().length > 0; })", timeout=90_000)
            page.wait_for_timeout(300)
            page.screenshot(path=str(shots / "ui_compare.png"), full_page=True)

            # evaluations: the before/after table and predictions with their images
            page.get_by_role("tab", name="Evaluations").click()
            page.wait_for_selector("#vt-predictions .vt-pred img", timeout=20_000)
            rows = page.locator("#vt-predictions .vt-pred")
            predictions = json.loads("[" + ",".join(
                (run / "eval" / "final" / "predictions.jsonl").read_text().splitlines()) + "]")
            assert rows.count() == len(predictions) > 0
            assert page.locator("#vt-compare-table").inner_text().count("exact_match") >= 1
            page.screenshot(path=str(shots / "ui_evaluations.png"), full_page=True)

            # only the wrong answers: the tiny model gets none right, so all rows stay
            page.locator("#vt-wrong input[type=checkbox]").check()
            page.wait_for_function("() => document.querySelector('#vt-predictions').innerText.includes('shown')")
            assert page.locator("#vt-predictions .vt-right").count() == 0

            # runs: the run in the table, its loss curve drawn from metrics.jsonl
            page.get_by_role("tab", name="Runs").click()
            page.wait_for_function("name => document.querySelector('#vt-runs').innerText.includes(name)", arg=run.name,
                                   timeout=20_000)
            page.wait_for_selector("#vt-loss canvas, #vt-loss svg", timeout=20_000)
            page.screenshot(path=str(shots / "ui_runs.png"), full_page=True)

            # train: a shipped config to start from, nothing running yet
            page.get_by_role("tab", name="Train").click()
            page.wait_for_function("() => document.querySelector('#vt-train-status textarea, #vt-train-status input')"
                                   ".value.includes('no training started')", timeout=10_000)
            assert "demo.yaml" in page.locator("#vt-train-config input").input_value() or \
                page.locator("#vt-train-config input").input_value().endswith(".yaml")


@pytest.mark.long
def test_train_job_runs_in_a_subprocess_and_stops_with_a_checkpoint(tiny_qwen2_vl, caption_data, tmp_path,
                                                                     monkeypatch):
    from conftest import base_overrides

    from vlmtune.ui import TrainJob, stop_jobs, train_overrides

    for key, value in clean_env().items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "run"
    config = tmp_path / "config.yaml"
    config.write_text("train:\n  max_steps: 100000\n")
    overrides = base_overrides(tiny_qwen2_vl, caption_data["train"], out) + train_overrides(
        {"train.max_steps": " 100000 ", "train.learning_rate": ""})
    assert overrides[-1] == "train.max_steps=100000"  # a blank field keeps the config's value
    job = TrainJob(str(config), overrides, tmp_path / "train.log")
    assert job.output_dir == out
    deadline = time.time() + 90
    while time.time() < deadline and job.process.poll() is None and "step 0" in job.status():
        time.sleep(0.3)
    assert job.status().startswith("running"), job.log_tail()
    stop_jobs([job])  # what the UI does to the runs it started when it is stopped
    assert job.process.poll() == 130, job.log_tail()
    assert "exit code 130 (stopped; a checkpoint was saved)" in job.status()
    assert list(out.glob("checkpoint-*")), job.log_tail()


def test_a_port_in_use_is_one_line_not_a_traceback(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = run_cli(["ui", str(tmp_path), "--port", str(port)])
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"port {port} on 127.0.0.1 is already in use (another `vlmtune ui`?)" in result.stderr


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_and_sigterm_stop_the_ui(tmp_path, signum):
    port = free_port()
    server = start_cli(["ui", str(tmp_path), "--port", str(port)], GRADIO_ANALYTICS_ENABLED="False")
    try:
        wait_for_http(server, port)
        server.send_signal(signum)
        code = server.wait(30)
    finally:
        if server.poll() is None:
            server.kill()
    _, err = server.read()
    assert "Traceback" not in err, err[-3000:]
    assert code == 0 and "vlmtune ui: stopped" in err
