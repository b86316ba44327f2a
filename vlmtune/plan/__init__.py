"""Will a training run fit? Peak accelerator memory per device, before any weights are loaded.

    vlmtune plan configs/qwen2_vl_latex_ocr.yaml
    vlmtune plan configs/qwen2_vl_latex_ocr.yaml train.batch_size=8 --device-memory 24GiB
    vlmtune plan CONFIG train.deepspeed=configs/deepspeed/zero3.json --gpus 4 --json

Reads the run config and the model's config.json only (the model is built on the meta device:
shapes, no storage), estimates the peak memory of a training step per device with
`vlmtune.plan.estimate` (whose docstring states every formula and assumption), prints the
components, says whether it fits `--device-memory`, and if not, which changes would make it fit,
each with its own estimate. Exit status: 0 fits, 1 does not fit.

The planner: this file (the command, the suggestions), `summary.py` (the model as its config.json
describes it, built on the meta device), `estimate.py` (the memory formulas).
"""

from __future__ import annotations

import dataclasses
import json as _json
import re
from pathlib import Path
from typing import Literal

from vlmtune.config import RunConfig, load_config
from vlmtune.errors import ConfigError, VlmtuneError
from vlmtune.plan.estimate import GiB, Estimate, Setup, Trainable, estimate
from vlmtune.plan.summary import ArchitectureSummary, summarize


@dataclasses.dataclass
class Plan:
    config: RunConfig
    summary: ArchitectureSummary
    trainable: Trainable
    setup: Setup
    estimate: Estimate
    tokens_per_image: int
    images: int  # images per row of the batch
    notes: list[str]


def parse_memory(text: str) -> int:
    """'80GiB', '80GB', '24G', '40000MiB' -> bytes (GB and GiB are both read as GiB, as GPUs are sold)."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?B)?\s*", text, flags=re.I)
    if not m:
        raise ConfigError(f"--device-memory {text!r}: expected a size such as 80GiB, 24GB or 40000MiB")
    unit = {"": 1024 ** 3, "K": 1024, "M": 1024 ** 2, "G": 1024 ** 3, "T": 1024 ** 4}[m.group(2).upper()]
    return int(float(m.group(1)) * unit)


def read_deepspeed(path: str | None) -> dict:
    """ZeRO stage, offload flags and reduce bucket from a DeepSpeed JSON config ({} without one)."""
    if not path:
        return {}
    file = Path(path)
    try:
        zero = _json.loads(file.read_text()).get("zero_optimization", {})
    except FileNotFoundError:
        raise ConfigError(f"train.deepspeed={path}: no such file") from None
    except _json.JSONDecodeError as e:
        raise ConfigError(f"train.deepspeed={path}: not valid JSON ({e})") from None

    def number(key: str) -> int | None:  # "auto" values are the Trainer's to fill in: keep DeepSpeed's defaults
        return int(float(zero[key])) if isinstance(zero.get(key), (int, float)) else None

    return {"zero_stage": int(zero.get("stage", 0)),
            "offload_optimizer": (zero.get("offload_optimizer") or {}).get("device", "none") not in ("none", None),
            "offload_params": (zero.get("offload_param") or {}).get("device", "none") not in ("none", None),
            "reduce_bucket": number("reduce_bucket_size"), "max_live_params": number("stage3_max_live_parameters")}


CONFIG_FILES = ["config.json", "preprocessor_config.json", "processor_config.json"]


def config_folder(name_or_path: str, hub: str = "hf", revision: str | None = None) -> Path:
    """A folder with the model's config files: `name_or_path` itself, or those files alone from the hub
    (never the weights).

    Raises:
        VlmtuneError: not a folder, and the hub cannot be reached or does not know the id.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1:
        return path  # summarize() says clearly when config.json is missing
    try:
        if hub == "modelscope":
            from modelscope import snapshot_download

            return Path(snapshot_download(name_or_path, revision=revision or "master", allow_patterns=CONFIG_FILES))
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name_or_path, revision=revision, allow_patterns=CONFIG_FILES))
    except ImportError:
        raise VlmtuneError("hub 'modelscope' needs the modelscope package: pip install 'vlmtune[modelscope]'") from None
    except Exception as e:  # network errors come in many classes across the two hubs
        raise VlmtuneError(
            f"could not fetch the config of {name_or_path!r} from {hub} ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200]}). Without network access, copy its config.json into a folder and pass "
            "that folder as model.name_or_path.") from None


