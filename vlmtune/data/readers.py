"""Dataset records -> `Sample`: one reader per record shape, plus format detection.

Each reader takes one already-parsed record (a dict from a JSON list, a JSONL line or a CSV
row), the `where` string ("FILE:INDEX") used in messages, and the folder that relative image
paths resolve against. File handling lives in `formats.py`; the reverse direction in
`writers.py`.

Readers normalise roles and placeholders but never repair a sample: a record whose placeholder
count differs from its image count is read as it is, so that `vlmtune data check` can point at
it. The one exception is the documented minicpm/llava rule that images with no placeholder at
all go in front of the first user message, because that is what those formats mean. Numbered
placeholders (`<image_00>`) are names, not positions: one that names no image of its record, or a
named image that no placeholder uses, is an error here, since binding them by order would train
on the wrong image silently.
"""

from __future__ import annotations

import os
import re

from vlmtune.data.sample import IMAGE, Sample, Turn
from vlmtune.errors import DataError

ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
}
IMAGE_COLUMNS = ("image_path", "image", "file_name", "path", "filename")
TEXT_COLUMNS = ("text", "caption", "answer", "latex", "label", "response")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")

VISION_TAG = re.compile(r"<\|vision_start\|>(.*?)<\|vision_end\|>", re.S)
NUMBERED_PLACEHOLDER = re.compile(r"<image_\d+>")
_URL = re.compile(r"^(?:[a-zA-Z][a-zA-Z0-9+.-]*://|data:)")


def is_url(path: str) -> bool:
    return bool(_URL.match(path))


def is_bare_image_path(text: str) -> bool:
    """True for a message that is nothing but an image path (the LaTeX OCR (Qwen2-VL) tutorial's files)."""
    text = text.strip()
    return bool(text) and not any(c.isspace() for c in text) and text.lower().endswith(IMAGE_SUFFIXES)


def resolve_image(path, where: str, base: str) -> str:
    """Absolute path for `path` (relative paths are relative to the data file); URLs unchanged."""
    if not isinstance(path, str) or not path.strip():
        raise DataError(f"{where}: image path {path!r} is not a non-empty string — "
                        "give each image as a file path or URL")
    path = path.strip()
    if is_url(path):
        return path
    return os.path.normpath(os.path.join(base, os.path.expanduser(path)))


def detect_format(record: dict, where: str = "record") -> str:
    """Name of the format (one of `FORMATS`) a single record is written in.

    Args:
        record: one parsed record.
        where: how error messages name the record ("FILE:INDEX").

    Raises:
        DataError: the record is not an object or matches no known format.
    """
    if not isinstance(record, dict):
        raise DataError(f"{where}: record is a {type(record).__name__}, not a JSON object — "
                        "each record must be an object such as {\"conversations\": [...]}")
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        turns = record["conversations"]
        turns = [t for t in turns if isinstance(t, dict)] if isinstance(turns, list) else []
        texts = [t.get("value", t.get("content")) for t in turns]
        if any(isinstance(x, str) and "<|vision_start|>" in x for x in texts):
            return "qwen"
        uses_value = any("value" in t for t in turns)
        if "image" in record or "images" in record:
            return "llava" if uses_value else "minicpm"
        if any(str(t.get("from", "")).lower() in ("human", "gpt") for t in turns):
            return "llava"
        return "qwen" if uses_value else "minicpm"
    if _pick(record, IMAGE_COLUMNS) and _pick(record, TEXT_COLUMNS):
        return "csv"
    keys = ", ".join(map(str, record)) or "none"
    raise DataError(f"{where}: cannot tell the dataset format (keys: {keys}) — a record needs a "
                    "'conversations' or 'messages' list, or an image and a text column; "
                    "see `vlmtune data convert --help` for the supported formats")


def _role(turn: dict, j: int, where: str) -> str:
    raw = turn.get("role", turn.get("from"))
    if raw is None:
        raise DataError(f"{where}: turn {j} has no 'role' (or 'from') — "
                        "give every turn a role: system, user or assistant")
    role = ROLE_ALIASES.get(str(raw).strip().lower())
    if role is None:
        raise DataError(f"{where}: turn {j} has unknown role {raw!r} — use system, user or assistant "
                        "(human/gpt/bot/model are accepted too)")
    return role


def _text(turn: dict, j: int, where: str, keys=("content", "value")) -> str:
    for key in keys:
        value = turn.get(key)
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # a numeric label is still text
    raise DataError(f"{where}: turn {j} has no text ('{keys[0]}' or '{keys[1]}' missing or not a string) — "
                    "give every turn its text")


def _turn_list(record: dict, key: str, where: str) -> list:
    turns = record.get(key)
    if not isinstance(turns, list) or not turns:
        what = "is missing" if turns is None else "is empty" if turns == [] else "is not a list"
        raise DataError(f"{where}: '{key}' {what} — each record needs a non-empty '{key}' list of turns")
    for j, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DataError(f"{where}: turn {j} is a {type(turn).__name__}, not an object — "
                            "write each turn as {\"role\": ..., \"content\": ...}")
    return turns


