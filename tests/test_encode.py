"""The encoder and the collator on the real tiny Qwen2-VL processor: labels masked exactly (every
assistant turn trained, with its `<|im_end|>`, nothing else), image tokens as the processor
counts them, the seeds' data shapes rendered as the model will see them, padding sides."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from conftest import draw, trained_runs, write_json
from vlmtune.data.collate import Collator, EncodedDataset
from vlmtune.data.encode import IGNORE_INDEX, Encoder
from vlmtune.data.formats import load_samples
from vlmtune.data.sample import IMAGE, Sample, Turn

SYSTEM = "You describe pictures."
ANSWER1 = "a red circle"
ANSWER2 = "a blue square on the left"


def rgb(path: str) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


@pytest.fixture(scope="module")
def multi_turn(tmp_path_factory) -> Sample:
    """Seed 004's MiniCPM multi-image shape: an `{"<image_00>": path, ...}` dict, a system turn,
    two user turns each with an image (of different sizes), two assistant turns."""
    folder = tmp_path_factory.mktemp("multi_turn")
    draw(folder / "a.png", "red", "circle", (112, 112))
    draw(folder / "b.png", "blue", "square", (56, 112))
    path = write_json(folder / "train.json", [{
        "id": "0",
        "image": {"<image_00>": "a.png", "<image_01>": "b.png"},
        "conversations": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": "<image_00>\nWhat is in the first picture?"},
            {"role": "assistant", "content": ANSWER1},
            {"role": "user", "content": "And here? <image_01>"},
            {"role": "assistant", "content": ANSWER2},
        ]}])
    (sample,) = load_samples(path)
    assert [t.role for t in sample.turns] == ["system", "user", "assistant", "user", "assistant"]
    assert sample.images == [str(folder / "a.png"), str(folder / "b.png")]
    return sample


def test_multi_turn_multi_image_labels_are_exactly_the_answers_with_their_end_of_turn(qwen2_vl_parts, multi_turn):
    processor, family = qwen2_vl_parts
    tok = processor.tokenizer
    encoder = Encoder(processor, family)
    enc = encoder.encode(multi_turn)
    ids, labels = enc["input_ids"], enc["labels"]
    im_end = tok.convert_tokens_to_ids("<|im_end|>")

    # The trained tokens, computed independently: each answer's ids, then <|im_end|>.
    expected = [tok(ANSWER1, add_special_tokens=False)["input_ids"] + [im_end],
                tok(ANSWER2, add_special_tokens=False)["input_ids"] + [im_end]]
    assert trained_runs(labels) == expected
    trained = labels != IGNORE_INDEX
    assert int(trained.sum()) == sum(map(len, expected))
    assert torch.equal(labels[trained], ids[trained])  # labels are the input ids, not shifted
    # Everything else is masked: system prompt, user turns, image tokens, generation prompts.
    assert torch.all(labels[~trained] == IGNORE_INDEX)
    for token in ("<|im_start|>", "<|image_pad|>", "<|vision_start|>", "<|vision_end|>"):
        token_id = tok.convert_tokens_to_ids(token)
        assert (ids == token_id).any() and not (labels == token_id).any(), token
    # The newline after each <|im_end|> belongs to the template, not to the answer: masked.
    newline = tok("\n", add_special_tokens=False)["input_ids"]
    assert len(newline) == 1
    ends = [i for i in range(1, len(ids)) if trained[i - 1] and not trained[i]]
    assert len(ends) == 2 and all(ids[i] == newline[0] for i in ends)

    # The whole conversation, rendered and tokenized in one piece by the processor itself, gives
    # the same ids: segment-wise tokenization changed nothing, image tokens included.
    messages = encoder.messages(multi_turn)
    text = processor.apply_chat_template(messages, tokenize=False)
    assert text.count(SYSTEM) == 1 and "You are a helpful assistant." not in text
    images = [rgb(p) for p in multi_turn.images]
    reference = processor(text=[text], images=images, return_tensors="pt")
    assert torch.equal(ids, reference["input_ids"][0])
    assert torch.equal(enc["pixel_values"], reference["pixel_values"])
    assert torch.equal(enc["image_grid_thw"], reference["image_grid_thw"])

    # Image pads: as many as the processor's own count for each image (grid / merge^2), in order.
    merge = processor.image_processor.merge_size
    per_image = [int(g.prod()) // merge**2 for g in reference["image_grid_thw"]]
    assert per_image == [16, 8]  # 112x112 -> 8x8 patches; 56x112 -> 4x8; 2x2 merged
    pad = processor.image_token_id
    assert int((ids == pad).sum()) == sum(per_image)
    starts = (ids == tok.convert_tokens_to_ids("<|vision_start|>")).nonzero().flatten().tolist()
    assert [int((ids[s + 1: s + 1 + n] == pad).sum()) for s, n in zip(starts, per_image)] == per_image
    # count_tokens, which reads only the image sizes, agrees with the real encoding.
    assert encoder.count_tokens(multi_turn) == len(ids)


def test_every_assistant_turn_is_trained_with_the_real_generation_prompt_masked(qwen2_vl_parts, multi_turn):
    processor, family = qwen2_vl_parts
    encoder = Encoder(processor, family)
    enc = encoder.encode(multi_turn)
    tok = processor.tokenizer
    # What precedes each trained run is exactly the generation prompt the model sees at inference.
    prompt = tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    starts = [i for i in range(len(enc["labels"]))
              if enc["labels"][i] != IGNORE_INDEX and (i == 0 or enc["labels"][i - 1] == IGNORE_INDEX)]
    assert len(starts) == 2
    for s in starts:
        assert enc["input_ids"][s - len(prompt): s].tolist() == prompt
    # The generation input for this sample is the conversation up to the last answer, then the prompt.
    gen = encoder.encode_prompt(multi_turn)
    assert "labels" not in gen
    assert gen["input_ids"].tolist() == enc["input_ids"][: starts[1]].tolist()


def test_system_prompt_from_config_is_added_once_and_masked(qwen2_vl_parts, tmp_path):
    processor, family = qwen2_vl_parts
    image = draw(tmp_path / "x.png")
    sample = Sample(images=[image], turns=[Turn("user", IMAGE + "What?"), Turn("assistant", "a red circle")])
    encoder = Encoder(processor, family, system_prompt="Answer in four words.")
    text = encoder.render(encoder.messages(sample))
    assert text.startswith("<|im_start|>system\nAnswer in four words.<|im_end|>\n<|im_start|>user\n")
    enc = encoder.encode(sample)
    tok = processor.tokenizer
    assert trained_runs(enc["labels"]) == [tok("a red circle<|im_end|>", add_special_tokens=False)["input_ids"]]
    # A sample with its own system turn keeps it; the configured one is not added on top.
    own = Sample(images=[image], turns=[Turn("system", "Mine."), *sample.turns])
    assert encoder.render(encoder.messages(own)).count("<|im_start|>system") == 1


def test_seed_002_bare_image_path_gets_the_configured_prompt(qwen2_vl_parts, tmp_path):
    """Seed 002's file: the user value is nothing but an image path; data.prompt supplies the
    question, which the model must see (and which is masked)."""
    processor, family = qwen2_vl_parts
    draw(tmp_path / "LaTeX_OCR" / "0.png")
    path = write_json(tmp_path / "latex_ocr_train.json", [
        {"id": "identity_1", "conversations": [
            {"role": "user", "value": "LaTeX_OCR/0.png"},
            {"role": "assistant", "value": r"\frac{a}{b}"}]}])
    (sample,) = load_samples(path)
    prompt = "What formula is in this picture?"
    encoder = Encoder(processor, family, prompt=prompt)
    text = encoder.render(encoder.messages(sample))
    assert ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>" + prompt + "<|im_end|>\n"
            "<|im_start|>assistant\n" + r"\frac{a}{b}" + "<|im_end|>\n") in text
    enc = encoder.encode(sample)
    tok = processor.tokenizer
    assert trained_runs(enc["labels"]) == [tok(r"\frac{a}{b}<|im_end|>", add_special_tokens=False)["input_ids"]]
    assert tok.decode(enc["input_ids"][enc["labels"] == IGNORE_INDEX]).count(prompt) == 1
    # Without a configured prompt, the image alone is the question.
    assert prompt not in Encoder(processor, family).render(Encoder(processor, family).messages(sample))
    # The prompt goes only to image-only user turns: a turn with its own text keeps it unchanged.
    texted = Sample(images=sample.images, turns=[Turn("user", IMAGE + "Read it."), sample.turns[1]])
    assert prompt not in encoder.render(encoder.messages(texted))


def test_seed_003_vision_tags_render_as_one_image(qwen2_vl_parts, tmp_path):
    processor, family = qwen2_vl_parts
    img = draw(tmp_path / "coco" / "1.png")
    path = write_json(tmp_path / "train.json", [{"id": "identity_1", "conversations": [
        {"from": "user", "value": f"COCO Yes: <|vision_start|>{img}<|vision_end|>"},
        {"from": "assistant", "value": "A snow skier assessing the mountain before starting to ski"}]}])
    (sample,) = load_samples(path)
    encoder = Encoder(processor, family)
    text = encoder.render(encoder.messages(sample))
    assert "<|im_start|>user\nCOCO Yes: <|vision_start|><|image_pad|><|vision_end|><|im_end|>" in text
    assert img not in text
    enc = encoder.encode(sample)
    assert int((enc["input_ids"] == processor.image_token_id).sum()) == 16


@pytest.mark.parametrize("image_size", [None, (280, 280), (500, 100)])
def test_count_tokens_equals_encoded_length(qwen2_vl_parts, tmp_path, image_size):
    """Pre-flight counts tokens from image sizes alone; it must agree with the real encoding for
    images of several shapes, with and without a fixed resize (seed 003: 280x280, seed 000: 500x100)."""
    processor, family = qwen2_vl_parts
    images = [draw(tmp_path / f"{w}x{h}.png", size=(w, h)) for w, h in ((112, 112), (200, 60), (30, 300), (640, 480))]
    encoder = Encoder(processor, family, prompt="Describe.", image_size=image_size)
    samples = [
        Sample(images=[images[0]], turns=[Turn("user", IMAGE), Turn("assistant", "a red circle")]),
        Sample(images=images[1:3], turns=[Turn("user", IMAGE + IMAGE + "Compare."), Turn("assistant", "wide; tall"),
                                          Turn("user", "Sure?"), Turn("assistant", "yes")]),
        Sample(images=[images[3]], turns=[Turn("system", "Be brief."), Turn("user", "Look: " + IMAGE),
                                          Turn("assistant", "big")]),
        Sample(images=[], turns=[Turn("user", "No picture."), Turn("assistant", "ok")]),
    ]
    for sample in samples:
        assert encoder.count_tokens(sample) == len(encoder.encode(sample)["input_ids"])


def test_collator_pads_right_for_training_and_mixes_text_only_and_image_samples(tiny_qwen2_vl, qwen2_vl_parts,
                                                                              tmp_path):
    from transformers import AutoModelForImageTextToText

    processor, family = qwen2_vl_parts
    encoder = Encoder(processor, family)
    images = [draw(tmp_path / "a.png"), draw(tmp_path / "b.png", "green", "triangle")]
    samples = [
        Sample(images=[], turns=[Turn("user", "Say hi."), Turn("assistant", "hi")]),
        Sample(images=[images[0]], turns=[Turn("user", IMAGE + "What is in the image?"),
                                          Turn("assistant", "a red circle")]),
        Sample(images=[images[1]], turns=[Turn("user", IMAGE), Turn("assistant", "a green triangle and a square")]),
    ]
    items = [EncodedDataset(samples, encoder)[i] for i in range(3)]
    pad = processor.tokenizer.pad_token_id
    batch = Collator(pad)(items)
    lengths = [len(item["input_ids"]) for item in items]
    longest = max(lengths)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, longest)
    for row, (item, n) in enumerate(zip(items, lengths)):
        assert torch.equal(batch["input_ids"][row, :n], item["input_ids"])  # content first, padding after
        assert torch.equal(batch["labels"][row, :n], item["labels"])
        assert torch.all(batch["input_ids"][row, n:] == pad)
        assert torch.all(batch["labels"][row, n:] == IGNORE_INDEX)
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (longest - n)
    # Pixels of the two image samples, concatenated in batch order; the text-only one adds none.
    assert torch.equal(batch["pixel_values"], torch.cat([items[1]["pixel_values"], items[2]["pixel_values"]]))
    assert torch.equal(batch["image_grid_thw"], torch.cat([items[1]["image_grid_thw"], items[2]["image_grid_thw"]]))
    if "mm_token_type_ids" in batch:  # text rows are all "text" (0); image rows mark their image tokens
        assert not batch["mm_token_type_ids"][0].any()
        image_tokens = int((items[1]["input_ids"] == processor.image_token_id).sum())
        assert int(batch["mm_token_type_ids"][1].sum()) == image_tokens

    # The mixed batch goes through the real model: one finite loss.
    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen2_vl, dtype=torch.float32)
    with torch.no_grad():
        loss = model(**batch).loss
    assert torch.isfinite(loss)


def test_collator_pads_left_for_generation(qwen2_vl_parts, tmp_path):
    processor, family = qwen2_vl_parts
    encoder = Encoder(processor, family)
    samples = [
        Sample(images=[draw(tmp_path / "a.png")], turns=[Turn("user", IMAGE + "What is in the image?"),
                                                         Turn("assistant", "a red circle")]),
        Sample(images=[], turns=[Turn("user", "Hi."), Turn("assistant", "hello")]),
    ]
    dataset = EncodedDataset(samples, encoder, prompt_only=True)
    items = [dataset[0], dataset[1]]
    pad = processor.tokenizer.pad_token_id
    batch = Collator(pad, padding_side="left")(items)
    assert "labels" not in batch
    longest = max(len(i["input_ids"]) for i in items)
    prompt = processor.tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    for row, item in enumerate(items):
        n = len(item["input_ids"])
        assert torch.equal(batch["input_ids"][row, longest - n:], item["input_ids"])  # content last
        assert torch.all(batch["input_ids"][row, : longest - n] == pad)
        assert batch["attention_mask"][row].tolist() == [0] * (longest - n) + [1] * n
        # every row ends with the generation prompt, at the same position
        assert batch["input_ids"][row, -len(prompt):].tolist() == prompt
    assert longest - len(items[1]["input_ids"]) > 0
