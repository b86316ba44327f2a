"""`vlmtune serve` with request batching against the same server answering one request at a time.

    .venv/bin/python bench/serve_speed.py            # about 2 minutes on 2 CPU cores, offline
    .venv/bin/python bench/serve_speed.py --smoke    # a few requests, to check that it runs

Not a test: it prints a table and writes bench/results/serve_speed.json. Two servers run side by
side on 127.0.0.1, the same tiny random-weight Qwen2-VL (hidden 128) in both:

  batched   `vlmtune serve MODEL --max-batch 16` (the default): requests that arrive together
            share one generate call.
  one       `vlmtune serve MODEL --max-batch 1`: every request is its own generate call.

Each is driven with 1 client (requests one after another) and with 16 concurrent clients
(threads posting the same JSON the `openai` client sends, over one keep-alive connection each),
every request one 112x112 image and a question, greedy, `max_tokens` 32. The model is untrained,
so it never ends an answer early: every request costs the same 32 tokens, and the figures compare
serving, not answer lengths. The four cases run in
turn, `--repeats` times; the table shows medians of throughput and of the p50/p95 latency.

The servers run torch on one CPU thread (OMP_NUM_THREADS=1), as bench/eval_speed.py does: on a
small shared machine multi-threaded kernels make the same run swing several-fold.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results" / "serve_speed.json"
COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, max_batch: int) -> tuple[subprocess.Popen, int]:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(ROOT)}
    server = subprocess.Popen([sys.executable, "-m", "vlmtune.cli", "serve", str(model), "--port", str(port),
                               "--max-batch", str(max_batch)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited: {server.stderr.read()}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
            return server, port
        except OSError:
            time.sleep(0.3)
    server.kill()
    raise SystemExit("the server did not start in 300 s")


def requests(folder: Path, n: int) -> list[list[dict]]:
    """`n` message lists, each one picture and a question (12 distinct pictures, in turn)."""
    from PIL import Image, ImageDraw

    out = []
    for i in range(n):
        path = folder / f"{i % 12}.png"
        if not path.exists():
            image = Image.new("RGB", (112, 112), "white")
            shape, colour = SHAPES[i % 12 // 4], COLOURS[i % 4]
            box = (22, 22, 90, 90)
            {"circle": ImageDraw.Draw(image).ellipse, "square": ImageDraw.Draw(image).rectangle,
             "triangle": lambda b, fill: ImageDraw.Draw(image).polygon([(56, 22), (22, 90), (90, 90)], fill=fill)
             }[shape](box, fill=colour)
            image.save(path)
        url = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
        out.append([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                 {"type": "text", "text": "What is in the image?"}]}])
    return out


def drive(port: int, messages: list[list[dict]], clients: int, max_tokens: int) -> dict:
    """Send `messages` from `clients` threads (each its own share, in order); throughput and latencies.

    Each thread keeps one HTTP connection and posts the JSON itself: the clients share this small
    machine with the server, and a lighter client leaves more of it to the server being measured.
    """
    latencies: list[float] = []
    tokens = [0]
    lock = threading.Lock()

    def client(share: list[list[dict]]) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        for m in share:
            body = json.dumps({"model": "base", "messages": m, "max_tokens": max_tokens, "temperature": 0})
            start = time.perf_counter()
            conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
            response = conn.getresponse()
            reply = json.loads(response.read())
            took = time.perf_counter() - start
            assert response.status == 200, reply
            with lock:
                latencies.append(took)
                tokens[0] += reply["usage"]["completion_tokens"]
        conn.close()

    threads = [threading.Thread(target=client, args=(messages[i::clients],)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {"requests": len(latencies), "seconds": round(wall, 3), "requests_per_s": round(len(latencies) / wall, 2),
            "tokens_per_s": round(tokens[0] / wall, 1),
            "p50_ms": round(float(np.percentile(latencies, 50)) * 1000, 1),
            "p95_ms": round(float(np.percentile(latencies, 95)) * 1000, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a few requests, one repeat: checks that it runs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per answer")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    repeats, per_client, max_tokens = (1, 1, 4) if args.smoke else (args.repeats, 4, args.max_tokens)

    from vlmtune.models.tiny import build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = build_tiny_model("qwen2_vl", tmp / "model", hidden=128, vision_dim=64)
        servers = {"batched": start_server(model, 16), "one": start_server(model, 1)}
        cases = {1: requests(tmp, 16 if not args.smoke else 2), 16: requests(tmp, 16 * per_client)}
        try:
            for _, port in servers.values():  # warm-up: first calls pay for lazy initialisation
                drive(port, cases[1][:2], 1, max_tokens)
            runs: dict[tuple[str, int], list[dict]] = {}
            for _ in range(repeats):
                for clients, messages in cases.items():
                    for mode, (_, port) in servers.items():
                        runs.setdefault((mode, clients), []).append(drive(port, messages, clients, max_tokens))
        finally:
            for server, _ in servers.values():
                server.terminate()
                server.wait(30)

    rows = []
    for (mode, clients), measured in runs.items():
        rows.append({"server": mode, "max_batch": 16 if mode == "batched" else 1, "clients": clients,
                     "requests": measured[0]["requests"],
                     **{k: statistics.median(m[k] for m in measured)
                        for k in ("requests_per_s", "tokens_per_s", "p50_ms", "p95_ms")},
                     "runs": measured})
    by = {(r["server"], r["clients"]): r for r in rows}
    ratios = {f"{c}_clients": round(by[("batched", c)]["requests_per_s"] / by[("one", c)]["requests_per_s"], 2)
              for c in cases}
    print(f"{'server':<10}{'clients':>8}{'req/s':>9}{'tok/s':>9}{'p50 ms':>9}{'p95 ms':>9}")
    for r in rows:
        print(f"{r['server']:<10}{r['clients']:>8}{r['requests_per_s']:>9.2f}{r['tokens_per_s']:>9.1f}"
              f"{r['p50_ms']:>9.1f}{r['p95_ms']:>9.1f}")
    print("throughput, batched / one at a time: " + ", ".join(f"{k.replace('_', ' ')} {v}x" for k, v in ratios.items()))
    import torch
    import transformers

    result = {"benchmark": "vlmtune serve: batched (--max-batch 16) vs one request at a time (--max-batch 1)",
              "model": {"family": "qwen2_vl", "hidden": 128, "layers": 2, "vision_dim": 64, "weights": "random"},
              "request": {"image": "112x112 png, data URL", "max_tokens": max_tokens, "temperature": 0},
              "smoke": args.smoke, "repeats": repeats, "rows": rows, "throughput_ratio": ratios,
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                          "transformers": transformers.__version__, "torch_threads_in_server": 1}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