def make_plan(config: RunConfig, device: str = "cuda", gpus: int = 1, images: int = 1,
              summary: ArchitectureSummary | None = None, padded: bool | None = None) -> Plan:
    """Estimate the run `config` describes on `gpus` devices of kind `device` ("cuda" or "cpu").

    Args:
        summary: the model's summary, if already built (suggestions re-plan the same model).
        padded: whether batches mix sample lengths (default: whenever batch_size > 1).
    """
    if summary is None:
        summary = summarize(config_folder(config.model.name_or_path, config.model.hub, config.model.revision))
    t, d = config.train, config.data
    if t.method == "qlora" and device != "cuda":
        raise ConfigError("train.method=qlora needs a CUDA device (bitsandbytes); plan it with --device cuda")
    dtype = {"auto": 2 if device == "cuda" else 4, "bf16": 2, "fp16": 2, "fp32": 4}[config.model.dtype]
    size = tuple(d.image_size) if d.image_size else None
    patches, tokens, sequences = summary.image.per_image(size, d.max_pixels, d.min_pixels,
                                                         d.max_slice_nums)
    notes = []
    # "auto" picks flash-attention only where flash-attn is installed on the training machine: plan with sdpa
    attention = config.model.attn_implementation or "sdpa"
    if attention == "auto" and device == "cuda":
        notes.append("model.attn_implementation=auto is planned as sdpa; with flash-attn installed (flash_attention_2) "
                     "the padding-mask terms disappear")
    rows, length = t.batch_size, d.max_length
    if t.objective == "dpo":  # chosen and rejected answers of each pair go through one forward together
        rows = 2 * t.batch_size
        notes.append(f"train.objective=dpo: {t.batch_size} pairs are {rows} rows (chosen + rejected) per forward")
    elif t.objective == "grpo":  # every sampled answer is a row
        rows = t.batch_size * config.grpo.num_generations
        notes.append(f"train.objective=grpo: {t.batch_size} prompts x {config.grpo.num_generations} sampled answers = "
                     f"{rows} rows per forward, planned at data.max_length each")
    if d.packing:  # one row of batch_size packs, kept apart by a block mask
        pack = d.pack_length or d.max_length
        rows, length, padded = 1, t.batch_size * pack, True
        images = t.batch_size * max(images, pack // max(1, tokens))
        notes.append(f"data.packing: one row of {t.batch_size} packs x {pack} tokens, planned with packs full of "
                     f"samples that are mostly image ({images} images in the row)")
    liger = t.liger_kernel is True
    if t.liger_kernel == "auto" and device == "cuda":
        notes.append("train.liger_kernel=auto is planned without Liger; where liger-kernel runs, its fused "
                     "cross-entropy removes most of the 'loss' memory (plan with train.liger_kernel=true)")
    setup = Setup(method=t.method, dtype_bytes=dtype, cuda=device == "cuda", batch_size=rows,
                  seq_len=length, padded=rows > 1 if padded is None else padded, liger=liger,
                  images_per_sample=images, patches_per_image=patches, sequences_per_image=sequences,
                  gradient_checkpointing=t.gradient_checkpointing,
                  attention=attention if attention in ("eager", "flash_attention_2") else "sdpa",
                  lora_r=config.lora.r, lora_dropout=config.lora.dropout, grad_accum=t.grad_accum, gpus=gpus,
                  answer_only_loss=t.objective != "sft",
                  **read_deepspeed(t.deepspeed))
    trainable = Trainable.of(summary, t, config.lora)
    if not d.packing and images * tokens > d.max_length:
        notes.append(f"{images} image(s) at this pixel budget make {images * tokens} tokens, more than data.max_length="
                     f"{d.max_length}: such samples are rejected by the pre-flight check")
    found = estimate(summary, trainable, setup)
    reference = reference_bytes(config, summary, dtype)
    if reference:
        found = dataclasses.replace(found, weights=found.weights + reference)
        notes.append(f"the {t.objective} reference model is a frozen copy of the weights ({reference / 2**20:.1f} MiB, in "
                     "'weights'): only adapters train would make it the model with its adapters off, at no cost")
    if t.objective == "grpo":
        notes.append(f"generation buffers (before the training forward, not at the same time): "
                     f"{generation_bytes(config, summary, dtype, rows) / 2**20:.1f} MiB of KV cache and logits")
    return Plan(config, summary, trainable, setup, found, tokens, images, notes)


def reference_bytes(config: RunConfig, summary: ArchitectureSummary, dtype: int) -> int:
    """Memory of DPO's (or GRPO's, with a KL term) reference model: none when only adapters train
    (the reference is the model with its adapters switched off), else a frozen copy of the weights."""
    t = config.train
    if t.objective == "sft" or (t.objective == "grpo" and config.grpo.beta == 0):
        return 0
    adapters_only = t.method != "full" and t.freeze_vision and t.freeze_projector and not config.lora.modules_to_save
    if adapters_only:
        return 0
    per_weight = 0.5 + 1 / 64 if t.method == "qlora" else dtype
    return int(sum(summary.parameters_by_part().values()) * per_weight)


def generation_bytes(config: RunConfig, summary: ArchitectureSummary, dtype: int, rows: int) -> int:
    """GRPO's sampling: the KV cache of `rows` sequences of data.max_length + grpo.max_new_tokens
    positions in every language-model layer, plus one step's fp32 logits."""
    positions = config.data.max_length + config.grpo.max_new_tokens
    llm = summary.llm
    return rows * positions * llm.layers * 2 * llm.kv_dim * dtype + rows * summary.vocab * 4


# --- suggestions ----------------------------------------------------------------------------

def _with(config: RunConfig, changes: dict) -> RunConfig:
    """`config` with dotted fields replaced, e.g. {"train.batch_size": 2}."""
    sections: dict[str, dict] = {}
    for key, value in changes.items():
        section, name = key.split(".")
        sections.setdefault(section, {})[name] = value
    return dataclasses.replace(config, **{k: dataclasses.replace(getattr(config, k), **v) for k, v in sections.items()})


def _label(changes: dict) -> str:
    return " ".join(f"{k}={_json.dumps(v) if isinstance(v, (bool, type(None))) else v}" for k, v in changes.items())


def suggestions(plan: Plan, limit: int, device: str, gpus: int, images: int) -> list[tuple[str, Plan]]:
    """Changes that lower the estimate, each with its own plan, the lowest estimate first; if none
    fits alone, also the fewest of them that fit together (in that order).

    Batch size, pixel budget and max_length are lowered only as far as needed to fit (or to a floor)."""
    t, d = plan.config.train, plan.config.data

    def variant(changes: dict) -> Plan | None:
        try:
            return make_plan(_with(plan.config, changes), device, gpus, images, summary=plan.summary)
        except VlmtuneError:
            return None

    def lowest_that_fits(options: list[tuple[str, dict]]) -> tuple[str, dict, Plan | None] | None:
        """The first option that fits, else the last (the floor)."""
        for i, (label, change) in enumerate(options):
            found = variant(change)
            if found is not None and (found.estimate.total <= limit or i == len(options) - 1):
                return label, change, found
        return None

    candidates: list[tuple[str, dict, Plan | None] | None] = []
    if not t.gradient_checkpointing:
        change = {"train.gradient_checkpointing": True}
        candidates.append((_label(change), change, variant(change)))
    candidates.append(lowest_that_fits([
        (f"train.batch_size={b} train.grad_accum={max(1, t.batch_size * t.grad_accum // b)} (same samples per step)",
         {"train.batch_size": b, "train.grad_accum": max(1, t.batch_size * t.grad_accum // b)})
        for b in range(t.batch_size - 1, 0, -1)]))
    if plan.summary.image.kind == "qwen":
        factor = plan.summary.image.patch_size * plan.summary.image.merge
        candidates.append(lowest_that_fits([
            (f"data.max_pixels={n * factor * factor} ({n} tokens per image)",
             {"data.max_pixels": n * factor * factor, "data.image_size": None})
            for n in (4096, 2048, 1024, 512, 256, 128, 64) if n < plan.tokens_per_image]))
    # the estimate assumes samples as long as data.max_length; real ones are often shorter. Not below what
    # the images alone take (and 256 tokens of text), or every sample would be rejected.
    shortest, lengths = max(256, images * plan.tokens_per_image + 256), []
    length = d.max_length // 2
    while length >= shortest:
        lengths.append((f"data.max_length={length} (longer samples are rejected; `vlmtune data stats` shows the "
                        "lengths)", {"data.max_length": length}))
        length //= 2
    candidates.append(lowest_that_fits(lengths))
    if t.method == "full":
        candidates.append(("train.method=lora", {"train.method": "lora"}, variant({"train.method": "lora"})))
    if t.method != "qlora" and device == "cuda":
        candidates.append(("train.method=qlora (4-bit base weights)", {"train.method": "qlora"},
                           variant({"train.method": "qlora"})))
    stage = read_deepspeed(t.deepspeed).get("zero_stage", 0)
    for zero in (2, 3):
        file = f"configs/deepspeed/zero{zero}.json"
        if gpus > 1 and zero > stage and Path(file).is_file():
            candidates.append((f"train.deepspeed={file} (ZeRO-{zero} over {gpus} GPUs)", {"train.deepspeed": file},
                               variant({"train.deepspeed": file})))
    helpful = sorted((c for c in candidates if c and c[2] is not None and c[2].estimate.total < plan.estimate.total),
                     key=lambda c: c[2].estimate.total)
    found = [(label, p) for label, _, p in helpful]
    if helpful and helpful[0][2].estimate.total > limit:  # no single change fits: add them up, most effective first
        together: dict = {}
        for i, (_, change, _) in enumerate(helpful):
            together.update(change)
            combined = variant(together)
            if combined is not None and (combined.estimate.total <= limit or i == len(helpful) - 1):
                found.append(("together: " + _label(together), combined))
                break
    return found


# --- output ---------------------------------------------------------------------------------

def _unit(*sizes: int) -> tuple[str, int]:
    """GiB, or MiB when everything is below a GiB (tiny models, CPU runs)."""
    return ("GiB", GiB) if max(sizes) >= GiB else ("MiB", 2 ** 20)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def render(plan: Plan, limit: int, gpus: int, found: list[tuple[str, Plan]]) -> str:
    c, s, e = plan.config, plan.setup, plan.estimate
    unit_name, unit = _unit(e.total, limit)
    parts = plan.summary.parameters_by_part()
    total_params = sum(parts.values())
    trainable = plan.trainable.count()
    method = c.train.method + (f" r={c.lora.r}" if c.train.method != "full" else "")
    zero = f", DeepSpeed ZeRO-{s.zero_stage}" + (" + CPU offload" if s.offload_optimizer or s.offload_params else "") \
        if s.zero_stage else ""
    lines = [
        f"plan for {c.model.name_or_path} ({plan.summary.model_type}): {method}, "
        f"{'fp32' if s.dtype_bytes == 4 else 'bf16/fp16'}, batch {s.batch_size} x {s.seq_len} tokens, "
        f"gradient checkpointing {'on' if s.gradient_checkpointing else 'off'}, {gpus} {'GPU' if s.cuda else 'device'}"
        f"{'s' if gpus > 1 else ''}{zero}",
        f"images: {plan.images} per {'row' if getattr(c.data, 'packing', False) else 'sample'}, "
        f"{s.patches_per_image} patches -> {plan.tokens_per_image} tokens each",
        f"parameters: {_count(total_params)} (vision {_count(parts['vision'])}, projector "
        f"{_count(parts['projector'])}, language model {_count(parts['llm'])}); "
        f"trainable {_count(trainable)} ({100 * trainable / total_params:.2f}%)",
        "",
        f"{'component':<34}{unit_name:>8}",
    ]
    rows = [("weights", e.weights), ("optimizer state", e.optimizer), ("gradients", e.gradients),
            ("activations kept for backward", e.activations), ("loss / block gradients", e.transient),
            ("batch", e.batch)]
    if s.cuda:
        rows.append(("CUDA context + allocator", e.overhead))
    lines += [f"{name:<34}{value / unit:8.2f}" for name, value in rows]
    lines.append(f"{'total':<34}{e.total / unit:8.2f}   peak at: {e.moment}")
    lines.append("")
    headroom = limit - e.total
    if headroom >= 0:
        lines.append(f"fits in {limit / unit:.1f} {unit_name}: yes, {headroom / unit:.1f} {unit_name} headroom")
    else:
        lines.append(f"does not fit in {limit / unit:.1f} {unit_name}: {-headroom / unit:.1f} {unit_name} short")
        if found:
            lines.append("changes that lower the estimate, most effective first:")
            for label, variant in found:
                verdict = "fits    " if variant.estimate.total <= limit else "too much"
                lines.append(f"  {variant.estimate.total / unit:7.1f} {unit_name}  {verdict}  {label}")
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def to_json(plan: Plan, limit: int, found: list[tuple[str, Plan]]) -> dict:
    e = plan.estimate
    components = {k: getattr(e, k) for k in ("weights", "optimizer", "gradients", "activations", "transient", "batch",
                                             "overhead")}
    return {"model": plan.config.model.name_or_path, "model_type": plan.summary.model_type,
            "setup": dataclasses.asdict(plan.setup), "tokens_per_image": plan.tokens_per_image, "images": plan.images,
            "parameters": plan.summary.parameters_by_part(), "trainable_parameters": plan.trainable.count(),
            "components_bytes": components, "tensor_bytes": e.tensors, "total_bytes": e.total,
            "total_gib": round(e.total / GiB, 3), "peak_moment": e.moment, "device_memory_bytes": limit,
            "fits": e.total <= limit, "headroom_gib": round((limit - e.total) / GiB, 3), "notes": plan.notes,
            "suggestions": [{"change": label, "total_gib": round(v.estimate.total / GiB, 3),
                             "fits": v.estimate.total <= limit} for label, v in found]}


def plan_command(config: str, overrides: list[str], *, device_memory: str = "80GiB", gpus: int = 1, images: int = 1,
                 device: Literal["cuda", "cpu"] = "cuda", json: bool = False) -> int:
    """Estimate the peak memory per device of a training run, before loading any weights.

    Args:
        config: YAML run config (the one `vlmtune train` takes).
        overrides: Dotted overrides such as train.batch_size=8 data.max_pixels=401408.
        device_memory: Memory of one device, e.g. 80GiB, 24GB, 40000MiB.
        gpus: Number of devices (DeepSpeed ZeRO splits the state over them).
        images: Images per training sample.
        device: cuda (16-bit when model.dtype is auto, CUDA overhead included) or cpu (fp32, tensors only).
        json: Print the estimate as JSON instead of a table.
    """
    if gpus < 1 or images < 0:
        raise ConfigError(f"--gpus {gpus} / --images {images}: need at least one GPU and no negative image count")
    run = load_config(config, overrides)
    limit = parse_memory(device_memory)
    plan = make_plan(run, device, gpus, images)
    found = suggestions(plan, limit, device, gpus, images) if plan.estimate.total > limit else []
    if json:
        print(_json.dumps(to_json(plan, limit, found), indent=2))
    else:
        print(render(plan, limit, gpus, found))
    return 0 if plan.estimate.total <= limit else 1
