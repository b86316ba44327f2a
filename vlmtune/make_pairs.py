"""Preference pairs for DPO from a model's own answers, scored by the task metric.

    vlmtune data make-pairs runs/latex --data train.json --out pairs.jsonl --num-samples 8
    vlmtune train configs/qwen2_vl_latex_ocr_dpo.yaml data.train=pairs.jsonl

For every prompt of an SFT dataset (records with the same image(s) and question are one prompt,
all their answers references, as `vlmtune eval` counts items) the model answers `num_samples`
times by sampling, the K answers of a prompt in the same batched `generation.complete` call; each
answer is scored against the references by one metric (`vlmtune.rl.rewards`, the rewards GRPO
uses, which normalise as `eval.task` does); the best answer is chosen, the worst rejected. With
`include_reference`, a reference no sample beats is chosen instead. A prompt whose best and worst
score the same (or closer than `min_margin`) teaches nothing and is skipped, and counted.

The output is TRL's conversational preference format, which `vlmtune.data.preference` reads:
`{"prompt": [messages with {"type": "image"} parts], "chosen": [assistant message], "rejected":
[...], "images": [paths relative to the output file]}`, plus `source`, `metric`, `chosen_score`,
`rejected_score` and `chosen_from`, which readers ignore. The prompt is written as the model was
asked: the run's `data.prompt` and `data.system_prompt` are in it, every turn of a multi-turn
prompt too.

Interrupting keeps the work done: the rows of each finished batch go to OUT's
NAME.partial.jsonl, locked while a run writes it (a second run to the same OUT is refused), and
OUT itself is only ever written whole, at the end. Running the same command again resumes from the
partial file: batches are fixed by `batch_size` and each draws with a seed of its own, so a resumed
run writes the same pairs as one that was never stopped. Another command (other settings) with the
same OUT is refused until the partial file is removed.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from tqdm import tqdm

from vlmtune.data.collate import EncodedDataset
from vlmtune.data.encode import Encoder
from vlmtune.data.writers import image_ref
from vlmtune.errors import VlmtuneError
from vlmtune.evaluate import partial_path, preflight
from vlmtune.fileio import atomic_write_text, disk_full_error
from vlmtune.generation import (Sampling, complete, derive_max_new_tokens, ready_model, resolve_target, target_for,
                                target_parts)
from vlmtune.metrics import TASKS, primary_metric
from vlmtune.rl.rewards import Reward, load_rewards, score_rewards
from vlmtune.scoring import EvalItem, group_items

METRICS = ("exact_match", "cer", "render_match", "cider", "bleu4")
TIE = 1e-9  # scores closer than this are equal: the same answer scores the same, up to rounding
HEADER_KEY = "vlmtune data make-pairs"  # the partial file's first line: {HEADER_KEY: settings}


def default_metric(task: str) -> str:
    """The metric `vlmtune eval` ranks checkpoints by for `task`: cer for ocr (scored as 1 - CER),
    exact_match for latex and generic, cider for caption."""
    return primary_metric(task)[0]


# -- choosing a pair -------------------------------------------------------------------------------

@dataclass
class Choice:
    """What one prompt gave: a pair, or why none (`skipped`: "tie", "margin" or "no answer")."""

    chosen: str | None = None
    rejected: str | None = None
    chosen_score: float = 0.0
    rejected_score: float = 0.0
    chosen_from: str = "sample"  # or "reference"
    skipped: str | None = None
    empty: int = 0  # sampled answers left out because they were empty


def choose(answers: list[str], scores: list[float], references: list[str] | None = None,
           reference_scores: list[float] | None = None, min_margin: float = 0.0) -> Choice:
    """The best answer as chosen and the worst as rejected (the first of equals, in sampling order).

    Empty answers are left out: the DPO pre-flight check refuses an empty turn. With `references`
    (and their `reference_scores`), the best-scoring reference is chosen when no answer scores
    higher than it.
    """
    candidates = [(a, s) for a, s in zip(answers, scores, strict=True) if a.strip()]
    empty = len(answers) - len(candidates)
    if not candidates:
        return Choice(skipped="no answer", empty=empty)
    best = max(candidates, key=lambda c: c[1])  # max/min keep the first of equal scores
    worst = min(candidates, key=lambda c: c[1])
    chosen_from = "sample"
    if references:
        reference = max(zip(references, reference_scores, strict=True), key=lambda r: r[1])
        if reference[1] >= best[1]:
            best, chosen_from = reference, "reference"
    gap = best[1] - worst[1]
    choice = Choice(best[0], worst[0], best[1], worst[1], chosen_from, empty=empty)
    if gap <= TIE:
        choice.skipped = "tie"
    elif gap < min_margin:
        choice.skipped = "margin"
    return choice


def pair_record(item: EvalItem, prompt: list[dict], choice: Choice, metric: str, out_dir: str) -> dict:
    """One line of the output: TRL's conversational preference record, plus the scores."""
    record = {"prompt": prompt,
              "chosen": [{"role": "assistant", "content": [{"type": "text", "text": choice.chosen}]}],
              "rejected": [{"role": "assistant", "content": [{"type": "text", "text": choice.rejected}]}],
              "images": [image_ref(p, out_dir, absolute=False) for p in item.sample.images]}
    if item.sample.id is not None:
        record["id"] = item.sample.id
    record.update(source=item.sample.source, metric=metric, chosen_score=choice.chosen_score,
                  rejected_score=choice.rejected_score, chosen_from=choice.chosen_from)
    return record