def _extras(record: dict, used: tuple[str, ...]) -> dict:
    return {k: v for k, v in record.items() if k not in used}


def _id(record: dict) -> str | None:
    value = record.get("id")
    return None if value is None or value == "" else str(value)


def read_conversations(record: dict, fmt: str, where: str, base: str) -> Sample:
    """minicpm, qwen and llava records: a 'conversations' list plus images.

    All three are read by one function because files mix their conventions in practice
    (LLaVA files with user/assistant roles, MiniCPM files with an image list); what differs is
    only where the images are named, and each of those places is handled here:
    a top-level 'image'/'images' (string, list, or MiniCPM's {"<image_00>": path} dict),
    `<|vision_start|>PATH<|vision_end|>` tags, and (qwen only) a user turn that is a bare path.
    """
    if not isinstance(record, dict):
        detect_format(record, where)  # raises the "not an object" error
    turns_raw = _turn_list(record, "conversations", where)
    field = record.get("image", record.get("images"))
    keyed: dict = {}
    listed: list = []
    if isinstance(field, dict):
        keyed = field
    elif isinstance(field, str):
        listed = [field]
    elif isinstance(field, list):
        listed = field
    elif field is not None:
        raise DataError(f"{where}: 'image' is a {type(field).__name__} — give a path, a list of paths "
                        "or a {\"<image_00>\": path} object")
    keys = sorted(keyed, key=len, reverse=True)
    pattern = re.compile("|".join([VISION_TAG.pattern] + [re.escape(k) for k in keys]
                                  + [NUMBERED_PLACEHOLDER.pattern, re.escape(IMAGE)]), re.S)

    images: list[str] = []
    used_keys: set = set()
    unnamed: list[str] = []  # numbered placeholders that name no image of the record
    next_listed = 0
    found = 0

    def replace(m: re.Match) -> str:
        nonlocal next_listed, found
        found += 1
        token = m.group(0)
        if m.group(1) is not None:
            if m.group(1).strip() not in ("", "<|image_pad|>"):  # a rendered template names no file
                images.append(resolve_image(m.group(1), where, base))
        elif token in keyed:
            images.append(resolve_image(keyed[token], where, base))
            used_keys.add(token)
        elif token == IMAGE and next_listed < len(listed):
            images.append(resolve_image(listed[next_listed], where, base))
            next_listed += 1
        elif NUMBERED_PLACEHOLDER.fullmatch(token):
            unnamed.append(token)
        # Anything else is a placeholder with no image behind it: kept for the pre-flight check.
        return IMAGE

    turns: list[Turn] = []
    for j, raw in enumerate(turns_raw):
        role = _role(raw, j, where)
        text = _text(raw, j, where)
        if fmt == "qwen" and field is None and role == "user" and is_bare_image_path(text):
            images.append(resolve_image(text, where, base))
            found += 1
            text = IMAGE
        else:
            text = pattern.sub(replace, text)
        turns.append(Turn(role, text))

    if found:
        _check_named_images(keyed, unnamed, used_keys, where)
    leftover = [keyed[k] for k in keyed if k not in used_keys] + listed[next_listed:]
    leftover = [resolve_image(p, where, base) for p in leftover]
    if leftover and found == 0:
        first_user = next((t for t in turns if t.role == "user"), None)
        if first_user is not None:
            first_user.text = (IMAGE + "\n") * len(leftover) + first_user.text
    images += leftover
    return Sample(images=images, turns=turns, id=_id(record), source=where,
                  meta=_extras(record, ("id", "image", "images", "conversations")))


def _check_named_images(keyed: dict, unnamed: list[str], used_keys: set, where: str) -> None:
    """Numbered placeholders and a record's {"<image_00>": path} map must match both ways: an
    image bound by name must never be re-bound to another placeholder by position.

    Raises:
        DataError: a placeholder that names no image of the record, or a named image no placeholder uses.
    """
    if unnamed:
        named = ", ".join(keyed) if keyed else "none: its 'image' names no image by placeholder"
        raise DataError(f"{where}: placeholder {unnamed[0]} names no image of this record (named images: {named}) "
                        f"— add \"{unnamed[0]}\": PATH to the record's 'image' object, or fix the placeholder")
    unused = [k for k in keyed if k not in used_keys]
    if unused:
        raise DataError(f"{where}: image {unused[0]} ({keyed[unused[0]]}) is used by no placeholder in the text "
                        f"— put {unused[0]} where that image belongs, or remove it from the record's 'image' object")


