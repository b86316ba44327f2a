"""The seeds' Qwen2-VL fine-tuning pipeline (seed 002, LaTeX OCR; seed 003 is the same code with
280x280 images and the "COCO Yes:" prompt), re-created as the baseline of bench/train_speed.py.

    .venv/bin/python bench/train_speed.py     # runs this and `vlmtune train` side by side

What is copied from the seeds (their train.py), step by step:
  - the data file is the seeds' `[{"id", "conversations": [{"role": "user", "value": IMAGE_PATH},
    {"role": "assistant", "value": ANSWER}]}]` (csv2json.py's output), read with `Dataset.from_json`;
  - `process_func`: the chat template with an image part resized to a fixed 500x100 (height x width,
    as seed 002 writes it) plus the prompt, the processor on that one sample, *every* output tensor
    turned into nested Python lists (`.tolist()`, pixel values included), the answer tokenized on its
    own, `<|endoftext|>` (the pad token) appended and trained on, labels -100 on the prompt;
  - `train_ds.map(process_func)` over the whole dataset before training (the result is cached on disk);
  - LoRA r=64, alpha=16, dropout 0.05 on q/k/v/o/gate/up/down_proj; gradient checkpointing with
    `enable_input_require_grads`; `DataCollatorForSeq2Seq(tokenizer, padding=True)`; `Trainer` with
    batch size 4, learning rate 1e-4, and the default DataLoader (no workers).

What differs, and why:
  - `qwen_vl_utils.process_vision_info` is replaced by `fetch_image` below, which does what it does
    for a local file with `resized_height`/`resized_width` (open, RGB, round both sides to a multiple
    of 28, resize); qwen_vl_utils is not a vlmtune dependency;
  - the model is a local tiny Qwen2-VL in float32 (the seeds load Qwen2-VL-2B in bf16 on a GPU);
  - gradient accumulation 1 and a fixed number of steps (the seeds: 4 and 2 epochs), so that both
    pipelines take the same optimizer steps on the same batches sizes;
  - transformers 5 computes M-RoPE positions from `mm_token_type_ids`, which transformers 4.46 (the
    seeds' pin) derived from `input_ids`; the collator adds it from `input_ids` (1 on image tokens),
    a cheap tensor comparison per batch. Nothing else in the data path is changed;
  - `Dataset.from_json` gets a `cache_dir`, so that the benchmark can measure the cache's size.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

MAX_LENGTH = 8192  # seed 002's truncation length (never reached here)
IMAGE_FACTOR = 28  # qwen_vl_utils: patch 14 x merge 2
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def write_seed_json(samples: list[dict], images_root: Path, path: Path) -> Path:
    """The seeds' data file (csv2json.py) from vlmtune synth records: absolute image path, answer."""
    records = [{"id": f"identity_{i + 1}",
                "conversations": [{"role": "user", "value": str((images_root / r["image"]).resolve())},
                                  {"role": "assistant", "value": r["conversations"][1]["content"]}]}
               for i, r in enumerate(samples)]
    path.write_text(json.dumps(records, ensure_ascii=False, indent=2), encoding="utf-8")
    return path


def fetch_image(path: str, resized_height: int, resized_width: int) -> Image.Image:
    """qwen_vl_utils.fetch_image for a local file with a fixed size: both sides rounded to a multiple
    of 28 (500x100 becomes 504x112), then a plain PIL resize."""
    image = Image.open(path).convert("RGB")
    height = max(IMAGE_FACTOR, round(resized_height / IMAGE_FACTOR) * IMAGE_FACTOR)
    width = max(IMAGE_FACTOR, round(resized_width / IMAGE_FACTOR) * IMAGE_FACTOR)
    return image.resize((width, height))


