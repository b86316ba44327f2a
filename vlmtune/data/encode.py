"""From a `Sample` to model inputs: chat template, image tokens, and labels on the answers only.

The conversation is rendered with the model's own chat template and cut into segments at the
assistant turns: for each assistant turn, the text before it (with the generation prompt, e.g.
`<|im_start|>assistant\\n`) is masked, and the answer up to and including the end-of-turn token
(`<|im_end|>`) is trained on. Each segment is tokenized on its own, so the prompt tokens are
exactly the ones the model sees at generation time. Images are expanded into their image tokens
by the processor, segment by segment. Samples are never truncated: one longer than
`max_length` is an error (the pre-flight check reports it before training).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
import torch
from PIL import Image

from vlmtune.data.images import open_image
from vlmtune.data.sample import IMAGE, Sample
from vlmtune.errors import DataError
from vlmtune.models.family import Family

IGNORE_INDEX = -100
TOKEN_KEYS = ("input_ids", "attention_mask", "labels", "mm_token_type_ids", "token_type_ids")


def load_image(path: str, size: tuple[int, int] | None = None) -> Image.Image:
    """An RGB image, resized to `size` = (width, height) when given."""
    with open_image(path) as im:
        im = im.convert("RGB")
    if size is not None and im.size != tuple(size):
        im = im.resize(tuple(size), Image.Resampling.BICUBIC)
    return im


@dataclass
class Encoder:
    """Turns samples into tensors for one processor.

    Args:
        processor: the model's processor (tokenizer + image processor + chat template).
        family: the model family (end-of-turn token, patch factor for fixed resizes).
        prompt: text appended to a user turn that holds only images (seed 002's data files).
        system_prompt: a system turn added to samples that have none.
        image_size: (width, height) every image is resized to, rounded to the patch factor.
        max_length: the longest sample, in tokens with image tokens counted.
    """

    processor: object
    family: Family
    prompt: str | None = None
    system_prompt: str | None = None
    image_size: tuple[int, int] | None = None
    max_length: int | None = None

    def __post_init__(self):
        self.tokenizer = self.processor.tokenizer
        self.image_token = getattr(self.processor, "image_token", None) or "<image>"
        if self.image_size is not None:
            f = self.family.patch_factor
            self.image_size = tuple(max(f, round(s / f) * f) for s in self.image_size)
        self._eot = self.family.end_of_turn
        self._id_tags = self._per_call_image_ids()
        self._image_tokens: dict[tuple[int, int], int] = {}  # (height, width) -> image tokens, for counting
        self._prompts: dict[str, str] = {}  # rendered prompts, by their messages
        self._prompt_tokens: dict[str, int] = {}  # token counts of prompt segments, for counting

    def _per_call_image_ids(self) -> tuple[str, str] | None:
        """The (start, end) tags of the image ids the processor writes before each image, when it
        numbers images from 0 in every call (transformers' MiniCPM-V 4.x processors); else None.

        The encoder calls the processor once per segment, so left alone those ids would restart at
        each turn, while the processor on the whole conversation (and every generation prompt)
        numbers them across it. `_tokenize` writes the ids itself, counted over the conversation.
        """
        start = getattr(self.processor, "image_id_start_token", None)
        end = getattr(self.processor, "image_id_end_token", None)
        if start and end and getattr(self.processor, "default_use_image_id", False):
            return start, end
        return None

    def _number_images(self, text: str, first: int) -> str:
        """`text` with `<image_id>N</image_id>` before each image token, N counted from `first`."""
        start, end = self._id_tags
        pieces = text.split(self.image_token)
        return "".join(piece + (f"{start}{first + i}{end}{self.image_token}" if i < len(pieces) - 1 else "")
                       for i, piece in enumerate(pieces))

    # -- chat messages --------------------------------------------------------------------
    def messages(self, sample: Sample, turns=None) -> list[dict]:
        """The sample as HF chat messages with content parts; images are `{"type": "image"}`."""
        turns = sample.turns if turns is None else turns
        out = []
        if self.system_prompt and not (turns and turns[0].role == "system"):
            out.append({"role": "system", "content": [{"type": "text", "text": self.system_prompt}]})
        for turn in turns:
            text = turn.text
            if self.prompt and turn.role == "user" and IMAGE in text and not text.replace(IMAGE, "").strip():
                text = text + self.prompt
            parts = []
            for i, piece in enumerate(text.split(IMAGE)):
                if i > 0:
                    parts.append({"type": "image"})
                if piece:
                    parts.append({"type": "text", "text": piece})
            out.append({"role": turn.role, "content": parts})
        return out

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def _render_prompt(self, messages: list[dict]) -> str:
        """`render(messages, add_generation_prompt=True)`, remembered: most datasets ask the same few
        questions, so the same prompts come back sample after sample (half the pre-flight check's work)."""
        key = json.dumps(messages, ensure_ascii=False)
        text = self._prompts.get(key)
        if text is None:
            text = self.render(messages, add_generation_prompt=True)
            if len(self._prompts) >= 4096:
                self._prompts.clear()
            self._prompts[key] = text
        return text

    def segments(self, sample: Sample) -> list[tuple[str, bool]]:
        """(text, trained) pieces whose concatenation is the rendered conversation."""
        messages = self.messages(sample)
        segments: list[tuple[str, bool]] = []
        done = ""
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prefix = self._render_prompt(messages[:i])
            full = self.render(messages[: i + 1])
            if not prefix.startswith(done) or not full.startswith(prefix):
                raise DataError(f"{sample.source}: the chat template does not render turn by turn (each prefix of the "
                                "conversation must start the next); vlmtune cannot mask this template's prompts")
            segments.append((prefix[len(done):], False))
            answer = full[len(prefix):]
            cut = self._answer_end(answer, message)
            segments.append((answer[:cut], True))
            if answer[cut:]:
                segments.append((answer[cut:], False))
            done = full
        # A conversation that ends with an answer is rendered whole already (`done`); the template is
        # deterministic, so rendering it again only costs time (a third of the pre-flight check's).
        ends_with_answer = bool(messages) and messages[-1]["role"] == "assistant"
        rest = "" if ends_with_answer else self.render(messages)[len(done):]
        if rest:
            segments.append((rest, False))
        return [(text, trained) for text, trained in segments if text]

    def _answer_end(self, answer: str, message: dict) -> int:
        """Where the trained part of a rendered answer ends: just after its end-of-turn token."""
        content = "".join(p.get("text", "") for p in message["content"])
        start = answer.find(content) + len(content) if content and content in answer else 0
        if self._eot is None:  # generic families: the first special token after the content
            specials = [t for t in self.tokenizer.all_special_tokens if t and t in answer[start:]]
            self._eot = min(specials, key=lambda t: answer.index(t, start)) if specials else ""
        if self._eot and self._eot in answer[start:]:
            return answer.index(self._eot, start) + len(self._eot)
        return len(answer)

    # -- tensors --------------------------------------------------------------------------
    def _images(self, paths: list[str]) -> list[Image.Image]:
        return [load_image(p, self.image_size) for p in paths]

    def _tokenize(self, pieces: list[tuple[str, bool]], images: list[str], source: str) -> dict[str, torch.Tensor]:
        ids, labels, extra_tokens, vision = [], [], {}, {}
        next_image = 0
        for text, trained in pieces:
            n = text.count(self.image_token)
            if n:
                seg_images = self._images(images[next_image: next_image + n])
                kwargs = {}
                if self._id_tags:
                    text, kwargs = self._number_images(text, next_image), {"use_image_id": False}
                next_image += n
                enc = self.processor(text=[text], images=seg_images, add_special_tokens=False, return_tensors="pt",
                                     **kwargs)
                for key, value in enc.items():
                    if key in TOKEN_KEYS:
                        if key not in ("input_ids", "attention_mask"):
                            extra_tokens.setdefault(key, []).append(value[0])
                    else:
                        vision.setdefault(key, []).append(value)
                seg_ids = enc["input_ids"][0].tolist()
            else:
                seg_ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
                for key in extra_tokens:
                    extra_tokens[key].append(torch.zeros(len(seg_ids), dtype=torch.long))
            ids += seg_ids
            labels += seg_ids if trained else [IGNORE_INDEX] * len(seg_ids)
        if next_image != len(images):
            raise DataError(f"{source}: {len(images)} image(s) but {next_image} image placeholder(s) in the text")
        if self.max_length and len(ids) > self.max_length:
            raise DataError(f"{source}: {len(ids)} tokens (images included) > max_length {self.max_length}; "
                            "raise data.max_length, lower the image pixel budget, or set data.on_bad_sample=skip")
        out = {"input_ids": torch.tensor(ids), "attention_mask": torch.ones(len(ids), dtype=torch.long),
               "labels": torch.tensor(labels)}
        for key, parts in extra_tokens.items():
            # a token-level key that appeared only in later segments: zeros before it
            value = torch.cat(parts)
            out[key] = torch.cat([torch.zeros(len(ids) - len(value), dtype=value.dtype), value])
        for key, parts in vision.items():
            out[key] = torch.cat(parts, dim=self.family.concat_dim(key))
        return out

    def encode(self, sample: Sample) -> dict[str, torch.Tensor]:
        """Training inputs: input_ids, attention_mask, labels (answers only), image tensors."""
        return self._tokenize(self.segments(sample), sample.images, sample.source)

    def encode_prompt(self, sample: Sample) -> dict[str, torch.Tensor]:
        """Generation inputs: every turn before the last answer, then the generation prompt."""
        turns = sample.prompt_turns()
        text = self.render(self.messages(sample, turns), add_generation_prompt=True)
        n_images = sum(t.text.count(IMAGE) for t in turns)
        enc = self._tokenize([(text, False)], sample.images[:n_images], sample.source)
        enc.pop("labels")
        return enc

    def encode_answers(self, sample: Sample, answers: list[str]) -> list[dict[str, torch.Tensor]]:
        """Training inputs for each of `answers` given as the reply to `sample`'s prompt turns:
        the prompt exactly as `encode_prompt` makes it (masked, images processed once for all),
        then the answer up to its end-of-turn token (trained), then the template's rest (masked).
        GRPO scores its sampled answers this way, with SFT's masking."""
        prompt = self.encode_prompt(sample)
        messages = self.messages(sample, sample.prompt_turns())
        prefix = self.render(messages, add_generation_prompt=True)
        out = []
        for answer in answers:
            message = {"role": "assistant", "content": [{"type": "text", "text": answer}] if answer else []}
            full = self.render(messages + [message])
            if not full.startswith(prefix):
                raise DataError(f"{sample.source}: the chat template does not render turn by turn; vlmtune cannot "
                                "mask this template's prompts")
            rendered = full[len(prefix):]
            cut = self._answer_end(rendered, message)
            trained = self.tokenizer(rendered[:cut], add_special_tokens=False)["input_ids"]
            rest = self.tokenizer(rendered[cut:], add_special_tokens=False)["input_ids"] if rendered[cut:] else []
            out.append(with_answer_tokens(prompt, trained, rest))
        return out

    def count_tokens(self, sample: Sample, image_sizes: dict[str, tuple[int, int]] | None = None) -> int:
        """Sequence length of `encode(sample)`; see `count_tokens_batch`.

        Raises:
            DataError: the sample cannot be encoded.
        """
        n = self.count_tokens_batch([sample], image_sizes)[0]
        if isinstance(n, DataError):
            raise n
        return n

    def count_tokens_batch(self, samples: list[Sample],
                           image_sizes: dict[str, tuple[int, int]] | None = None) -> list[int | DataError]:
        """Sequence length of `encode(s)` for each sample, or the `DataError` encoding it raises.

        When the processor can tell image-token counts from image sizes (Qwen families), no pixel is
        decoded: each sample is cut into its segments as `encode` cuts it, each segment is tokenized
        on its own as `encode` tokenizes it (the segments of the whole batch in one tokenizer call;
        prompt segments, which repeat from sample to sample, are counted once), and each image adds
        the token count its size gives, its size read from the file header (or taken from
        `image_sizes`, image -> (width, height)). Otherwise each sample is encoded.
        """
        per_image = getattr(self.processor, "_get_num_multimodal_tokens", None)
        if per_image is None:
            out: list[int | DataError] = []
            for sample in samples:
                try:
                    out.append(len(self.encode(sample)["input_ids"]))
                except DataError as e:
                    out.append(e)
            return out
        pieces: list[list[tuple[str, bool]] | DataError] = []
        for sample in samples:
            try:
                pieces.append(self.segments(sample))
            except DataError as e:
                pieces.append(e)
        todo = list(dict.fromkeys(text for segs in pieces if not isinstance(segs, DataError)
                                  for text, trained in segs if trained or text not in self._prompt_tokens))
        counted = dict(zip(todo, self._text_lengths(todo)))
        known = image_sizes or {}
        out = []
        for sample, segs in zip(samples, pieces):
            if isinstance(segs, DataError):
                out.append(segs)
                continue
            sizes = [self._image_hw(path, known) for path in sample.images]
            missing = [hw for hw in dict.fromkeys(sizes) if hw not in self._image_tokens]
            if missing:
                self._image_tokens.update(zip(missing, per_image(image_sizes=missing).num_image_tokens))
            n_text = sum(counted[t] if t in counted else self._prompt_tokens[t] for t, _ in segs)
            counts = [self._image_tokens[hw] for hw in sizes]
            out.append(n_text + sum(counts) - len(counts))  # each placeholder token becomes `count` tokens
        if len(self._prompt_tokens) > 4096:
            self._prompt_tokens.clear()
        for segs in pieces:
            if not isinstance(segs, DataError):
                self._prompt_tokens.update((text, counted[text]) for text, trained in segs
                                           if not trained and text in counted)
        return out

    def _text_lengths(self, texts: list[str]) -> list[int]:
        """Token counts of `texts`, as `tokenizer(text, add_special_tokens=False)` gives them; a fast
        tokenizer's Rust backend does the whole batch without building Python lists of ids."""
        if not texts:
            return []
        backend = getattr(self.tokenizer, "_tokenizer", None)
        if backend is not None and hasattr(backend, "encode_batch"):
            return [len(e.ids) for e in backend.encode_batch(texts, add_special_tokens=False)]
        return [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def _image_hw(self, path: str, known: dict[str, tuple[int, int]]) -> tuple[int, int]:
        """(height, width) the processor sees for one image: the fixed resize, or the image's own size."""
        if self.image_size is not None:
            w, h = self.image_size
        elif path in known:
            w, h = known[path]
        else:
            with open_image(path) as im:
                w, h = im.size
        return h, w


def with_answer_tokens(prompt: dict[str, torch.Tensor], trained: list[int], rest: list[int] = ()) -> dict[str, torch.Tensor]:
    """`prompt` (from `Encoder.encode_prompt`, masked) followed by the answer tokens `trained`
    (labelled) and `rest` (the template's tail after the answer, masked)."""
    new = torch.tensor(list(trained) + list(rest), dtype=torch.long)
    item = dict(prompt)
    for key in (k for k in prompt if k in TOKEN_KEYS):
        fill = new if key == "input_ids" else torch.ones_like(new) if key == "attention_mask" else torch.zeros_like(new)
        item[key] = torch.cat([prompt[key], fill.to(prompt[key].dtype)])
    item["labels"] = torch.cat([torch.full_like(prompt["input_ids"], IGNORE_INDEX),
                                torch.tensor(list(trained) + [IGNORE_INDEX] * len(rest), dtype=torch.long)])
    return item
