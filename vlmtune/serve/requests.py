"""From an OpenAI chat-completions request body to what `vlmtune.generation` takes, checked.

Every problem is an `ApiError`: an HTTP status and an OpenAI-shaped JSON error that says what is
wrong with which field and what to send instead. Images arrive as `image_url` parts: a
`data:image/...;base64,` URL is decoded into a file in a folder the caller owns (and deletes after
encoding); a local path is read in place only under `--allow-local-images DIR`, after symlinks are
resolved; remote URLs are refused, since the server may have no network. Each image is opened
(header only) to refuse bytes that are not an image and images over the pixel limit before any
pixels are decoded.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from vlmtune.data.sample import IMAGE
from vlmtune.generation import Sampling


class ApiError(Exception):
    """A request the server refuses, as the OpenAI API reports it: `{"error": {...}}` with `status`."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.kind = status, message, code, param, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Limits:
    """What the server accepts (the `vlmtune serve` options of the same names)."""

    max_images: int = 8
    max_image_pixels: int = 16_777_216
    allow_local_images: Path | None = None  # resolved folder; None: no local paths


@dataclass
class ChatRequest:
    """A checked request. `messages` hold image parts as `{"type": "image", "image": PATH}`."""

    model: str | None
    messages: list[dict]
    max_tokens: int | None
    sampling: Sampling
    stop: list[str]
    stream: bool
    include_usage: bool


ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^,;]*)*),(?P<data>.*)$", re.S)


def parse_json(raw: bytes) -> dict:
    """The body as a JSON object.

    Raises:
        ApiError: 400 for bytes that are not JSON, or JSON that is not an object.
    """
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e}); send a JSON object such as "
                            '{"model": ..., "messages": [...]}', "invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body is a JSON {type(body).__name__}, not an object with model and messages",
                       "invalid_json")
    return body


def _number(body: dict, key: str, kind: type, low: float | None = None, high: float | None = None):
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise ApiError(400, f"{key} must be {'a number' if kind is float else 'an integer'}, not {value!r}",
                       "invalid_value", key)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"between {low} and {high}"
        raise ApiError(400, f"{key}={value} is out of range: it must be {bounds}", "invalid_value", key)
    return value


def read_request(body: dict, limits: Limits, workdir: Path) -> ChatRequest:
    """The checked request, its images written to or found as files (decoded ones under `workdir`).

    Raises:
        ApiError: the first problem found, with the field it is in.
    """
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content} objects", "invalid_value", "messages")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(400, f"model must be a string, not {model!r}", "invalid_value", "model")
    if body.get("n", 1) != 1:
        raise ApiError(400, "n must be 1: this server returns one choice per request", "invalid_value", "n")
    max_tokens = _number(body, "max_completion_tokens", int, 1)
    max_tokens = _number(body, "max_tokens", int, 1) if max_tokens is None else max_tokens
    temperature = _number(body, "temperature", float, 0, 2)
    top_p = _number(body, "top_p", float, 0, 1)
    seed = _number(body, "seed", int)
    if top_p == 0:
        raise ApiError(400, "top_p=0 keeps no token; give a value in (0, 1]", "invalid_value", "top_p")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise ApiError(400, "stop must be a string or a list of up to 4 non-empty strings", "invalid_value", "stop")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise ApiError(400, f"stream must be true or false, not {stream!r}", "invalid_value", "stream")
    options = body.get("stream_options") or {}
    include_usage = bool(isinstance(options, dict) and options.get("include_usage"))
    images = _ImageReader(limits, workdir)
    converted = [_message(m, j, images) for j, m in enumerate(messages)]
    # greedy ignores top_p and seed: every greedy request can share a batch
    sampling = Sampling(temperature, 1.0 if top_p is None else top_p, seed) if temperature else Sampling()
    return ChatRequest(model, converted, max_tokens, sampling, stop, stream, include_usage)


