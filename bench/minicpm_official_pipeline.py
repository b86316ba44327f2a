"""The official MiniCPM-V 2.6 fine-tuning pipeline (OpenBMB/MiniCPM-V `finetune/`, the one seed 004 runs
and seed 000 copies as `minicpm_datasets.py` + `trainer.py`), re-created on vlmtune's model class as the
MiniCPM baseline of bench/gpu.py.

    .venv/bin/python bench/gpu.py --models minicpmv2_6     # runs this and `vlmtune train` side by side

The official scripts cannot run here: their model is remote code written for transformers 4.4x. So the
model, its trainable parameters (`vlmtune.tuning.prepare_model`, from the same config) and the attention
kernel stay vlmtune's, and what is re-created is everything between the data file and the model's
forward, as the official code does it (finetune/dataset.py, trainer.py, finetune.py, `llm_type=qwen2`):
  - `SupervisedDataset.__getitem__` does all the work per sample, on the fly, in the DataLoader's
    process (the scripts leave `dataloader_num_workers` at 0): open the image, `slice_image` (the
    geometry is vlmtune's `MiniCPMVImageProcessor.slice`, which implements the same algorithm), the
    torchvision `transform` (ToTensor, Normalize 0.5/0.5) per slice and `reshape_by_patch` into a
    [3, patch, n_patches * patch] strip; the placeholder text (`<image>` + unk x query_num + `</image>`,
    then one `<slice>` + unk x query_num + `</slice>` per grid cell, rows joined by "\\n"; an
    `<image_id>0</image_id>` only before images that are sliced) replaces `<image>` in the first user turn;
  - `conversation_to_ids_qwen2`: the whole conversation through the chat template at once, the
    assistant span found from `<|im_start|>assistant` to the next `<|im_end|>` (trained from the "\\n"
    after `assistant` through `<|im_end|>`), cut at `model_max_length`, labels shifted in the dataset
    (target[i-1] = ids[i]) with the end-of-sequence id after each answer, `image_bound` from the
    `<image>`/`<slice>` start and end tokens, position ids 0..n-1;
  - `data_collator`: `pad_sequence` to the batch's longest sample (after trimming to max_length),
    input ids padded with 0, labels with -100; pixel values, tgt_sizes and image bounds as lists;
  - the Trainer's default random order (no length grouping), batch size 2 in bench/gpu.py (seed 004);
  - `CPMTrainer`: the model runs without labels; its logits are taken as float32 (what transformers
    4.44's Qwen2ForCausalLM returns) and `CrossEntropyLoss` is computed over the full vocabulary on the
    pre-shifted labels; `torch.cuda.empty_cache()` after every forward (its `training_step`);
  - LoRA: `enable_input_require_grads()` (finetune.py does it with gradient checkpointing); gradient
    checkpointing without re-entrance (seed 000's `use_reentrant: False`); bf16 weights and autocast.

What differs, and why:
  - the official model turns the lists into its vision batch inside `forward`; here `model_inputs`
    does the equivalent on the device (strips back to [n_patches, 3*p*p] rows, `image_bound` to
    `mm_token_type_ids`), since vlmtune's model takes those tensors; a few reshapes per step;
  - `assistant` is one token in Qwen2's vocabulary but several in bench/gpu.py's tiny tokenizer, so
    the span search matches its token sequence instead of one id; the spans found are the same;
  - the tokenizer is not the checkpoint's (see bench/gpu.py): the end-of-sequence id is `eos_token_id`.
"""

from __future__ import annotations

import copy
import json
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset
from transformers import Trainer

IGNORE_INDEX = -100


def patch_strip(image: torch.Tensor, patch: int) -> torch.Tensor:
    """The official `reshape_by_patch`: [3, H, W] -> [3, patch, n_patches * patch], the patches (row-major)
    side by side in one strip."""
    columns = F.unfold(image.unsqueeze(0), (patch, patch), stride=(patch, patch))[0]  # [3*p*p, n_patches]
    return columns.reshape(image.shape[0], patch, patch, -1).permute(0, 1, 3, 2).reshape(image.shape[0], patch, -1)


def strip_rows(strip: torch.Tensor, patch: int) -> torch.Tensor:
    """A `patch_strip` back to vlmtune's model input: [n_patches, 3*p*p], each patch as (channel, row, col)."""
    channels = strip.shape[0]
    return strip.reshape(channels, patch, -1, patch).permute(2, 0, 1, 3).reshape(-1, channels * patch * patch)


