"""vlmtune's processor for MiniCPM-V 2.0, MiniCPM-V 2.6 and MiniCPM-o 2.6: no code from the model
folder is run.

    processor = load_minicpm_processor("path/to/MiniCPM-V-2_6")     # official or vlmtune-saved folder
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[text], images=[image])

`load_minicpm_processor` reads the folder as published: the tokenizer from `tokenizer.json`
(`tokenizer.model` with sentencepiece installed) whatever `tokenizer_class`/`auto_map` say, the
chat template from `tokenizer_config.json`, the slicing settings from `preprocessor_config.json`
and `config.json` (which must agree, as the official `chat()` asserts). `save_pretrained` writes
the same layout back, keeping the keys vlmtune does not use (auto_map, processor_class, audio
settings), so a saved folder still loads with the official code beside it.

Model inputs of one call (the contract with `modeling.py`), for B texts:
    input_ids [B, L], attention_mask [B, L],
    mm_token_type_ids [B, L]: 1 on exactly the `query_num` placeholder tokens inside each
        `<image>...</image>` (and, from 2.6 on, `<slice>...</slice>`) span, 0 elsewhere,
    pixel_values [P_total, 3*p*p], tgt_sizes [n_slices, 2]  (see `image_processing.py`),
    with sum(h*w over tgt_sizes) == P_total and n_slices * query_num == mm_token_type_ids.sum().
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from transformers import BatchFeature

from vlmtune.errors import VlmtuneError
from vlmtune.models.minicpmv.chat_format import (CHATML_TEMPLATE, END_OF_TURN, IMAGE_TAG, MINICPMV2_TEMPLATE,
                                                 string_messages)
from vlmtune.models.minicpmv.image_processing import MiniCPMVImageProcessor
from vlmtune.models.minicpmv.version import MINICPMV2, detect_arch

# `(config.json key, preprocessor_config.json key)` pairs the official `chat()` asserts equal.
_SHARED_SETTINGS = (("query_num", "image_feature_size"), ("patch_size", "patch_size"),
                    ("use_image_id", "use_image_id"), ("max_slice_nums", "max_slice_nums"),
                    ("scale_resolution", "scale_resolution"), ("slice_mode", "slice_mode"))
# tokenizer_config.json keys written back on save so the official tokenizer class still loads it
_KEPT_TOKENIZER_KEYS = ("auto_map", "tokenizer_class")


class MiniCPMVProcessor:
    """Tokenizer + slicing image processor + chat template of one MiniCPM-V checkpoint.

    Args:
        tokenizer: a transformers tokenizer holding the placeholder tokens as single tokens.
        image_processor: slicing settings (`version` decides the placeholder layout).
        chat_template: Jinja template over string contents; the version's default when None.
        tokenizer_extra: `tokenizer_config.json` keys kept for `save_pretrained` (auto_map, ...).
    """

    def __init__(self, tokenizer, image_processor: MiniCPMVImageProcessor, chat_template: str | None = None,
                 tokenizer_extra: dict | None = None):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.version = image_processor.version
        self.image_token = IMAGE_TAG
        self.end_of_turn = END_OF_TURN[self.version]
        default = MINICPMV2_TEMPLATE if self.version < 2.6 else CHATML_TEMPLATE
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None) or default
        self.tokenizer_extra = dict(tokenizer_extra or {})
        ip = image_processor
        # the span tokens must be single tokens to find the query positions; image ids are plain text
        self._ids = {name: self._token_id(getattr(ip, name))
                     for name in ("im_start", "im_end", "slice_start", "slice_end", "unk")}
        # 2.0 wraps a whole grid in one <slice>...</slice> holding <image> cells; 2.6 makes each cell a <slice> span
        self._open = {self._ids["im_start"]} | ({self._ids["slice_start"]} if self.version >= 2.6 else set())
        self._close = {self._ids["im_end"]} | ({self._ids["slice_end"]} if self.version >= 2.6 else set())

    def _token_id(self, token: str) -> int:
        ids = self.tokenizer(token, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise VlmtuneError(f"MiniCPM-V processor: the tokenizer does not hold {token!r} as one token (it encodes "
                               f"to {len(ids)} ids); is this a MiniCPM-V {self.version} tokenizer?")
        return ids[0]

    # -- chat -------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], tokenize: bool = False, add_generation_prompt: bool = False,
                            **kwargs) -> str:
        """The prompt text of `messages` (HF parts or `chat()`-style contents), images as `(<image>./</image>)`.

        With use_image_id, each tag is preceded by its `<image_id>N</image_id>`, numbered over the
        whole conversation as `chat()` numbers them; written here rather than by `__call__` so that
        a conversation processed piece by piece (vlmtune's Encoder) keeps one numbering.
        """
        if tokenize:
            raise VlmtuneError("MiniCPMVProcessor.apply_chat_template renders text only (tokenize=False); "
                               "pass the text and the images to the processor to get model inputs")
        text = self.tokenizer.apply_chat_template(string_messages(messages, self.version), tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  chat_template=self.chat_template, **kwargs)
        ip = self.image_processor
        if not (ip.use_image_id and self.version >= 2.6):
            return text
        pieces = text.split(IMAGE_TAG)
        return "".join(piece + (ip.image_id(i) + IMAGE_TAG if i < len(pieces) - 1 else "")
                       for i, piece in enumerate(pieces))

    # -- model inputs -----------------------------------------------------------------------
    def _expand(self, text: str, grids: list) -> str:
        """`text` with each image tag replaced by its placeholder (`grids`: one per tag, in order)."""
        ip = self.image_processor
        pieces = text.split(IMAGE_TAG)
        out = pieces[0]
        for i, (grid, piece) in enumerate(zip(grids, pieces[1:])):
            numbered = re.search(re.escape(ip.im_id_start) + r"\d+" + re.escape(ip.im_id_end) + r"$", out)
            out += ip.placeholder(grid, None if numbered else i) + piece
        return out

    def _mm_mask(self, ids: list[int], expected_spans: int, where: str) -> list[int]:
        """1 on the query tokens of each image/slice span; checks every span holds exactly query_num."""
        q, unk = self.image_processor.image_feature_size, self._ids["unk"]
        mask = [0] * len(ids)
        spans, i = 0, 0
        while i < len(ids):
            if ids[i] in self._open:
                inner = ids[i + 1: i + 1 + q]
                if len(inner) != q or any(t != unk for t in inner) or i + 1 + q >= len(ids) \
                        or ids[i + 1 + q] not in self._close:
                    raise VlmtuneError(f"{where}: an image start token at position {i} is not followed by {q} "
                                       "placeholder tokens and an end token; does the text hold a literal "
                                       f"{self.image_processor.im_start!r} or {self.image_processor.slice_start!r}?")
                mask[i + 1: i + 1 + q] = [1] * q
                spans += 1
                i += q + 2
            else:
                i += 1
        if spans != expected_spans:
            raise VlmtuneError(f"{where}: {spans} image/slice spans in the tokens but the images give {expected_spans} "
                               "slices; does the text hold literal image tokens?")
        return mask

    def __call__(self, text: str | list[str] | None = None, images: list | None = None,
                 add_special_tokens: bool = False, return_tensors: str | None = "pt",
                 max_slice_nums: int | None = None, padding_side: str | None = None, **kwargs) -> BatchFeature:
        """Model inputs for `text` (one string or a batch) and the images its tags stand for, in order.

        `add_special_tokens` is False by default because the chat templates already write every
        special token (2.0's `<s>`); adding them again would double the BOS.
        """
        if text is None:
            raise VlmtuneError("MiniCPMVProcessor needs text holding one (<image>./</image>) per image")
        if return_tensors not in ("pt", None):
            raise VlmtuneError(f"MiniCPMVProcessor returns PyTorch tensors only, not return_tensors={return_tensors!r}")
        texts = [text] if isinstance(text, str) else list(text)
        if images is not None and not isinstance(images, (list, tuple)):
            images = [images]
        flat = [im for item in (images or []) for im in (item if isinstance(item, (list, tuple)) else [item])]
        tags = [t.count(IMAGE_TAG) for t in texts]
        if sum(tags) != len(flat):
            raise VlmtuneError(f"MiniCPMVProcessor: {len(flat)} image(s) for {sum(tags)} {IMAGE_TAG} tag(s) "
                               "in the text")
        vision = self.image_processor(flat, max_slice_nums) if flat else None
        rows, masks, start = [], [], 0
        for b, (t, n) in enumerate(zip(texts, tags)):
            grids = vision["grids"][start: start + n] if vision else []
            start += n
            ids = self.tokenizer(self._expand(t, grids), add_special_tokens=add_special_tokens)["input_ids"]
            spans = sum(1 + (g[0] * g[1] if g else 0) for g in grids)
            masks.append(self._mm_mask(ids, spans, f"MiniCPMVProcessor (text {b})"))
            rows.append(ids)
        data = self._pad(rows, masks, padding_side or getattr(self.tokenizer, "padding_side", "right"))
        if vision is not None:
            data["pixel_values"] = vision["pixel_values"]
            data["tgt_sizes"] = vision["tgt_sizes"]
        return BatchFeature(data)

    def _pad(self, rows: list[list[int]], masks: list[list[int]], side: str) -> dict[str, torch.Tensor]:
        longest = max(len(r) for r in rows)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        out = {"input_ids": [], "attention_mask": [], "mm_token_type_ids": []}
        for ids, mask in zip(rows, masks):
            fill = longest - len(ids)
            for key, value, pad in (("input_ids", ids, pad_id), ("attention_mask", [1] * len(ids), 0),
                                    ("mm_token_type_ids", mask, 0)):
                out[key].append(value + [pad] * fill if side == "right" else [pad] * fill + value)
        return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}

    # -- decoding ---------------------------------------------------------------------------
    def batch_decode(self, *args, **kwargs) -> list[str]:
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs) -> str:
        return self.tokenizer.decode(*args, **kwargs)

    # -- files ------------------------------------------------------------------------------
    def to_json_string(self) -> str:
        """Everything this processor does to text and images except the tokenizer (cache fingerprints)."""
        return json.dumps({"class": type(self).__name__, "image_processor": self.image_processor.to_dict(),
                           "chat_template": self.chat_template}, sort_keys=True, ensure_ascii=False)

    def save_pretrained(self, folder: str | Path, **kwargs) -> None:
        """`preprocessor_config.json`, the tokenizer files and `tokenizer_config.json` holding the chat
        template, as in the official checkpoint folders."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(folder)
        config_path = folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        config.update(self.tokenizer_extra)
        config["chat_template"] = self.chat_template
        (folder / "chat_template.jinja").unlink(missing_ok=True)  # the official folders keep it in the config
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        (folder / "preprocessor_config.json").write_text(
            json.dumps(self.image_processor.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    @classmethod
    def from_pretrained(cls, folder: str | Path, **kwargs) -> MiniCPMVProcessor:
        return load_minicpm_processor(folder, **kwargs)


# -- loading -------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise VlmtuneError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    if not isinstance(value, dict):
        raise VlmtuneError(f"{path}: holds a JSON {type(value).__name__}, not an object")
    return value


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value


def _chat_template(folder: Path, config: dict) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if template:
        return template
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    return _read_json(folder / "chat_template.json").get("chat_template")


def load_tokenizer(folder: Path):
    """The tokenizer of `folder` from its data files only; `tokenizer_class` and `auto_map` are ignored."""
    config = _read_json(folder / "tokenizer_config.json")
    special = {k: _token_text(config[k]) for k in ("bos_token", "eos_token", "unk_token", "pad_token") if config.get(k)}
    if (folder / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast

        tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), **special)
    elif (folder / "tokenizer.model").is_file():
        try:
            import sentencepiece  # noqa: F401
        except ImportError:
            raise VlmtuneError(f"{folder}: the tokenizer is only in tokenizer.model (sentencepiece); install "
                               "sentencepiece (pip install sentencepiece protobuf) so vlmtune can convert it") from None
        from transformers import LlamaTokenizer

        # a concrete class: from_pretrained converts tokenizer.model and never resolves auto_map
        tokenizer = LlamaTokenizer.from_pretrained(str(folder), legacy=config.get("legacy", True), **special)
    else:
        raise VlmtuneError(f"{folder}: no tokenizer.json or tokenizer.model; is this a MiniCPM-V checkpoint folder?")
    if config.get("model_max_length"):
        tokenizer.model_max_length = config["model_max_length"]
    if config.get("padding_side") in ("left", "right"):
        tokenizer.padding_side = config["padding_side"]
    return tokenizer


def _infer_version(folder: Path, model_config: dict, pre: dict) -> float:
    """2.0 or 2.6: from config.json's architecture when there is one (`version.detect_arch`), else
    from preprocessor_config.json (a LoRA checkpoint folder holds only the processor files)."""
    if model_config.get("model_type"):
        arch = detect_arch(model_config, str(folder / "config.json"))
        version = 2.0 if arch == MINICPMV2 else 2.6
        if pre.get("version") is not None and float(pre["version"]) != version:
            raise VlmtuneError(f"{folder}: preprocessor_config.json says version {pre['version']} but config.json "
                               f"describes {arch}; fix preprocessor_config.json")
        return version
    if pre.get("version") is not None:
        return float(pre["version"])
    return 2.6 if pre.get("use_image_id") else 2.0  # the official image processor's default version is 2.0


def image_settings(folder: Path, max_slice_nums: int | None = None) -> dict:
    """Slicing settings from preprocessor_config.json and config.json, checked to agree."""
    pre = _read_json(folder / "preprocessor_config.json")
    model_config = _read_json(folder / "config.json")
    flat = {**model_config, **(model_config.get("slice_config") or {})}
    settings = dict(pre)
    for config_key, pre_key in _SHARED_SETTINGS:
        if config_key not in flat:
            continue
        value = flat[config_key]
        if pre_key in pre and pre[pre_key] != value:
            raise VlmtuneError(f"{folder}: config.json has {config_key}={value!r} but preprocessor_config.json has "
                               f"{pre_key}={pre[pre_key]!r}; the official chat() requires them equal; fix one of them")
        settings.setdefault(pre_key, value)
    settings["version"] = _infer_version(folder, model_config, pre)
    if max_slice_nums is not None:
        settings["max_slice_nums"] = int(max_slice_nums)
    return settings


def load_minicpm_processor(folder: str | Path, max_slice_nums: int | None = None) -> MiniCPMVProcessor:
    """The processor of an official MiniCPM-V 2.0 / 2.6 / MiniCPM-o 2.6 folder or one vlmtune saved.

    Args:
        folder: the checkpoint folder (or a LoRA checkpoint folder holding the processor files).
        max_slice_nums: overrides the folder's value (the tutorials' `max_slice_nums`).

    Raises:
        VlmtuneError: missing tokenizer, disagreeing settings, unsupported version, missing tokens.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise VlmtuneError(f"{folder}: no such folder")
    tokenizer_config = _read_json(folder / "tokenizer_config.json")
    image_processor = MiniCPMVImageProcessor.from_dict(image_settings(folder, max_slice_nums))
    tokenizer = load_tokenizer(folder)
    kept = {k: tokenizer_config[k] for k in _KEPT_TOKENIZER_KEYS if k in tokenizer_config}
    return MiniCPMVProcessor(tokenizer, image_processor, _chat_template(folder, tokenizer_config), kept)