def _content_text(content, j: int, where: str, take_image) -> str:
    """Text of one message's content, with each image part turned into a placeholder.

    Parts are concatenated verbatim, with nothing inserted between them: that is how the chat
    templates of Qwen2-VL and friends render a parts list, and it lets a sample written by
    `writers.py` read back to exactly the same text.
    """
    if isinstance(content, str):
        for _ in range(content.count(IMAGE)):
            take_image(None)
        return content
    if not isinstance(content, list):
        raise DataError(f"{where}: message {j} has no 'content' string or list of parts — "
                        "give every message its content")
    pieces = []
    for part in content:
        if isinstance(part, str):
            part = {"type": "text", "text": part}
        if not isinstance(part, dict):
            raise DataError(f"{where}: message {j} has a content part that is a {type(part).__name__} — "
                            "use {\"type\": \"text\", \"text\": ...} or {\"type\": \"image\", ...}")
        kind = part.get("type", "text" if "text" in part else "image" if "image" in part else None)
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise DataError(f"{where}: message {j} has a text part without a 'text' string — "
                                "give every text part its text")
            pieces.append(_content_text(text, j, where, take_image))
        elif kind in ("image", "image_url"):
            ref = part.get("image", part.get("image_url", part.get("url", part.get("path"))))
            if isinstance(ref, dict):  # OpenAI style {"image_url": {"url": ...}}
                ref = ref.get("url")
            take_image(ref)
            pieces.append(IMAGE)
        else:
            raise DataError(f"{where}: message {j} has a content part of type {kind!r} — "
                            "only text and image parts are supported")
    return "".join(pieces)


def read_messages(record: dict, where: str, base: str) -> Sample:
    """OpenAI/HF chat records: {"messages": [{"role", "content": str | parts}], "images": [...]}.

    An image part that names its file ({"type": "image", "image": path}, or an "image_url"
    part) brings its own image; a bare {"type": "image"} part or an `<image>` in the text takes
    the next path from the record's top-level "images" list (the TRL layout).
    """
    if not isinstance(record, dict):
        detect_format(record, where)
    messages = _turn_list(record, "messages", where)
    pool = record.get("images") or []
    pool = [pool] if isinstance(pool, str) else pool
    if not isinstance(pool, list):
        raise DataError(f"{where}: 'images' is a {type(pool).__name__} — give a list of image paths")
    images: list[str] = []
    next_pooled = 0

    def take_image(ref) -> None:
        nonlocal next_pooled
        if ref is not None:
            images.append(resolve_image(ref, where, base))
        elif next_pooled < len(pool):
            images.append(resolve_image(pool[next_pooled], where, base))
            next_pooled += 1

    turns = []
    for j, message in enumerate(messages):
        role = _role(message, j, where)
        if "content" not in message:
            raise DataError(f"{where}: message {j} has no 'content' — give every message its content")
        turns.append(Turn(role, _content_text(message["content"], j, where, take_image)))
    images += [resolve_image(p, where, base) for p in pool[next_pooled:]]
    return Sample(images=images, turns=turns, id=_id(record), source=where,
                  meta=_extras(record, ("id", "messages", "images")))


def _pick(record: dict, names: tuple[str, ...]) -> str | None:
    """The record's key matching the first of `names` (case-insensitive), if any."""
    lowered = {str(k).lower(): k for k in record if k is not None}
    return next((lowered[n] for n in names if n in lowered), None)


def read_flat(record: dict, where: str, base: str) -> Sample:
    """A CSV row (or flat JSON record): one image column and one answer column."""
    if not isinstance(record, dict):
        detect_format(record, where)
    image_key = _pick(record, IMAGE_COLUMNS)
    text_key = _pick(record, TEXT_COLUMNS)
    for key, names in ((image_key, IMAGE_COLUMNS), (text_key, TEXT_COLUMNS)):
        if key is None:
            found = ", ".join(str(k) for k in record if k is not None) or "none"
            raise DataError(f"{where}: no {'image' if names is IMAGE_COLUMNS else 'text'} column "
                            f"(columns: {found}) — name one of them {', '.join(names)}")
    path = record.get(image_key)
    if not isinstance(path, str) or not path.strip():
        raise DataError(f"{where}: '{image_key}' is empty — every row needs an image path")
    text = record.get(text_key)
    text = "" if text is None else text if isinstance(text, str) else str(text)
    id_key = _pick(record, ("id",))
    meta = {k: v for k, v in record.items() if k is not None and k not in (image_key, text_key, id_key)}
    return Sample(images=[resolve_image(path, where, base)],
                  turns=[Turn("user", IMAGE), Turn("assistant", text)],
                  id=_id({"id": record.get(id_key)}) if id_key else None, source=where, meta=meta)


def read_record(record, fmt: str, where: str, base: str) -> Sample:
    """Read one record of format `fmt` into a Sample."""
    if fmt == "messages":
        return read_messages(record, where, base)
    if fmt == "csv":
        return read_flat(record, where, base)
    return read_conversations(record, fmt, where, base)