def image_placeholder(image_processor, grid: tuple[int, int] | None) -> str:
    """The text the official 2.6 dataset writes for one image of the conversation (`image_id` 0)."""
    ip = image_processor
    queries = ip.unk * ip.image_feature_size
    text = ip.im_start + queries + ip.im_end
    if grid is None:
        return text  # the official finetune code numbers only the images it slices
    cols, rows = grid
    cells = "\n".join((ip.slice_start + queries + ip.slice_end) * cols for _ in range(rows))
    return ip.image_id(0) + text + cells


def conversation_to_ids(conversations: list[dict], tokenizer, chat_template: str, image_processor,
                        max_length: int) -> dict[str, torch.Tensor]:
    """`conversation_to_ids` with `llm_type=qwen2` (targets shifted, image bounds, position ids)."""
    chat = [{"role": m["role"], "content": m["content"]} for m in conversations]
    text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=False, chat_template=chat_template)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    start_id = tokenizer.convert_tokens_to_ids("<|im_start|>")
    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    role = tokenizer("assistant", add_special_tokens=False)["input_ids"]
    context = [1] * len(ids)  # 1: prompt, 0: trained
    for i, token in enumerate(ids):
        if token == start_id and ids[i + 1: i + 1 + len(role)] == role:
            st = i + 1 + len(role)  # the "\n" after `assistant`
            end = next((j for j in range(st + 1, len(ids)) if ids[j] == end_id), None)
            if end is not None:
                context[st: end + 1] = [0] * (end + 1 - st)
    ids, context = ids[:max_length], context[:max_length]
    if all(context):
        raise ValueError("no assistant tokens to train on")
    target = [IGNORE_INDEX] * len(ids)
    for i in range(1, len(ids)):  # a Python loop per token, as the official code builds it
        if context[i] == 0:
            target[i - 1] = ids[i]
        if context[i] == 1 and context[i - 1] == 0:
            target[i - 1] = tokenizer.eos_token_id
    ip = image_processor
    starts = {tokenizer.convert_tokens_to_ids(ip.im_start), tokenizer.convert_tokens_to_ids(ip.slice_start)}
    ends = {tokenizer.convert_tokens_to_ids(ip.im_end), tokenizer.convert_tokens_to_ids(ip.slice_end)}
    bound = [[i + 1, j] for i, j in zip([i for i, t in enumerate(ids) if t in starts],
                                        [j for j, t in enumerate(ids) if t in ends])]
    return {"input_ids": torch.tensor(ids, dtype=torch.int32), "target": torch.tensor(target, dtype=torch.int32),
            "image_bound": torch.tensor(bound, dtype=torch.long).reshape(-1, 2),
            "position_ids": torch.arange(len(ids), dtype=torch.long)}