def pair_row(index: int, item: EvalItem, answers: list[str], reward: list[Reward], encoder: Encoder,
             include_reference: bool, min_margin: float, out_dir: str) -> dict:
    """The partial file's row for prompt `index`: `{"index", "record": its pair}`, or `{"index",
    "skipped": why, "best", "worst"}`; with `"empty"`: how many answers were empty."""
    metric = reward[0].name
    scores = score_rewards(reward, answers, [item.sample] * len(answers), [item.references] * len(answers))[metric]
    ref_scores = None
    if include_reference:  # each reference scored as an answer would be
        ref_scores = score_rewards(reward, item.references, item.records,
                                   [item.references] * len(item.records))[metric]
    choice = choose(answers, scores, item.references if include_reference else None, ref_scores, min_margin)
    if choice.skipped:
        row = {"index": index, "skipped": choice.skipped, "best": choice.chosen_score, "worst": choice.rejected_score}
    else:  # the prompt as the model was asked it: the run's data.prompt and system prompt applied
        prompt = encoder.messages(item.sample, item.sample.prompt_turns())
        row = {"index": index, "record": pair_record(item, prompt, choice, metric, out_dir)}
    if choice.empty:
        row["empty"] = choice.empty
    return row


# -- the partial file ------------------------------------------------------------------------------