def _message(message, j: int, images: _ImageReader) -> dict:
    where = f"messages[{j}]"
    if not isinstance(message, dict):
        raise ApiError(400, f"{where} must be an object with role and content", "invalid_value", where)
    role = ROLES.get(message.get("role"))
    if role is None:
        raise ApiError(400, f"{where}.role {message.get('role')!r} is not supported: use system, user or assistant",
                       "invalid_value", f"{where}.role")
    content = message.get("content")
    if isinstance(content, str):
        return {"role": role, "content": _text(content, where)}
    if not isinstance(content, list):
        raise ApiError(400, f"{where}.content must be a string or a list of text and image_url parts",
                       "invalid_value", f"{where}.content")
    parts = []
    for k, part in enumerate(content):
        at = f"{where}.content[{k}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": _text(part["text"], at)})
        elif kind == "image_url":
            ref = part.get("image_url")
            url = ref.get("url") if isinstance(ref, dict) else ref
            if not isinstance(url, str) or not url:
                raise ApiError(400, f"{at}.image_url.url is missing", "invalid_value", f"{at}.image_url")
            parts.append({"type": "image", "image": images.read(url, at)})
        else:
            raise ApiError(400, f"{at} is not a text or image_url part: send {{\"type\": \"text\", \"text\": ...}} or "
                                '{"type": "image_url", "image_url": {"url": ...}}', "invalid_value", at)
    return {"role": role, "content": parts}


def _text(text: str, where: str) -> str:
    if IMAGE in text:  # it would take the place of an image that is not there
        raise ApiError(400, f"{where}: the text holds {IMAGE}, which vlmtune reserves for images; send images as "
                            "image_url parts", "invalid_value", where)
    return text


class _ImageReader:
    """Turns image URLs into checked image files, counting them against the limit."""

    def __init__(self, limits: Limits, workdir: Path):
        self.limits, self.workdir, self.count = limits, workdir, 0

    def read(self, url: str, where: str) -> str:
        self.count += 1
        if self.count > self.limits.max_images:
            raise ApiError(400, f"too many images: more than {self.limits.max_images} in one request (--max-images); "
                                "send fewer", "too_many_images", where)
        if url.startswith("data:"):
            path = self._decode(url, where)
        elif re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", url) and not url.startswith("file://"):
            local = ", or as a path under the --allow-local-images folder" if self.limits.allow_local_images else ""
            raise ApiError(400, f"{where}: remote image URLs are not fetched (this server may run without network): "
                                f"{url[:80]}. Send the image inline as a data:image/...;base64 URL{local}",
                           "remote_image_url", where)
        else:
            path = self._local(url.removeprefix("file://"), where)
        self._check(path, where)
        return str(path)

    def _decode(self, url: str, where: str) -> Path:
        match = _DATA_URL.match(url)
        if not match or ";base64" not in match.group("params"):
            raise ApiError(400, f"{where}: a data URL must look like data:image/png;base64,<data>", "invalid_image_url",
                           where)
        try:
            data = base64.b64decode(match.group("data"), validate=True)
        except (binascii.Error, ValueError) as e:
            raise ApiError(400, f"{where}: the image's base64 data is invalid ({e})", "invalid_base64", where) from None
        path = self.workdir / f"image{self.count}"
        path.write_bytes(data)
        return path

    def _local(self, name: str, where: str) -> Path:
        folder = self.limits.allow_local_images
        if folder is None:
            raise ApiError(400, f"{where}: local image paths are off; start the server with --allow-local-images "
                                "DIR to read images under DIR, or send the image as a data:image/...;base64 URL",
                           "local_images_disabled", where)
        path = (folder / Path(name).expanduser()).resolve()  # an absolute `name` replaces `folder`
        if not path.is_relative_to(folder):
            raise ApiError(403, f"{where}: {name} is outside the folder this server reads images from "
                                "(--allow-local-images); only files under it are served", "image_path_not_allowed",
                           where)
        if not path.is_file():
            raise ApiError(400, f"{where}: no such image file under the --allow-local-images folder: {name}",
                           "image_not_found", where)
        return path

    def _check(self, path: Path, where: str) -> None:
        try:
            with Image.open(path) as im:  # reads the header only
                width, height = im.size
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
            raise ApiError(400, f"{where}: not an image the server can read ({type(e).__name__}); send PNG, JPEG, "
                                "WebP, GIF or BMP bytes", "invalid_image", where) from None
        if width * height > self.limits.max_image_pixels:
            raise ApiError(400, f"{where}: the image is {width}x{height} = {width * height:,} pixels, more than "
                                f"--max-image-pixels {self.limits.max_image_pixels:,}; send a smaller image",
                           "image_too_large", where)
