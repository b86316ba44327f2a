"""Mixed training data for the distributed tests: one-image, two-image and text-only samples, and the
order in which two processes (one sample each per step) and one process (two per step) see them.

Eight samples, so that `LengthGroupedSampler` cuts the same order for a batch of 2 on one process as
for a batch of 1 on each of two: its mega-batches hold min(n // (4 * batch), 50) * batch samples,
2 either way (n = 8). Step k then trains on samples order[2k] and order[2k + 1], on one process
padded into one batch, on two as one sample per rank (rank 0 the first). For a model that takes the
step's token count (Qwen2-VL, vlmtune's MiniCPM-V; not Qwen2.5-VL or Qwen3-VL, which transformers marks
`accepts_loss_kwargs = False`), the Trainer normalises the loss by the label tokens of the whole step
across ranks (`average_tokens_across_devices`), so both runs compute the same loss and gradients, up to
float rounding: same loss curve.
"""

from __future__ import annotations

from pathlib import Path

from conftest import COLOURS, SHAPES, draw, write_json

N = 8
SEED = 5  # train.seed: steps of (2 images | text), (1 | 1), (0 | 0), (2 | 1) ... (checked in the tests)


def mixed_records(folder: Path) -> list[dict]:
    """3 one-image, 1 two-image and 4 text-only records (MiniCPM format), images in `folder/images`."""
    records = []
    for i in range(3):
        colour, shape = COLOURS[i], SHAPES[i]
        draw(Path(folder) / "images" / f"m{i}.png", colour, shape)
        records.append({"id": f"one{i}", "image": f"images/m{i}.png", "conversations": [
            {"role": "user", "content": "<image>\nWhat is in the image?"},
            {"role": "assistant", "content": f"a {colour} {shape}"}]})
    draw(Path(folder) / "images" / "m3.png", "yellow", "square")
    draw(Path(folder) / "images" / "m4.png", "blue", "circle")
    records.append({"id": "two", "image": {"<image_00>": "images/m3.png", "<image_01>": "images/m4.png"},
                    "conversations": [
                        {"role": "user", "content": "<image_00>\n<image_01>\nWhat is in the two images?"},
                        {"role": "assistant", "content": "a yellow square and a blue circle"}]})
    texts = ["Name a colour.", "Name a shape with three sides.", "What colour is the sky?",
             "How many sides has a square?"]
    answers = ["red", "a triangle", "blue", "four"]
    for i, (q, a) in enumerate(zip(texts, answers)):
        records.append({"id": f"text{i}", "conversations": [{"role": "user", "content": q},
                                                             {"role": "assistant", "content": a}]})
    assert len(records) == N
    return records


def write_mixed(folder: Path) -> str:
    return write_json(Path(folder) / "mixed.json", mixed_records(folder))


def step_pairs(data: str, processor, family, seed: int = SEED, epochs: int = 2) -> list[tuple[int, int]]:
    """(rank 0's sample, rank 1's sample) per step of a two-process run of batch 1, as the training
    sampler orders them (the pre-flight token lengths, the seed, one more per epoch)."""
    from vlmtune.data.collate import LengthGroupedSampler
    from vlmtune.data.encode import Encoder
    from vlmtune.data.formats import load_samples

    encoder = Encoder(processor, family)
    lengths = [encoder.count_tokens(s) for s in load_samples(data)]
    sampler = LengthGroupedSampler(lengths, 1, seed=seed)
    pairs = []
    for _ in range(epochs):
        order = list(sampler)
        pairs += [(order[i], order[i + 1]) for i in range(0, len(order), 2)]
    return pairs


def n_images(record: dict) -> int:
    image = record.get("image")
    return 0 if image is None else (len(image) if isinstance(image, dict) else 1)
