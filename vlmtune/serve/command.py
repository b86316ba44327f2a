"""`vlmtune serve`: put a run, a checkpoint or a model behind an OpenAI-compatible HTTP API.

    vlmtune serve runs/latex                                   # http://127.0.0.1:8000/v1
    vlmtune serve runs/latex --adapter coco=runs/coco --port 8001 --api-key secret
    vlmtune serve runs/latex --engine vllm                     # hands the run to vLLM (CUDA)

The port is taken before the model loads, so a second server on the same port stops at once with
a clear message. Ctrl-C or SIGTERM stops the server after the answers under way: exit 0, no
traceback.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Literal

from vlmtune.errors import VlmtuneError
from vlmtune.listen import bind, stop_on_sigterm

API_KEY_ENV = "VLMTUNE_API_KEY"


def parse_adapters(specs: list[str] | None) -> dict[str, str]:
    """`NAME=PATH` strings as {name: path}.

    Raises:
        VlmtuneError: a spec without `=`, an empty part, or a name given twice.
    """
    adapters: dict[str, str] = {}
    for spec in specs or []:
        name, sep, path = spec.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise VlmtuneError(f"--adapter {spec!r}: write NAME=PATH, e.g. --adapter coco=runs/coco")
        if name.strip() in adapters:
            raise VlmtuneError(f"--adapter {name.strip()!r} is given twice; give each adapter its own name")
        adapters[name.strip()] = path.strip()
    return adapters


def serve_command(target: str, /, adapter: list[str] | None = None, name: str | None = None,
                  host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
                  allow_local_images: str | None = None, max_images: int = 8, max_image_pixels: int = 16_777_216,
                  max_body_mb: float = 20.0, max_tokens: int = 256, max_batch: int = 16, batch_wait_ms: float = 20.0,
                  image_newline: bool = True, engine: Literal["transformers", "vllm"] = "transformers",
                  trust_remote_code: bool = False) -> int:
    """Serve a run, checkpoint or model over an OpenAI-compatible API (/v1/chat/completions).

    Requests take text and image_url parts (data:image/...;base64 URLs), max_tokens, temperature
    (default 0: greedy, as eval), top_p, stop, seed and stream. Each answer is built with the
    run's own processor settings, so a greedy answer equals `vlmtune predict`'s. Requests that
    arrive together are answered in one batch. GET /health and GET /v1/models list the models.

    Args:
        target: Run folder (uses final/, else the newest checkpoint), checkpoint folder, model
            folder or hub id.
        adapter: NAME=PATH: also serve this LoRA run, checkpoint or adapter folder on the same base,
            as model NAME; repeat for more. The base itself answers as model `base`.
        name: Model name of the target; default: the run folder's name (`base` for a plain model).
        host: Address to listen on; 127.0.0.1 keeps the server on this machine.
        port: Port to listen on.
        api_key: Require `Authorization: Bearer KEY` on /v1 routes; default: $VLMTUNE_API_KEY if set.
        allow_local_images: Folder from which image_url parts may name local files (paths or
            file:// URLs); files outside it are refused. Default: local paths are refused.
        max_images: Most images in one request.
        max_image_pixels: Largest image (width x height) accepted.
        max_body_mb: Largest request body, in MiB.
        max_tokens: Longest answer when a request gives no max_tokens.
        max_batch: Most requests answered in one generate call (1: one at a time).
        batch_wait_ms: Longest wait of an idle server, after a request, for requests that arrived with
            it and are still being read to join its batch (a lone request does not wait).
        image_newline: Start a text part that follows an image part on a new line (`<image>\\nWhat?`),
            as `vlmtune data prepare`, the MiniCPM and LLaVA formats and `vlmtune chat` lay out a
            question; --no-image-newline joins parts as they are (`<image>What?`), as the `messages`
            data format does. Pick the layout the run was trained on.
        engine: transformers (built in, any device) or vllm (hands the run to vLLM's OpenAI server;
            CUDA, pip install 'vlmtune[vllm]').
        trust_remote_code: Run the Python files of the model folder (read them first); a run folder's
            config never enables it.
    """
    adapters = parse_adapters(adapter)
    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    local = Path(allow_local_images).expanduser().resolve() if allow_local_images else None
    if local is not None and not local.is_dir():
        raise VlmtuneError(f"--allow-local-images {allow_local_images}: no such folder")
    for option, value in (("max_images", max_images), ("max_image_pixels", max_image_pixels),
                          ("max_body_mb", max_body_mb), ("max_tokens", max_tokens), ("max_batch", max_batch)):
        if value <= 0:
            raise VlmtuneError(f"--{option.replace('_', '-')} {value}: must be > 0")
    if engine == "vllm":
        from vlmtune.serve.vllm_engine import serve_with_vllm

        return serve_with_vllm(target, adapters, name=name, host=host, port=port, api_key=api_key,
                               allow_local_images=local, max_images=max_images, max_batch=max_batch,
                               trust_remote_code=trust_remote_code)
    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise VlmtuneError(f"vlmtune serve needs {' and '.join(missing)}, not installed here: "
                           "pip install 'vlmtune[serve]'")
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        print(f"warning: listening on {host} without --api-key: anyone who can reach this machine can use the model",
              file=sys.stderr, flush=True)
    previous = signal.signal(signal.SIGTERM, stop_on_sigterm)
    sock = bind(host, port, "vlmtune serve")
    try:
        return _serve(sock, target, adapters, name, api_key, local, max_images, max_image_pixels, max_body_mb,
                      max_tokens, max_batch, batch_wait_ms, image_newline, trust_remote_code)
    except KeyboardInterrupt:
        print("vlmtune serve: stopped", file=sys.stderr, flush=True)
        return 0
    finally:
        sock.close()
        signal.signal(signal.SIGTERM, previous)


def _serve(sock: socket.socket, target: str, adapters: dict[str, str], name: str | None, api_key: str | None,
           local: Path | None, max_images: int, max_image_pixels: int, max_body_mb: float, max_tokens: int,
           max_batch: int, batch_wait_ms: float, image_newline: bool, trust_remote_code: bool) -> int:
    import uvicorn

    from vlmtune.generation import load_generator
    from vlmtune.serve.app import ServeOptions, build_app
    from vlmtune.serve.batching import Batcher
    from vlmtune.serve.requests import Limits

    generator = load_generator(target, adapters, name=name, trust_remote_code=trust_remote_code)
    options = ServeOptions(Limits(max_images, max_image_pixels, local), api_key, int(max_body_mb * 2**20), max_tokens,
                           image_newline)
    app = build_app(generator, Batcher(generator, max_batch, batch_wait_ms / 1000), options)
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"
    print(f"serving {', '.join(generator.names)} at {url} (OpenAI-compatible; Ctrl-C stops)", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    server.run(sockets=[sock])  # uvicorn takes Ctrl-C itself: it finishes the answers under way and returns
    print("vlmtune serve: stopped", file=sys.stderr, flush=True)
    return 0
