"""FSDP2 training on CPU for tests/test_distributed_mixed.py: vlmtune's model, adapters, data and
vision pass, sharded by torch's `fully_shard`, in a plain loop.

    torchrun --nproc_per_node 2 tests/fsdp_worker.py RESULT.jsonl key=value ...   # FSDP2, gloo
    python tests/fsdp_worker.py RESULT.jsonl key=value ...                           # one process, no FSDP

Why not `vlmtune train train.fsdp=...`: accelerate turns FSDP on only for GPU-type devices (on CPU it
quietly falls back to DDP, which vlmtune refuses), so the Trainer cannot run FSDP here. This worker
shards the way accelerate's FSDP2 does with `auto_wrap_policy: TRANSFORMER_BASED_WRAP` (each module
of a class in the model's `_no_split_modules` - vision blocks, decoder layers - then the root) and
trains like the Trainer: AdamW, constant learning rate, gradient clipping at train.max_grad_norm, the
loss of a step normalised by the label tokens of all ranks. A step's samples are the ones
`vlmtune train` would give it (the same length-grouped order; see tests/mixed_data.py).

Rank 0 writes one JSON line per step: {"step", "loss", "grad_norm"}.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def main(result: str, overrides: list[str]) -> None:
    from vlmtune.config import load_config
    from vlmtune.data.collate import Collator, LengthGroupedSampler
    from vlmtune.data.encode import IGNORE_INDEX, Encoder
    from vlmtune.data.formats import load_samples
    from vlmtune.distributed import install_vision_pass
    from vlmtune.models import family_for
    from vlmtune.models.load import load_model, load_processor
    from vlmtune.tuning import prepare_model

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    config = load_config(None, overrides)
    t = config.train
    path = Path(config.model.name_or_path)
    family = family_for(path)
    processor = load_processor(path, family)
    encoder = Encoder(processor, family)
    samples = load_samples(config.data.train)
    lengths = [encoder.count_tokens(s) for s in samples]

    torch.manual_seed(t.seed)  # as train.py: the adapters' init follows train.seed
    model = prepare_model(load_model(path, torch.float32, None, False, None), family, t, config.lora)
    install_vision_pass(model, family, processor)
    if world > 1:
        from torch.distributed.fsdp import fully_shard

        mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (world,))
        blocks = set(model.get_base_model()._no_split_modules)
        for module in model.modules():
            if type(module).__name__ in blocks:
                fully_shard(module, mesh=mesh)
        fully_shard(model, mesh=mesh)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay, betas=(0.9, t.adam_beta2))
    collator = Collator(processor.tokenizer.pad_token_id, concat_dims=family.concat_dims)

    step_batch = t.batch_size * world  # the global batch of a step
    sampler = LengthGroupedSampler(lengths, t.batch_size, seed=t.seed)
    records = []
    for _ in range(int(t.epochs)):
        order = list(sampler)
        for start in range(0, len(order), step_batch):
            mine = order[start + rank * t.batch_size: start + (rank + 1) * t.batch_size]
            batch = collator([encoder.encode(samples[i]) for i in mine])
            # the label tokens of the whole step (labels shift by one inside the loss)
            count = torch.tensor(float((batch["labels"][:, 1:] != IGNORE_INDEX).sum()))
            if world > 1:
                dist.all_reduce(count)
            loss = model(**batch, num_items_in_batch=count).loss  # this rank's share: sum over its tokens / count
            (loss * world).backward()  # FSDP averages gradients over the ranks; the step's gradient is their sum
            grad_norm = torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
            total = loss.detach().clone()
            if world > 1:
                dist.all_reduce(total)
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            records.append({"step": len(records) + 1, "loss": float(total), "grad_norm": float(grad_norm)})
    if rank == 0:
        Path(result).write_text("".join(json.dumps(r) + "\n" for r in records))
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