class PartialPairs:
    """Rows of finished batches appended to `partial_path(out)` under an exclusive lock, resumed
    from when it was left by a run with the same `settings`; `finish(records)` writes `out` whole
    and removes the partial file.

    Each row is `{"index": prompt index, "record": pair record}` or `{"index", "skipped": why,
    ...}`. A batch counts as done when all its rows are there: rows after the last done batch (a
    write cut short by a kill) are cut off when the file is opened again.

    Raises:
        VlmtuneError: another process holds the lock, or the partial file was made with other settings.
    """

    def __init__(self, out: Path, settings: dict, batches: list[range]):
        self.out, self.settings, self.batches = out, settings, batches
        self.path = partial_path(out)
        self.rows: dict[int, dict] = {}
        self.resumed = 0
        self.file = None

    def __enter__(self) -> PartialPairs:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.file = self._lock()
        try:
            self._load()
        except BaseException:
            self.file.close()
            self.file = None
            raise
        return self

    def _lock(self):
        while True:
            f = self.path.open("a+b")
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.close()
                raise VlmtuneError(f"--out {self.out}: another `vlmtune data make-pairs` is writing it ({self.path} is "
                                   "locked); wait for it to finish, or give another --out") from None
            try:  # the run we waited on may have finished and removed the file we opened: open the new one
                if os.fstat(f.fileno()).st_ino == os.stat(self.path).st_ino:
                    return f
            except FileNotFoundError:
                pass
            f.close()

    def _load(self) -> None:
        self.file.seek(0)
        lines = self.file.read().splitlines(keepends=True)
        if not lines or not lines[0].endswith(b"\n"):  # new, or its header was cut short: no rows yet
            self.file.truncate(0)
            self._append([{HEADER_KEY: self.settings}])
            return
        try:
            header = json.loads(lines[0])[HEADER_KEY]
        except (ValueError, KeyError, TypeError):
            raise VlmtuneError(f"{self.path} is not a make-pairs partial file; move it away or give another --out") \
                from None
        if header != self.settings:
            differ = ", ".join(f"{k} {header.get(k)!r} -> {v!r}" for k, v in self.settings.items()
                               if header.get(k) != v)
            raise VlmtuneError(f"{self.path} holds the unfinished work of a make-pairs run with other settings "
                               f"({differ}); run that command again to finish it, or delete {self.path} to start over")
        batch_of = {i: b for b, batch in enumerate(self.batches) for i in batch}
        keep = offset = len(lines[0])
        pending: dict[int, list[dict]] = {}
        for line in lines[1:]:
            offset += len(line)
            try:
                row = json.loads(line) if line.endswith(b"\n") else None
                b = batch_of[row["index"]]
            except (ValueError, KeyError, TypeError):
                break  # a line cut short: nothing after it counts
            pending.setdefault(b, []).append(row)
            if len(pending[b]) == len(self.batches[b]):
                self.rows.update((r["index"], r) for r in pending.pop(b))
                keep = offset
        self.file.truncate(keep)  # rows of a batch that was not written whole are done again
        self.resumed = len(self.rows)

    def _append(self, rows: list[dict]) -> None:
        try:
            self.file.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8"))
            self.file.flush()
        except OSError as e:
            raise disk_full_error(e, self.path) or e

    def done(self, batch: range) -> bool:
        return all(i in self.rows for i in batch)

    def write(self, rows: list[dict]) -> None:
        """The rows of one whole batch."""
        self._append(rows)
        self.rows.update((r["index"], r) for r in rows)

    def finish(self) -> Path:
        """Write the pairs to `out` (in prompt order, all at once) and remove the partial file."""
        records = [self.rows[i]["record"] for i in sorted(self.rows) if "record" in self.rows[i]]
        atomic_write_text(self.out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        self.path.unlink(missing_ok=True)
        self.file.close()
        self.file = None
        return self.out

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.file is None:
            return
        if not self.rows:  # stopped before its first batch: nothing worth keeping
            self.path.unlink(missing_ok=True)
        elif exc_type is not None:
            total = sum(len(b) for b in self.batches)
            print(f"make-pairs stopped after {len(self.rows)} of {total} prompts; they are kept in {self.path}. Run "
                  "the same command again to go on from there.", file=sys.stderr)
        self.file.close()
        self.file = None


# -- the command -----------------------------------------------------------------------------------

@dataclass
class Tally:
    """Counts for the summary line, over every prompt done (resumed ones included)."""

    prompts: int = 0
    skipped: dict[str, int] = field(default_factory=lambda: {"tie": 0, "margin": 0, "no answer": 0})
    chosen: list[float] = field(default_factory=list)
    rejected: list[float] = field(default_factory=list)
    from_reference: int = 0
    empty: int = 0

    def add(self, row: dict) -> None:
        self.prompts += 1
        self.empty += row.get("empty", 0)
        if "skipped" in row:
            self.skipped[row["skipped"]] += 1
            return
        record = row["record"]
        self.chosen.append(record["chosen_score"])
        self.rejected.append(record["rejected_score"])
        self.from_reference += record["chosen_from"] == "reference"

    def summary(self, out: Path, metric: str, min_margin: float, answers: int) -> str:
        def mean(values: list[float]) -> float:
            return sum(values) / len(values) if values else math.nan

        lines = [f"{self.prompts} prompts, {len(self.chosen)} pairs written to {out}",
                 f"skipped: {self.skipped['tie']} ties (best and worst scored the same)"
                 + (f", {self.skipped['margin']} under --min-margin {min_margin}" if min_margin > 0 else "")
                 + (f", {self.skipped['no answer']} without a non-empty answer" if self.skipped["no answer"] else ""),
                 f"{metric}: chosen {mean(self.chosen):.4f}, rejected {mean(self.rejected):.4f} (mean)"
                 + (f"; {self.from_reference} chosen answers are the reference" if self.from_reference else "")]
        if self.empty:
            lines.append(f"{self.empty} of {answers} sampled answers were empty and left out")
        return "\n".join(lines)


def _batch_seed(seed: int, batch: int) -> int:
    """Each batch draws from its own seed, so a resumed run samples what the whole run would."""
    return seed * 1_000_003 + batch


def make_pairs_command(target: str | None = None, /, model: str | None = None, adapter: str | None = None, *,
                       data: str, out: str, num_samples: int = 8, temperature: float = 1.0, top_p: float = 1.0,
                       max_new_tokens: int | None = None, metric: Literal[METRICS] | None = None,
                       task: Literal[TASKS] | None = None, include_reference: bool = False, min_margin: float = 0.0,
                       batch_size: int = 4, seed: int = 0, limit: int | None = None,
                       trust_remote_code: bool = False) -> int:
    """Build DPO preference pairs from a model's own sampled answers, scored by the task metric.

    Each prompt of the dataset is answered NUM_SAMPLES times by sampling; the answers are scored
    against the record's answer(s); the best becomes "chosen", the worst "rejected". Prompts whose
    best and worst score the same are skipped and counted. Every record is checked before the model
    loads (`FILE:INDEX: what is wrong`). The output is TRL's conversational preference format with
    images, ready for `train.objective: dpo`. Ctrl-C keeps the finished batches in OUT's
    NAME.partial.jsonl; the same command again goes on from there. OUT is written only when all
    prompts are done.

    Args:
        target: Run folder (uses final/, else the newest checkpoint), checkpoint folder, or model folder.
        model: Base model (hub id or folder) when no TARGET is given.
        adapter: LoRA adapter folder to apply on --model.
        data: SFT dataset whose prompts are answered and whose answers are the references (any supported format).
        out: Output JSONL file of preference pairs.
        num_samples: Answers sampled per prompt.
        temperature: Sampling temperature (0 is greedy: only with --num-samples 1 and --include-reference).
        top_p: Nucleus sampling: keep the most likely tokens up to this probability mass.
        max_new_tokens: Longest answer; default: the run's eval.max_new_tokens, else 1.5x the longest
            reference plus 8 tokens.
        metric: Score answers by exact_match, cer (as 1 - CER), render_match, cider or bleu4; default: the
            task's main metric (ocr: cer; latex, generic: exact_match; caption: cider).
        task: ocr, latex, caption or generic: how answers are normalised; default: the run's eval.task, else generic.
        include_reference: Choose the dataset's answer when no sampled answer scores higher.
        min_margin: Skip prompts whose chosen and rejected scores differ by less (ties are always skipped).
        batch_size: Prompts per generation call (each sampled NUM_SAMPLES times in it).
        seed: Seed of the sampling: the same seed, data and settings give the same pairs.
        limit: Use only the first N prompts.
        trust_remote_code: Run the Python files of the model folder (read them first); a run folder's
            config never enables it.
    """
    from vlmtune.data.formats import load_samples

    if num_samples < 1 or batch_size < 1:
        raise VlmtuneError("--num-samples and --batch-size must be at least 1")
    if num_samples == 1 and not include_reference:
        raise VlmtuneError("--num-samples 1 gives one answer per prompt: nothing to compare it with. Sample more, "
                           "or add --include-reference to pair the dataset's answer with the model's")
    if temperature <= 0 and num_samples > 1:
        raise VlmtuneError(f"--temperature {temperature} is greedy decoding: all {num_samples} answers would be the "
                           "same. Give a temperature > 0 (e.g. 1.0), or --num-samples 1 --include-reference")
    if min_margin < 0:
        raise VlmtuneError("--min-margin must be 0 or more")
    out_path = Path(out)
    if out_path.is_dir():
        raise VlmtuneError(f"--out {out} is a folder; give a file name such as {out_path / 'pairs.jsonl'}")

    t = target_for(target, trust_remote_code) if target is not None else \
        resolve_target(None, model, adapter, trust_remote_code)
    c = t.config
    task = task or c.eval.task or "generic"
    metric = metric or default_metric(task)
    samples = load_samples(data, c.data.format)
    if not samples:
        raise VlmtuneError(f"{data}: no samples to make pairs from")
    preflight(samples, data)  # before the model loads: FILE:INDEX errors, and nothing written
    all_items = group_items(samples)
    items = all_items[:limit] if limit else all_items
    # CIDEr's idf comes from every prompt's references, as GRPO takes it from the training set
    reward = load_rewards({metric: 1.0}, task, corpus=[item.references for item in all_items])

    parts = target_parts(t)
    encoder = parts.encoder
    max_new_tokens = max_new_tokens or c.eval.max_new_tokens or derive_max_new_tokens(encoder.tokenizer, samples)
    batches = [range(s, min(s + batch_size, len(items))) for s in range(0, len(items), batch_size)]
    settings = {"model": t.model, "adapter": t.adapter, "data": os.path.abspath(data), "prompts": len(items),
                "task": task, "metric": metric, "num_samples": num_samples, "temperature": temperature,
                "top_p": top_p, "max_new_tokens": max_new_tokens, "include_reference": include_reference,
                "min_margin": min_margin, "batch_size": batch_size, "seed": seed}
    out_dir = os.path.dirname(os.path.abspath(out_path))
    prompts = EncodedDataset([item.sample for item in items], encoder, prompt_only=True)
    tally = Tally()
    with PartialPairs(out_path, settings, batches) as partial:
        for i in sorted(partial.rows):
            tally.add(partial.rows[i])
        if partial.resumed:
            print(f"resuming from {partial.path}: {partial.resumed} of {len(items)} prompts already done",
                  file=sys.stderr)
        net = ready_model(parts, t.adapter) if not all(partial.done(b) for b in batches) else None
        bar = tqdm(total=len(items), initial=partial.resumed, desc="make-pairs", unit="prompt")
        for b, batch in enumerate(batches):
            if partial.done(batch):
                continue
            asked = [prompts[k] for k in batch]
            sampling = Sampling(temperature=temperature, top_p=top_p, seed=_batch_seed(seed, b))
            answers = [a.text for a in complete(net, encoder, [p for p in asked for _ in range(num_samples)],
                                                max_new_tokens, sampling)]
            rows = [pair_row(k, items[k], answers[j * num_samples:(j + 1) * num_samples], reward, encoder,
                             include_reference, min_margin, out_dir) for j, k in enumerate(batch)]
            for row in rows:
                tally.add(row)
            partial.write(rows)
            bar.update(len(batch))
            bar.set_postfix(pairs=len(tally.chosen), ties=tally.skipped["tie"])
        bar.close()
        partial.finish()
    print(tally.summary(out_path, metric, min_margin, len(items) * num_samples))
    return 0
