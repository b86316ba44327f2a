"""transformers' `Trainer` with what vlmtune adds to the loop.

- optimizer groups per model part (vision_lr, projector_lr);
- length-grouped batches from the pre-flight token counts;
- a streamed dataset read by each rank for itself (its own part), never dispatched or re-sharded;
- generation on a validation subset at every evaluation, logged as `val_<metric>` with
  (image, prediction, reference) triples sent to the trackers;
- reuse of frozen vision features;
- checkpoints written whole or not at all, with the run config and processor inside, and
  restored exactly (`vlmtune/checkpoints.py`);
- a stop on the first non-finite loss or gradient norm (`vlmtune/run_guard.py`);
- a zero-contribution vision pass on batches without images, so several processes stay in step
  with a trained (or sharded) vision tower (`vlmtune/distributed.py`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from accelerate.data_loader import prepare_data_loader
from torch.utils.data import DataLoader
from transformers import Trainer
from transformers.trainer_utils import rotate_checkpoints

from vlmtune.checkpoints import file_sizes, mark_complete, newest_complete, restore_exact, saved_view
from vlmtune.config import RunConfig, save_config
from vlmtune.data.collate import LengthGroupedSampler
from vlmtune.data.encode import Encoder
from vlmtune.data.sample import Sample
from vlmtune.data.stream import CheckedStream
from vlmtune.distributed import install_vision_pass
from vlmtune.errors import Diverged
from vlmtune.fileio import TEMP_MARK, disk_full_error, host, remove
from vlmtune.run_guard import DivergenceGuard, divergence_advice
from vlmtune.tuning import param_groups
from vlmtune.vision_cache import VisionFeatureCache


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class VLMTrainer(Trainer):
    """`Trainer` plus vlmtune's additions (see the module docstring).

    Args:
        processor: saved into every checkpoint, with the run config, so each is usable on its own.
        train_lengths: tokens per training sample, for length-grouped batches.
        gen_samples: validation samples generated on at each evaluation.
        guard: checks losses and gradient norms (None: no checks).
    """

    def __init__(self, *args, family=None, run_config: RunConfig | None = None, encoder: Encoder | None = None,
                 processor=None, gen_samples: list[Sample] | None = None, train_lengths: list[int] | None = None,
                 vision_cache: VisionFeatureCache | None = None, guard: DivergenceGuard | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.family = family
        self.run_config = run_config
        self.encoder = encoder
        self.processor = processor
        self.gen_samples = gen_samples or []
        self.train_lengths = train_lengths
        self.vision_cache = vision_cache
        self.guard = guard
        self._staging_owner: str | None = None
        # before accelerate wraps the model: the hooks sit on the model's own modules, under any wrapper
        self.vision_pass = install_vision_pass(self.model, family, processor)

    # -- the step ---------------------------------------------------------------------------
    def compute_loss(self, model, inputs, *args, **kwargs):
        if self.vision_cache is not None:  # pixels -> cached image features (vlmtune/vision_cache.py)
            inputs = self.vision_cache.swap_pixels(self.accelerator.unwrap_model(model), inputs,
                                                   self.accelerator.autocast)
        return super().compute_loss(model, inputs, *args, **kwargs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        # Each rank sees its own loss; under several processes a bad one shows in the (all-reduced)
        # gradient norm on every rank at once, which is where they must agree to stop.
        if self.guard is not None and not _distributed():
            value = float(loss.detach().float())
            self._check(self.guard.loss, value, {"loss": value})
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        if self.guard is not None and grad_norm is not None:
            value = float(grad_norm.item() if isinstance(grad_norm, torch.Tensor) else grad_norm)
            self._check(self.guard.grad_norm, value, {"grad_norm": value})
        return grad_norm

    def _check(self, check, value: float, record: dict) -> None:
        """Run a guard check; on divergence, log the bad value (never as 0) and stop the run
        before the optimizer applies it."""
        step = self.state.global_step + 1
        try:
            check(value, step)
        except Diverged as e:
            self.state.global_step = step
            self.log(record)
            last, _ = newest_complete(Path(self.args.output_dir))
            raise Diverged(str(e) + divergence_advice(self.run_config, str(last.path) if last else None)) from None

    # -- data and optimizer -----------------------------------------------------------------
    def get_train_dataloader(self):
        if not isinstance(self.train_dataset, CheckedStream):
            return super().get_train_dataloader()
        # A stream already holds this rank's own part (vlmtune/data/stream.py). Prepared by the
        # accelerator, an iterable dataset is either read by rank 0 alone and its batches sent to
        # the others (accelerate's default, dispatch_batches) or read whole by every rank, each
        # keeping one batch in N (IterableDatasetShard). So this loader is wrapped as a one-process
        # loader: each rank iterates its own stream; only the device placement is added.
        args = self.args
        loader = DataLoader(self.train_dataset, batch_size=self._train_batch_size, collate_fn=self.data_collator,
                            num_workers=args.dataloader_num_workers, pin_memory=args.dataloader_pin_memory,
                            persistent_workers=args.dataloader_persistent_workers,
                            prefetch_factor=args.dataloader_prefetch_factor,
                            multiprocessing_context=args.dataloader_multiprocessing_context)
        return prepare_data_loader(loader, self.accelerator.device, num_processes=1, process_index=0,
                                   put_on_device=True, dispatch_batches=False)

    def _get_train_sampler(self, train_dataset=None):
        if self.train_lengths is None:
            return super()._get_train_sampler(train_dataset)
        # The lengths come from the pre-flight check, so grouping costs no pass over the data.
        batch = self.args.train_batch_size * self.args.gradient_accumulation_steps
        return LengthGroupedSampler(self.train_lengths, batch, seed=self.args.seed)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            model = model or self.model
            decay = set(self.get_decay_parameter_names(model))
            groups = param_groups(model, self.family, self.run_config.train, decay)
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
            optimizer_kwargs.pop("lr", None)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    # -- evaluation -------------------------------------------------------------------------
    def evaluate(self, *args, **kwargs):
        metrics = super().evaluate(*args, **kwargs)
        if self.gen_samples and self.is_world_process_zero():
            from vlmtune.generation import generate
            from vlmtune.scoring import score
            from vlmtune.tracking import log_predictions

            c = self.run_config.eval
            predictions = generate(self.model, self.encoder, self.gen_samples, c.batch_size, c.max_new_tokens,
                                   progress=False)
            gen_metrics, rows = score(c.task or "generic", self.gen_samples, predictions)
            self.log({f"val_{k}": v for k, v in gen_metrics.items()})
            log_predictions(self, rows, self.state.global_step)
            metrics.update({f"val_{k}": v for k, v in gen_metrics.items()})
        return metrics

    # -- checkpoints ------------------------------------------------------------------------
    def _staging_name(self) -> str:
        """`HOST-PID` of the main process, the same on every rank: all ranks write one checkpoint."""
        if self._staging_owner is None:
            owner = [f"{host()}-{os.getpid()}"]
            if _distributed():
                torch.distributed.broadcast_object_list(owner, src=0)
            self._staging_owner = owner[0]
        return self._staging_owner

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint, written under `.checkpoint-N.tmp-HOST-PID/`, completed with the
        run config, the processor and `checkpoint.json`, then renamed to `checkpoint-N`: a kill or
        a full disk leaves either the whole checkpoint or only a temporary folder that the next
        run removes."""
        run_dir = Path(self.args.output_dir)
        name = f"checkpoint-{self.state.global_step}"
        staging = run_dir / f".{name}{TEMP_MARK}{self._staging_name()}"
        main = self.args.should_save
        try:
            self.args.output_dir = str(staging)
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self.args.output_dir = str(run_dir)
            if _distributed():
                torch.distributed.barrier()
            if main:
                folder = staging / name
                save_config(self.run_config, folder)
                if self.processor is not None:
                    self.processor.save_pretrained(folder)
                mark_complete(folder, self.state.global_step)
                _replace(folder, run_dir / name)
                remove(staging)
                rotate_checkpoints(output_dir=str(run_dir), save_total_limit=self.args.save_total_limit,
                                   best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False)
        except BaseException as e:
            if main:
                remove(staging)
            error = disk_full_error(e, run_dir, self._checkpoint_bytes(run_dir), f"{run_dir / name}")
            if error is not None:
                last, _ = newest_complete(run_dir)
                raise type(error)(f"{error} The last complete checkpoint is "
                                  f"{last.path if last else 'none'}.") from None
            raise
        if _distributed():
            torch.distributed.barrier()

    def _checkpoint_bytes(self, run_dir: Path) -> int:
        """What a checkpoint takes: the size of the last complete one, else an estimate (the saved
        tensors plus AdamW's two fp32 moments per trained parameter)."""
        last, _ = newest_complete(run_dir)
        if last is not None:
            return sum(file_sizes(last.path).values())
        model = self.accelerator.unwrap_model(self.model)
        tensors = sum(t.numel() * t.element_size() for t in saved_view(model)[0].values())
        return tensors + sum(2 * 4 * p.numel() for p in model.parameters() if p.requires_grad)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """Strict, exact restore of the weights (the Trainer's own loads full checkpoints
        non-strictly, and misses every renamed tensor). DeepSpeed and FSDP keep their own loaders."""
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        restore_exact(self.accelerator.unwrap_model(model or self.model), Path(resume_from_checkpoint))

    def save_final(self, folder: Path) -> None:
        """The final weights, processor and config, written whole under a temporary name and then
        put in place of `folder` (an earlier final/ stays until the new one is complete)."""
        staging = folder.parent / f".{folder.name}{TEMP_MARK}{self._staging_name()}"
        try:
            self.save_model(str(staging))
            if self.args.should_save:
                if self.processor is not None:
                    self.processor.save_pretrained(staging)
                save_config(self.run_config, staging)
                _replace(staging, folder)
        except BaseException as e:
            if self.args.should_save:
                remove(staging)
            error = disk_full_error(e, folder, self._checkpoint_bytes(folder.parent), str(folder))
            if error is not None:
                raise error from None
            raise


def _replace(new: Path, dest: Path) -> None:
    """Put folder `new` at `dest`; an existing `dest` is moved aside first and removed after."""
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old{TEMP_MARK}{host()}-{os.getpid()}")
        remove(old)
        dest.rename(old)
    new.rename(dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