class OfficialDataset(Dataset):
    """`SupervisedDataset`: records in the official format (`image`: a path, `conversations`), processed on access.

    Args:
        processor: vlmtune's `MiniCPMVProcessor` of the model (tokenizer, slicing settings, chat template).
    """

    def __init__(self, records: list[dict], processor, max_length: int):
        from torchvision import transforms

        self.records = records
        self.tokenizer = processor.tokenizer
        self.image_processor = processor.image_processor
        self.chat_template = processor.chat_template
        self.max_length = max_length
        ip = self.image_processor
        # MiniCPM-V 2.6's `model.transform`
        self.transform = transforms.Compose([transforms.ToTensor(),
                                             transforms.Normalize(mean=ip.norm_mean, std=ip.norm_std)])

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        record = self.records[i]
        image = Image.open(record["image"]).convert("RGB")
        conversations = copy.deepcopy(record["conversations"])
        sliced = self.image_processor.slice(image)
        placeholder = image_placeholder(self.image_processor, sliced.grid)
        first = conversations[0]["content"]
        conversations[0]["content"] = (first.replace("<image>", placeholder) if "<image>" in first
                                       else placeholder + "\n" + first)
        out = conversation_to_ids(conversations, self.tokenizer, self.chat_template, self.image_processor,
                                  self.max_length)
        p = self.image_processor.patch_size
        tensors = [self.transform(s) for s in sliced.slices]
        return {"input_ids": out["input_ids"], "position_ids": out["position_ids"], "labels": out["target"],
                "attention_mask": torch.ones_like(out["input_ids"], dtype=torch.bool),
                "pixel_values": [patch_strip(t, p) for t in tensors],
                "tgt_sizes": torch.tensor([[t.shape[1] // p, t.shape[2] // p] for t in tensors], dtype=torch.int32),
                "image_bound": out["image_bound"]}


def official_collator(examples: list[dict], padding_value: int = 0, max_length: int = 2048) -> dict:
    """`data_collator`: trim to max_length, pad to the longest sample of the batch; images as lists."""
    def trim_and_pad(key: str, value: int) -> torch.Tensor:
        return pad_sequence([e[key][:max_length] for e in examples], batch_first=True, padding_value=value)

    return {"input_ids": trim_and_pad("input_ids", padding_value),
            "position_ids": trim_and_pad("position_ids", padding_value),
            "labels": trim_and_pad("labels", IGNORE_INDEX),
            "attention_mask": trim_and_pad("attention_mask", padding_value),
            "pixel_values": [e["pixel_values"] for e in examples],
            "image_bound": [e["image_bound"] for e in examples],
            "tgt_sizes": [e["tgt_sizes"] for e in examples]}


def model_inputs(batch: dict, patch: int) -> dict[str, torch.Tensor]:
    """An official batch as vlmtune's `MiniCPMVForConditionalGeneration` takes it (see modeling.py)."""
    input_ids = batch["input_ids"]
    mm_token_type_ids = torch.zeros(input_ids.shape, dtype=torch.long, device=input_ids.device)
    for row, bounds in enumerate(batch["image_bound"]):
        for start, end in bounds.tolist():
            mm_token_type_ids[row, start:end] = 1
    strips = [s for sample in batch["pixel_values"] for s in sample]
    return {"input_ids": input_ids, "attention_mask": batch["attention_mask"], "position_ids": batch["position_ids"],
            "mm_token_type_ids": mm_token_type_ids,
            "pixel_values": torch.cat([strip_rows(s, patch) for s in strips]) if strips else None,
            "tgt_sizes": torch.cat([t.reshape(-1, 2) for t in batch["tgt_sizes"]]).long() if strips else None}


class OfficialTrainer(Trainer):
    """`CPMTrainer`'s loss and step: logits in float32, cross-entropy on the dataset's shifted labels,
    the CUDA cache emptied after each forward.

    Args:
        patch: the vision patch size (to turn the official pixel strips into model inputs).
        on_batch: called with (batch, labels) before each forward (bench/gpu.py counts tokens with it).
    """

    def __init__(self, *args, patch: int, on_batch=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.patch = patch
        self.on_batch = on_batch

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        if self.on_batch is not None and model.training:
            self.on_batch(inputs, labels)
        outputs = model(**model_inputs(inputs, self.patch), use_cache=False)
        logits = outputs.logits.float()  # transformers 4.44's Qwen2 returned float32 logits
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1).long().to(logits.device),
                               ignore_index=IGNORE_INDEX)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # CPMTrainer.training_step, between forward and backward
        return (loss, outputs) if return_outputs else loss


def run_official(model_dir: str, train_json: Path, output_dir: Path, config, steps: int, batch_size: int,
                 callbacks: list, on_batch=None) -> None:
    """Train `steps` optimizer steps the official way on vlmtune's model, set up from the `RunConfig` `config`
    (method, frozen parts, LoRA settings, dtype, optimizer settings) as `vlmtune train` sets it up."""
    from transformers import TrainingArguments

    from vlmtune.models import family_for
    from vlmtune.models.load import load_model, load_processor, pick_dtype
    from vlmtune.tuning import prepare_model

    path = Path(model_dir)
    family = family_for(path)
    dtype = pick_dtype(config.model.dtype)
    processor = load_processor(path, family, max_slice_nums=config.data.max_slice_nums)
    model = load_model(path, dtype)  # transformers' default attention, as the official AutoModel.from_pretrained
    model = prepare_model(model, family, config.train, config.lora, config.train.gradient_checkpointing)
    if config.train.method != "full" and config.train.gradient_checkpointing:
        model.enable_input_require_grads()  # finetune.py, for LoRA with gradient checkpointing
    records = json.loads(Path(train_json).read_text(encoding="utf-8"))
    t = config.train
    args = TrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=batch_size, gradient_accumulation_steps=1,
        max_steps=steps, learning_rate=t.learning_rate, weight_decay=t.weight_decay, adam_beta2=t.adam_beta2,
        warmup_steps=t.warmup_ratio, lr_scheduler_type=t.lr_scheduler, bf16=dtype == torch.bfloat16,
        activation_checkpointing=t.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        remove_unused_columns=False, label_names=["labels"], logging_steps=10, save_strategy="no", report_to="none",
        use_cpu=not torch.cuda.is_available())
    OfficialTrainer(model=model, args=args, train_dataset=OfficialDataset(records, processor, config.data.max_length),
                    data_collator=partial(official_collator, max_length=config.data.max_length), callbacks=callbacks,
                    patch=processor.image_processor.patch_size, on_batch=on_batch).train()
