"""What an evaluation item is, and how predictions are scored against it.

Records that ask the same thing (same image(s), same turns before the answer) are one item: a
COCO image with five captions is asked once and scored against all five. `vlmtune eval`, the
validation generation during training and the report all count items this way, and `generate`
answers each distinct prompt once by the same key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from vlmtune.data.sample import IMAGE, Sample
from vlmtune.metrics import compute_metrics, sample_scores


def prompt_text(sample: Sample) -> str:
    """The user messages a model answers, placeholders removed: the `prompt` field of result rows."""
    return "\n".join(t.text.replace(IMAGE, "").strip() for t in sample.prompt_turns() if t.role == "user")


def item_key(sample: Sample) -> tuple:
    """What a record asks: its images and the turns before its answer. Records with equal keys
    are one evaluation item."""
    images = tuple(i if "://" in i else os.path.normpath(os.path.abspath(i)) for i in sample.images)
    return images, tuple((t.role, t.text) for t in sample.prompt_turns())


@dataclass
class EvalItem:
    """One thing to evaluate: the records that ask the same about the same image(s). Each of
    their answers is an accepted reference (COCO gives five captions per image)."""

    records: list[Sample]
    indices: list[int]  # positions of the records in the list they were grouped from

    @property
    def sample(self) -> Sample:
        """The record the model is asked with (the first; the others ask the same)."""
        return self.records[0]

    @property
    def references(self) -> list[str]:
        return [r.answer() for r in self.records]


def group_items(samples: list[Sample]) -> list[EvalItem]:
    """The evaluation items of `samples`, in the order of their first record."""
    items: dict[tuple, EvalItem] = {}
    for i, sample in enumerate(samples):
        item = items.setdefault(item_key(sample), EvalItem([], []))
        item.records.append(sample)
        item.indices.append(i)
    return list(items.values())


def first_items(samples: list[Sample], n: int | None) -> list[Sample]:
    """The records of the first `n` items (all records for None): a limit that never leaves an
    item with part of its references."""
    if n is None:
        return samples
    keep = {i for item in group_items(samples)[:n] for i in item.indices}
    return [s for i, s in enumerate(samples) if i in keep]


def item_row(task: str, index: int, item: EvalItem, prediction: str) -> dict:
    """One line of predictions.jsonl. `reference` (the first) stays for readers of one reference."""
    references = item.references
    return {"index": index, "source": item.sample.source, "sources": [r.source for r in item.records],
            "images": item.sample.images, "prompt": prompt_text(item.sample), "reference": references[0],
            "references": references, "prediction": prediction,
            "scores": sample_scores(task, prediction, references)}


def score(task: str, samples: list[Sample], predictions: list[str]) -> tuple[dict[str, float], list[dict]]:
    """Corpus metrics and one row per item (the predictions.jsonl schema).

    `predictions` holds one answer per record, as `generate` returns them; records that share
    image(s) and prompt are one item, scored once against all their answers.
    """
    items = group_items(samples)
    answers = [predictions[item.indices[0]] for item in items]
    metrics = compute_metrics(task, answers, [item.references for item in items])
    return metrics, [item_row(task, k, item, answer) for k, (item, answer) in enumerate(zip(items, answers))]