def make_process_func(processor, tokenizer, prompt: str, resized_height: int = 500, resized_width: int = 100):
    """Seed 002's `process_func`, with `processor`/`tokenizer`/`prompt` passed in instead of globals."""

    def process_func(example):
        conversation = example["conversations"]
        image_file_path = conversation[0]["value"]
        output_content = conversation[1]["value"]
        messages = [{"role": "user", "content": [
            {"type": "image", "image": image_file_path, "resized_height": resized_height,
             "resized_width": resized_width},
            {"type": "text", "text": prompt}]}]
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        image_inputs = [fetch_image(image_file_path, resized_height, resized_width)]  # process_vision_info
        inputs = processor(text=[text], images=image_inputs, videos=None, padding=True, return_tensors="pt")
        inputs = {key: value.tolist() for key, value in inputs.items()}  # the seed: "tensor -> list, to concatenate"
        instruction = inputs

        response = tokenizer(f"{output_content}", add_special_tokens=False)

        input_ids = instruction["input_ids"][0] + response["input_ids"] + [tokenizer.pad_token_id]
        attention_mask = instruction["attention_mask"][0] + response["attention_mask"] + [1]
        labels = [-100] * len(instruction["input_ids"][0]) + response["input_ids"] + [tokenizer.pad_token_id]
        if len(input_ids) > MAX_LENGTH:
            input_ids = input_ids[:MAX_LENGTH]
            attention_mask = attention_mask[:MAX_LENGTH]
            labels = labels[:MAX_LENGTH]

        input_ids = torch.tensor(input_ids)
        attention_mask = torch.tensor(attention_mask)
        labels = torch.tensor(labels)
        inputs["pixel_values"] = torch.tensor(inputs["pixel_values"])
        inputs["image_grid_thw"] = torch.tensor(inputs["image_grid_thw"]).squeeze(0)  # (1, 3) -> (3,)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                "pixel_values": inputs["pixel_values"], "image_grid_thw": inputs["image_grid_thw"]}

    return process_func


def seed_collator(tokenizer, image_token_id: int):
    """`DataCollatorForSeq2Seq(tokenizer, padding=True)`, plus the `mm_token_type_ids` transformers 5 needs."""
    from transformers import DataCollatorForSeq2Seq

    seq2seq = DataCollatorForSeq2Seq(tokenizer=tokenizer, padding=True)

    def collate(features):
        batch = seq2seq(features)
        batch["mm_token_type_ids"] = (batch["input_ids"] == image_token_id).long()
        return batch

    return collate


def run_seed_pipeline(model_dir: str, train_json: str, output_dir: str, cache_dir: str, prompt: str,
                      max_steps: int, callbacks=(), resized_height: int = 500, resized_width: int = 100):
    """Seed 002's train.py from "load the processor" to `trainer.train()`; returns the Trainer."""
    from datasets import Dataset
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoProcessor, AutoTokenizer, Qwen2VLForConditionalGeneration, Trainer, TrainingArguments

    tokenizer = AutoTokenizer.from_pretrained(model_dir, use_fast=False, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(model_dir)
    origin_model = Qwen2VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    origin_model.enable_input_require_grads()  # the seed: needed with gradient checkpointing

    train_ds = Dataset.from_json(train_json, cache_dir=cache_dir)
    train_dataset = train_ds.map(make_process_func(processor, tokenizer, prompt, resized_height, resized_width))

    config = LoraConfig(task_type=TaskType.CAUSAL_LM, target_modules=LORA_TARGETS, inference_mode=False,
                        r=64, lora_alpha=16, lora_dropout=0.05, bias="none")
    train_peft_model = get_peft_model(origin_model, config)

    args = TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,  # seeds: 4
        logging_steps=10,
        logging_first_step=True,
        max_steps=max_steps,  # seeds: num_train_epochs=2
        save_steps=100,
        learning_rate=1e-4,
        save_on_each_node=True,
        gradient_checkpointing=True,
        report_to="none",
    )
    image_token_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    trainer = Trainer(model=train_peft_model, args=args, train_dataset=train_dataset,
                      data_collator=seed_collator(tokenizer, image_token_id), callbacks=list(callbacks))
    trainer.train()
    return trainer
