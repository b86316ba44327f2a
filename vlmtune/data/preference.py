"""Preference pairs for DPO: a prompt (with its images) and a chosen and a rejected answer.

    from vlmtune.data.preference import load_pairs, check_pairs
    pairs = load_pairs("data/pairs.jsonl")          # format detected from the first record

A `Pair` is two `Sample`s that share their images and every turn but the last: `chosen` ends with
the preferred answer, `rejected` with the other one. Both are encoded by the run's `Encoder`, so
their labels cover the answer tokens exactly as in SFT. The record shapes people already have
(`PREFERENCE_FORMATS`):

trl           {"prompt", "chosen", "rejected", "images"}: strings, or message lists
              (conversational); without "prompt", chosen/rejected are whole conversations and
              the prompt is what they share (TRL's implicit prompt)
llamafactory  ShareGPT: {"conversations" (ending with the user turn), "chosen": {"from": "gpt",
              "value"}, "rejected": {...}, "images"}; Alpaca: {"instruction", "input", "chosen",
              "rejected", "images"}
swift         ms-swift: {"messages" (ending with the chosen answer), "rejected_response",
              "images"}, or "rejected_messages" (+ "rejected_images") for a whole other conversation
minicpm       a MiniCPM-V conversation ({"image", "conversations"}) plus "rejected_response"

Images of a string prompt without `<image>` placeholders go in front of it, as in TRL.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from vlmtune.data.check import CheckReport, Problem, check_samples
from vlmtune.data.collate import Collator
from vlmtune.data.encode import Encoder
from vlmtune.data.formats import read_records
from vlmtune.data.readers import read_conversations, read_messages
from vlmtune.data.sample import IMAGE, Sample, Turn
from vlmtune.errors import DataError

PREFERENCE_FORMATS = ("trl", "llamafactory", "swift", "minicpm")


@dataclass
class Pair:
    chosen: Sample  # prompt turns + the preferred answer
    rejected: Sample  # the same images and prompt turns + the other answer

    @property
    def source(self) -> str:
        return self.chosen.source


def detect_preference_format(record, where: str) -> str:
    """Which of `PREFERENCE_FORMATS` one record is written in.

    Raises:
        DataError: not an object, or no chosen/rejected answers in any known shape.
    """
    if not isinstance(record, dict):
        raise DataError(f"{where}: record is a {type(record).__name__}, not a JSON object")
    if "rejected_response" in record or "rejected_messages" in record:
        return "swift" if "messages" in record else "minicpm"
    if "chosen" in record and "rejected" in record:
        if "conversations" in record or "instruction" in record:
            return "llamafactory"
        return "trl"
    keys = ", ".join(map(str, record)) or "none"
    raise DataError(f"{where}: not a preference record (keys: {keys}) — give a prompt with 'chosen' and "
                    "'rejected' answers (TRL, LLaMA-Factory) or a conversation with a 'rejected_response' "
                    "(ms-swift, MiniCPM-V); see the README's DPO section")


def _answer(value, key: str, where: str) -> str:
    """The text of one answer: a string, a {"from"/"role", "value"/"content"} turn, or a list of
    assistant messages (TRL's conversational chosen/rejected)."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        texts = []
        for m in value:
            content = m.get("content", m.get("value"))
            if isinstance(content, list):
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            if not isinstance(content, str):
                break
            texts.append(content)
        else:
            return "".join(texts)
    raise DataError(f"{where}: '{key}' is neither a string nor assistant message(s) — give the answer as a "
                    "string or [{\"role\": \"assistant\", \"content\": ...}]")


def _images(record: dict, where: str, key: str = "images") -> list:
    images = record.get(key, record.get("image") if key == "images" else None)
    if images is None:
        return []
    images = [images] if isinstance(images, str) else images
    if not isinstance(images, list):
        raise DataError(f"{where}: '{key}' is a {type(images).__name__} — give a list of image paths")
    return images


def _with_placeholders(text: str, n_images: int) -> str:
    return text if IMAGE in text or not n_images else IMAGE * n_images + text


def _replace_answer(sample: Sample, answer: str) -> Sample:
    turns = list(sample.turns)
    if turns and turns[-1].role == "assistant":
        turns = turns[:-1]
    return Sample(images=list(sample.images), turns=turns + [Turn("assistant", answer)], id=sample.id,
                  source=sample.source, meta=dict(sample.meta))


def _prompt_messages(prompt, images: list, where: str) -> list:
    if isinstance(prompt, str):
        return [{"role": "user", "content": _with_placeholders(prompt, len(images))}]
    if isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
        return prompt
    raise DataError(f"{where}: 'prompt' is neither a string nor a list of messages")


def _read_trl(record: dict, where: str, base: str) -> Pair:
    images = _images(record, where)
    if "prompt" not in record:  # implicit prompt: the shared leading messages
        chosen, rejected = record["chosen"], record["rejected"]
        if not (isinstance(chosen, list) and isinstance(rejected, list)):
            raise DataError(f"{where}: without a 'prompt', 'chosen' and 'rejected' must be whole conversations "
                            "(lists of messages)")
        shared = 0
        while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
            shared += 1
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    else:
        prompt, chosen, rejected = _prompt_messages(record["prompt"], images, where), record["chosen"], record["rejected"]
    chosen_text = _answer(chosen, "chosen", where)
    sample = read_messages({"messages": list(prompt) + [{"role": "assistant", "content": chosen_text}],
                            "images": images, **({"id": record["id"]} if "id" in record else {})}, where, base)
    return Pair(sample, _replace_answer(sample, _answer(rejected, "rejected", where)))


def _read_llamafactory(record: dict, where: str, base: str) -> Pair:
    images = _images(record, where)
    if "conversations" in record:  # ShareGPT: the conversation ends with the user's turn
        turns = record["conversations"]
        if not isinstance(turns, list):
            raise DataError(f"{where}: 'conversations' is not a list of turns")
        conversation = list(turns) + [{"from": "gpt", "value": _answer(record["chosen"], "chosen", where)}]
        if isinstance(record.get("system"), str):
            conversation = [{"from": "system", "value": record["system"]}] + conversation
    else:  # Alpaca: instruction (+ input) is the user's turn
        instruction = record.get("instruction")
        if not isinstance(instruction, str):
            raise DataError(f"{where}: 'instruction' is missing or not a string")
        user = instruction + ("\n" + record["input"] if isinstance(record.get("input"), str) and record["input"] else "")
        conversation = [{"from": "human", "value": _with_placeholders(user, len(images))},
                        {"from": "gpt", "value": _answer(record["chosen"], "chosen", where)}]
        if isinstance(record.get("system"), str):
            conversation = [{"from": "system", "value": record["system"]}] + conversation
    sample = read_conversations({"conversations": conversation, "images": images,
                                 **({"id": record["id"]} if "id" in record else {})}, "llava", where, base)
    return Pair(sample, _replace_answer(sample, _answer(record["rejected"], "rejected", where)))


def _read_rejected_response(record: dict, fmt: str, where: str, base: str) -> Pair:
    plain = {k: v for k, v in record.items() if k not in ("rejected_response", "rejected_messages", "rejected_images")}
    sample = read_messages(plain, where, base) if fmt == "swift" else read_conversations(plain, "minicpm", where, base)
    if "rejected_response" in record:
        return Pair(sample, _replace_answer(sample, _answer(record["rejected_response"], "rejected_response", where)))
    other = read_messages({"messages": record["rejected_messages"],
                           "images": _images(record, where, "rejected_images") or _images(record, where)}, where, base)
    return Pair(sample, other)


def read_pair(record, fmt: str, where: str, base: str) -> Pair:
    """Read one record of preference format `fmt` into a `Pair`."""
    if fmt == "trl":
        return _read_trl(record, where, base)
    if fmt == "llamafactory":
        return _read_llamafactory(record, where, base)
    return _read_rejected_response(record, fmt, where, base)


def load_pairs(path: str | os.PathLike, format: str | None = None) -> list[Pair]:
    """Read a preference file (.json or .jsonl) into `Pair`s with absolute image paths.

    Args:
        format: one of `PREFERENCE_FORMATS`; None detects it per record.

    Raises:
        DataError: unreadable or empty file, or a record that is not a preference record; the
            message names file and index.
    """
    path = os.fspath(path)
    if format is not None and format not in PREFERENCE_FORMATS:
        raise DataError(f"{path}: {format!r} is not a preference format — use one of {', '.join(PREFERENCE_FORMATS)}, "
                        "or leave data.format unset to detect it")
    records = read_records(path)
    base = os.path.dirname(os.path.abspath(path))
    pairs = []
    for i, record in enumerate(records):
        where = f"{path}:{i}"
        pairs.append(read_pair(record, format or detect_preference_format(record, where), where, base))
    return pairs


# -- pre-flight ------------------------------------------------------------------------------------

def check_pairs(pairs: list[Pair], encoder: Encoder | None = None, max_length: int | None = None,
                progress: bool = True) -> CheckReport:
    """Every problem of every pair, as `FILE:INDEX: ...`: those of its chosen sample (images,
    placeholders, roles, length), those of its rejected sample that differ (its length, an empty
    answer), and the pair's own: both answers the same, or prompts that differ. Token lengths
    are the chosen samples'."""
    report = check_samples([p.chosen for p in pairs], encoder, max_length, progress)
    rejected = check_samples([p.rejected for p in pairs], encoder, max_length, progress=False)
    seen = {(p.index, p.message) for p in report.problems}
    for problem in rejected.problems:
        if (problem.index, problem.message) not in seen:
            report.problems.append(Problem(problem.index, problem.source, f"rejected: {problem.kind}",
                                           f"rejected answer: {problem.message}"))
    for i, pair in enumerate(pairs):
        if pair.chosen.turns[:-1] != pair.rejected.turns[:-1] or pair.chosen.images != pair.rejected.images:
            report.problems.append(Problem(i, pair.source, "prompts differ",
                                           "chosen and rejected do not share their prompt and images; a pair "
                                           "compares two answers to the same prompt"))
        elif pair.chosen.answer().strip() == pair.rejected.answer().strip():
            report.problems.append(Problem(i, pair.source, "chosen == rejected",
                                           "the chosen and the rejected answer are the same; the pair "
                                           "teaches nothing — fix or remove it"))
    report.problems.sort(key=lambda p: p.index)
    return report


# -- tensors ---------------------------------------------------------------------------------------

class PairDataset(Dataset):
    """`pairs[i]` encoded on access: {"chosen": encoded chosen sample, "rejected": ...}."""

    def __init__(self, pairs: list[Pair], encoder: Encoder):
        self.pairs = pairs
        self.encoder = encoder

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        pair = self.pairs[i]
        return {"chosen": self.encoder.encode(pair.chosen), "rejected": self.encoder.encode(pair.rejected)}


class PairCollator:
    """One padded batch of 2B rows: the B chosen samples, then the B rejected ones (in the same
    order), so a single forward pass scores both and row i pairs with row B + i."""

    def __init__(self, pad_token_id: int, concat_dims: tuple[tuple[str, int], ...] = ()):
        self.collate = Collator(pad_token_id, concat_dims=concat_dims)

    def __call__(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        return self.collate([item["chosen"] for item in batch] + [item["rejected"] for item in batch])
