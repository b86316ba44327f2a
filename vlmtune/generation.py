"""Generation: the one module every command that makes a model answer goes through (`eval`,
`predict`, `chat`, the validation generation during training, `serve`, `ui`).

    from vlmtune.generation import Sampling, chat_sample, load_generator
    gen = load_generator("runs/latex", adapters={"coco": "runs/coco"})  # run, checkpoint, model folder or hub id
    sample = chat_sample([{"role": "user", "content": [{"type": "image", "image": "f.png"},
                                                       {"type": "text", "text": "LaTeX?"}]}])
    gen.complete([sample], 64)[0].text                    # greedy: what `vlmtune eval` answers
    gen.complete([sample], 64, variant="base")            # the same base, adapters off
    for piece in gen.stream(sample, 64, Sampling(temperature=0.7, seed=1), stop=["\\n"]):
        print(piece, end="")

The API, smallest first:
- `resolve_target(RUN | CHECKPOINT, model, adapter)` / `target_for(RUN | CHECKPOINT | MODEL)` -> `Target`:
  which weights, which adapter and which run config (the config holds the processor settings the
  run trained with: pixel budget or fixed size, `max_slice_nums`, prompt, system prompt).
- `target_parts(target)` -> `RunParts` (`vlmtune.parts`: model folder, family, processor and the
  `Encoder` the run trained with, so a prompt is built exactly as training built it);
  `ready_model(parts, adapter)` -> the model for generation. `load_target(target)` does both and
  returns (model, processor, family); `make_encoder(config, processor, family)` is the run's encoder.
- `chat_sample(messages, image_newline=True)` -> `Sample`: chat messages (content a string or
  text/image parts, read by the `messages` data format's reader; a text part after an image starts
  on a new line, as `vlmtune chat` and the MiniCPM/LLaVA layouts write it) plus the turn to answer.
- `complete(model, encoder, prompts, max_new_tokens, sampling, stop, on_text)` -> `[Completion]`:
  one batched `model.generate` call; greedy unless `sampling` says otherwise; stop strings; text
  pieces passed to `on_text(row, piece)` as they are generated.
- `generate(model, encoder, samples, batch_size, ...)` -> answers: a whole dataset in batches.
- `Generator` (`load_generator`): one model with named variants (the base and each LoRA adapter,
  each with its own run's encoder), `complete`/`stream` on any of them, safe to share between
  threads (calls run one at a time).

Answers are stripped of surrounding whitespace and end before the first stop string; streamed
pieces add up to exactly the answer `complete` returns.
"""

from __future__ import annotations

import math
import queue
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from vlmtune.config import CONFIG_NAME, RunConfig, load_config
from vlmtune.data.collate import Collator, EncodedDataset
from vlmtune.data.encode import Encoder
from vlmtune.data.readers import read_messages
from vlmtune.data.sample import Sample, Turn
from vlmtune.checkpoints import resolve_weights
from vlmtune.errors import VlmtuneError
from vlmtune.models.family import vision_token_ids
from vlmtune.parts import RunParts, build_encoder, run_parts
from vlmtune.scoring import item_key

# For prompts without references to size answers from (eval derives it from the references).
DEFAULT_MAX_NEW_TOKENS = 256


# -- what to load ------------------------------------------------------------------------------

@dataclass
class Target:
    """What to generate with: a base model, maybe an adapter, and the run config it came from."""

    model: str
    adapter: str | None
    name: str
    config: RunConfig
    run_dir: Path | None

    def base(self) -> Target:
        """The untuned base model with this run's processor settings (`eval --compare-base`)."""
        return Target(self.config.model.name_or_path, None, "base", self.config, self.run_dir)


def resolve_target(target: str | None, model: str | None = None, adapter: str | None = None,
                   trust_remote_code: bool = False) -> Target:
    """A run folder (its final/ or newest checkpoint), a checkpoint folder, or --model [--adapter].

    Remote code follows `trust_remote_code` (the command's --trust-remote-code) alone: a value saved
    in the run folder's config is ignored.
    """
    from vlmtune.config import saved_remote_code
    from vlmtune.models.load import check_adapter

    if target is None:
        if model is None:
            raise VlmtuneError("give a run or checkpoint folder, or --model (and optionally --adapter)")
        if adapter:
            check_adapter(adapter)
        config = load_config(None, [f"model.name_or_path={model}"])
        config.model.trust_remote_code = trust_remote_code
        return Target(model, adapter, "adapter" if adapter else "model", config, None)
    # final/, else the newest complete checkpoint (the rule merge follows too)
    folder = resolve_weights(Path(target), log=lambda m: print(m, file=sys.stderr, flush=True))
    if not (folder / CONFIG_NAME).exists():
        raise VlmtuneError(f"{folder}: no {CONFIG_NAME}; pass --model (and --adapter) instead")
    config = saved_remote_code(load_config(folder / CONFIG_NAME), trust_remote_code, folder / CONFIG_NAME)
    run_dir = folder.parent
    if (folder / "adapter_config.json").exists():
        return Target(config.model.name_or_path, str(folder), folder.name, config, run_dir)
    return Target(str(folder), None, folder.name, config, run_dir)


def target_for(path: str, trust_remote_code: bool = False) -> Target:
    """`resolve_target` for one argument that may be a run, a checkpoint, a model folder without a
    run config, or a hub id."""
    folder = Path(path).expanduser()
    is_model_folder = (folder / "config.json").is_file() and not (folder / CONFIG_NAME).is_file()
    if is_model_folder or (not folder.exists() and path.count("/") == 1 and not path.startswith((".", "/", "~"))):
        return resolve_target(None, path, None, trust_remote_code)
    return resolve_target(path, None, None, trust_remote_code)


def target_parts(target: Target) -> RunParts:
    """The run's parts (`vlmtune.parts`) for `target`: its weights folder, processor and encoder."""
    return run_parts(target.config, model=target.model)


def ready_model(parts: RunParts, adapter: str | None = None):
    """The model of `parts` ready for generation (eval mode, on the GPU if there is one), the
    adapter applied when there is one."""
    model = parts.load_model()
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    if torch.cuda.is_available():
        model = model.to("cuda")
    return model.eval()


def load_target(target: Target):
    """(model, processor, family) ready for generation, the adapter applied when there is one."""
    parts = target_parts(target)
    return ready_model(parts, target.adapter), parts.processor, parts.family


def make_encoder(config: RunConfig, processor, family) -> Encoder:
    """The encoder a run trained with (same prompt, system prompt and image size), for prompts of
    any length."""
    return build_encoder(config, processor, family, limit_length=False)


# -- prompts -------------------------------------------------------------------------------------

def chat_sample(messages: list[dict], source: str = "chat", image_newline: bool = True) -> Sample:
    """The conversation `messages` as a `Sample` that asks for the next assistant turn.

    Each message is `{"role", "content"}`, the content a string or a list of text and image parts
    (`{"type": "image", "image": PATH}`), read by the same function as the `messages` data format.
    With `image_newline`, a text part right after an image part starts on a new line: `[image,
    "What is this?"]` becomes `<image>\\nWhat is this?`, the layout `vlmtune data prepare`, the
    MiniCPM and LLaVA formats and `vlmtune chat` use. Without it, parts are joined as they are
    (`<image>What is this?`), as the `messages` data format reads them. The sample ends with an
    empty assistant turn, which `Encoder.encode_prompt` replaces with the generation prompt.

    Raises:
        DataError: a message without a known role or content.
    """
    if image_newline:
        messages = [{**m, "content": _newline_after_images(m["content"])}
                    if isinstance(m, dict) and isinstance(m.get("content"), list) else m for m in messages]
    sample = read_messages({"messages": messages}, source, ".")
    return Sample(sample.images, [*sample.turns, Turn("assistant", "")], source=source)


def _newline_after_images(parts: list) -> list:
    out = []
    for part in parts:
        follows_image = out and isinstance(out[-1], dict) and out[-1].get("type") in ("image", "image_url")
        if follows_image and isinstance(part, dict) and part.get("type") == "text" \
                and isinstance(part.get("text"), str) and not part["text"].startswith("\n"):
            part = {**part, "text": "\n" + part["text"]}
        out.append(part)
    return out


def derive_max_new_tokens(tokenizer, samples: list[Sample]) -> int:
    """Room for the longest reference and then some: 1.5x its token count plus 8."""
    longest = max((len(tokenizer(s.answer(), add_special_tokens=False)["input_ids"]) for s in samples), default=32)
    return int(math.ceil(longest * 1.5)) + 8


# -- one batch -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy (temperature 0, the default and what eval does) or
    drawn from the distribution sharpened by `temperature` and cut to `top_p`. `seed` makes a
    draw repeatable: the same seed, prompt and batch give the same answer."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def generate_kwargs(self) -> dict:
        if self.greedy:
            return {"do_sample": False}
        # top_k=0 switches off a top_k the checkpoint's generation_config may set (Qwen's sets 1)
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": 0}


GREEDY = Sampling()


@dataclass
class Completion:
    """One answer: its text, why it ended ("stop": end of turn or a stop string; "length": the
    token limit), and token counts (images included in the prompt's)."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    token_ids: tuple[int, ...] = ()  # the tokens generated, the end-of-turn token included when it ended there


class _Rows(StoppingCriteria):
    """Follows every row of a batch as `generate` extends it: ends a row at an end-of-turn token,
    a stop string or its own token limit, and passes finished text on as it becomes final.

    A `StoppingCriteria` sees each new token before the next step starts, so a row that reached a
    stop string stops there instead of running on to the batch's longest limit. Text is handed out
    only where it can no longer change: not a trailing part that may begin a stop string, not
    trailing whitespace (the answer is stripped), not a half-decoded character.
    """

    def __init__(self, tokenizer, prompt_length: int, limits: list[int], stops: list[list[str]], eos: set[int],
                 on_text: Callable[[int, str], None] | None):
        self.tokenizer, self.prompt_length, self.limits, self.stops = tokenizer, prompt_length, limits, stops
        self.eos, self.on_text = eos, on_text
        n = len(limits)
        self.tokens: list[list[int]] = [[] for _ in range(n)]
        self.text = [""] * n  # the answer so far, cut at a stop string
        self.sent = [""] * n  # what on_text has been given
        self.reason: list[str | None] = [None] * n

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        if input_ids.shape[1] > self.prompt_length:  # the first call comes after the first new token
            for row, token in enumerate(input_ids[:, -1].tolist()):
                if self.reason[row] is None:
                    self._advance(row, token)
        return torch.tensor([r is not None for r in self.reason], device=input_ids.device)

    def _advance(self, row: int, token: int) -> None:
        self.tokens[row].append(token)
        if token in self.eos:
            self.reason[row] = "stop"
        elif self.stops[row] or self.on_text:  # decode as we go only when someone needs the text now
            text = self.tokenizer.decode(self.tokens[row], skip_special_tokens=True)
            cut = min((i for i in (text.find(s) for s in self.stops[row]) if i >= 0), default=-1)
            if cut >= 0:
                self.text[row], self.reason[row] = text[:cut], "stop"
            else:
                self.text[row] = text
                self._send(row, self._settled(row, text))
        if self.reason[row] is None and len(self.tokens[row]) >= self.limits[row]:
            self.reason[row] = "length"
        if self.reason[row] is not None:
            self._send(row, self.answer(row))

    def _settled(self, row: int, text: str) -> str:
        """The part of `text` that no later token can change in the answer."""
        text = text.lstrip().rstrip("\ufffd")
        hold = max((k for s in self.stops[row] for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return text[:len(text) - hold].rstrip()

    def _send(self, row: int, text: str) -> None:
        if self.on_text and text.startswith(self.sent[row]) and len(text) > len(self.sent[row]):
            self.on_text(row, text[len(self.sent[row]):])
            self.sent[row] = text

    def answer(self, row: int) -> str:
        if not (self.stops[row] or self.on_text) or self.reason[row] is None:
            self.text[row] = self.tokenizer.decode(self.tokens[row], skip_special_tokens=True)
        return self.text[row].strip()


def _never_sampled(model) -> list[int]:
    """Tokens no answer may contain: the image/video placeholders and their start/end markers."""
    config = getattr(model, "config", None)
    return vision_token_ids(config) if config is not None else []


def _eos_ids(model) -> set[int]:
    """The tokens `generate` ends a row at: the checkpoint's generation_config says which."""
    eos = getattr(model.generation_config, "eos_token_id", None)
    return set() if eos is None else {eos} if isinstance(eos, int) else set(eos)


@torch.no_grad()
def complete(model, encoder: Encoder, prompts: list[Sample | dict], max_new_tokens: int | list[int],
             sampling: Sampling | None = None, stop: list[str] | list[list[str]] | None = None,
             on_text: Callable[[int, str], None] | None = None) -> list[Completion]:
    """Answers to `prompts` from one `model.generate` call, prompts padded on the left.

    Args:
        prompts: samples (answered from their turns before the last answer) or what
            `encoder.encode_prompt` made of them.
        max_new_tokens: the longest answer, for all prompts or one per prompt.
        sampling: greedy when None.
        stop: strings that end an answer (not included in it): one list for all prompts, or one
            list per prompt.
        on_text: called as `on_text(row, piece)` with each new piece of a row's answer, from the
            thread that generates; the pieces of a row add up to its `Completion.text`.
    """
    items = [encoder.encode_prompt(p) if isinstance(p, Sample) else p for p in prompts]
    n = len(items)
    limits = list(max_new_tokens) if isinstance(max_new_tokens, (list, tuple)) else [max_new_tokens] * n
    stops = [list(s) for s in stop] if stop and not isinstance(stop[0], str) else [list(stop or [])] * n
    tokenizer = encoder.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batch = Collator(pad_id, padding_side="left", concat_dims=encoder.family.concat_dims)(items)
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    rows = _Rows(tokenizer, batch["input_ids"].shape[1], limits, stops, _eos_ids(model), on_text)
    sampling = sampling or GREEDY
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    was_training = model.training
    model.eval()
    try:
        model.generate(**batch, max_new_tokens=max(limits), pad_token_id=pad_id,
                       stopping_criteria=StoppingCriteriaList([rows]), suppress_tokens=_never_sampled(model) or None,
                       **sampling.generate_kwargs())
    finally:
        if was_training:
            model.train()
    return [Completion(rows.answer(i), rows.reason[i] or "length", len(items[i]["input_ids"]), len(rows.tokens[i]),
                       tuple(rows.tokens[i])) for i in range(n)]


def generate(model, encoder: Encoder, samples: list[Sample], batch_size: int = 8, max_new_tokens: int | None = None,
             progress: bool = True, desc: str = "generating",
             on_batch: Callable[[list[int], list[str]], None] | None = None, sampling: Sampling | None = None,
             on_text: Callable[[int, str], None] | None = None) -> list[str]:
    """Answers to the prompt turns of `samples`, in order, `batch_size` prompts at a time.

    Records that ask the same thing (same images, same turns before the answer) are answered
    once and share the answer: a COCO image with five captions is one prompt, not five.
    `on_batch(indices, answers)` is called after each batch with the positions in `samples` it
    answered, so callers can write results as they come. `on_text(row, piece)` receives answers
    as they are generated (row: the position within the batch).
    """
    max_new_tokens = max_new_tokens or derive_max_new_tokens(encoder.tokenizer, samples)
    askers: dict[tuple, list[int]] = {}  # prompt -> positions of the records that ask it
    for i, sample in enumerate(samples):
        askers.setdefault(item_key(sample), []).append(i)
    groups = list(askers.values())
    dataset = EncodedDataset([samples[g[0]] for g in groups], encoder, prompt_only=True)
    answers: list[str] = [""] * len(samples)
    bar = tqdm(total=len(groups), desc=desc, unit="sample", disable=not progress, leave=False)
    for start in range(0, len(groups), batch_size):
        chunk = range(start, min(start + batch_size, len(groups)))
        done = complete(model, encoder, [dataset[g] for g in chunk], max_new_tokens, sampling, on_text=on_text)
        pairs = [(i, c.text) for g, c in zip(chunk, done) for i in groups[g]]
        for i, answer in pairs:
            answers[i] = answer
        if on_batch is not None:
            on_batch([i for i, _ in pairs], [a for _, a in pairs])
        bar.update(len(chunk))
    bar.close()
    return answers


def _pieces(run: Callable[[Callable[[int, str], None]], list[Completion]]) -> Iterator[str]:
    """The pieces `run(on_text)` produces, yielded as they come while it runs in a thread; the
    iterator's return value (StopIteration.value) is its one `Completion`."""
    pieces: queue.Queue = queue.Queue()
    end = object()

    def work() -> None:
        try:
            pieces.put((end, run(lambda row, piece: pieces.put(piece))[0]))
        except BaseException as e:  # handed to the reader, raised there
            pieces.put((end, e))

    threading.Thread(target=work, daemon=True, name="vlmtune-stream").start()
    while True:
        item = pieces.get()
        if isinstance(item, tuple) and item[0] is end:
            if isinstance(item[1], BaseException):
                raise item[1]
            return item[1]
        yield item


def stream(model, encoder: Encoder, sample: Sample, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
           sampling: Sampling | None = None, stop: list[str] | None = None) -> Iterator[str]:
    """The answer to `sample` piece by piece, as it is generated (a thread runs `complete`)."""
    return _pieces(lambda on_text: complete(model, encoder, [sample], max_new_tokens, sampling, stop, on_text))


# -- several variants on one model -----------------------------------------------------------

@dataclass
class Variant:
    """One name a `Generator` answers as: the base weights, or the base with one LoRA adapter,
    with the encoder (processor settings, prompt, system prompt) of the run it came from."""

    name: str
    adapter: str | None  # the adapter's name on the peft model; None: the base weights, adapters off
    encoder: Encoder
    config: RunConfig
    source: str  # the folder or hub id it was loaded from


class Generator:
    """A loaded model and its variants; `complete` and `stream` answer as any of them.

    Calls run one at a time (a lock), since choosing an adapter changes the shared model.
    """

    def __init__(self, model, variants: list[Variant], default: str):
        self.model = model
        self.variants = {v.name: v for v in variants}
        self.default = default
        self._lock = threading.Lock()

    @property
    def names(self) -> list[str]:
        return list(self.variants)

    def variant(self, name: str | None = None) -> Variant:
        """The variant called `name` (the default one for None).

        Raises:
            VlmtuneError: no variant has that name.
        """
        if name is None:
            return self.variants[self.default]
        if name not in self.variants:
            raise VlmtuneError(f"unknown model {name!r}; this one answers as: {', '.join(self.variants)}")
        return self.variants[name]

    @property
    def context_length(self) -> int | None:
        """The most tokens (prompt and answer) the language model takes, from its config."""
        config = self.model.config
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        return getattr(text, "max_position_embeddings", None)

    @contextmanager
    def _as(self, variant: Variant):
        with self._lock:
            if variant.adapter is not None:
                self.model.set_adapter(variant.adapter)
                yield
            else:
                with self.model.disable_adapter() if hasattr(self.model, "disable_adapter") else nullcontext():
                    yield

    def complete(self, prompts: list[Sample | dict], max_new_tokens: int | list[int] = DEFAULT_MAX_NEW_TOKENS,
                 sampling: Sampling | None = None, stop: list[str] | list[list[str]] | None = None,
                 on_text: Callable[[int, str], None] | None = None, variant: str | None = None) -> list[Completion]:
        """`complete` as the variant `variant`; encoded prompts must come from its encoder."""
        v = self.variant(variant)
        with self._as(v):
            return complete(self.model, v.encoder, prompts, max_new_tokens, sampling, stop, on_text)

    def stream(self, sample: Sample, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, sampling: Sampling | None = None,
               stop: list[str] | None = None, variant: str | None = None) -> Iterator[str]:
        """`stream` as the variant `variant`."""
        self.variant(variant)  # an unknown name fails here, not in the thread
        return _pieces(lambda on_text: self.complete([sample], max_new_tokens, sampling, stop, on_text, variant))


def variant_name(target: Target) -> str:
    """The name a run is served as: its folder (`latex` for runs/latex/final), with the checkpoint
    for a checkpoint (`latex/checkpoint-100`); an adapter folder's name for --adapter; `base` for a
    model without a run."""
    if target.run_dir is None:
        return Path(target.adapter).name if target.adapter else "base"
    folder = Path(target.adapter or target.model)
    if folder.name == "final":
        return target.run_dir.name
    if folder.name.startswith("checkpoint-"):
        return f"{target.run_dir.name}/{folder.name}"
    return folder.name


def adapter_target(path: str, base: Target, trust_remote_code: bool = False) -> Target:
    """The adapter at `path` (a LoRA run, a checkpoint, or a bare adapter folder) to put on the base
    of `base`; a bare adapter gets `base`'s processor settings.

    Raises:
        VlmtuneError: not an adapter (a fully trained run, or a folder without adapter_config.json).
    """
    from vlmtune.models.load import check_adapter

    folder = Path(path).expanduser()
    if (folder / "adapter_config.json").is_file() and not (folder / CONFIG_NAME).is_file():
        check_adapter(folder)
        return Target(base.config.model.name_or_path if base.adapter else base.model, str(folder), folder.name,
                      base.config, None)
    if not folder.is_dir():
        check_adapter(folder)  # its message says what an adapter folder holds
    t = resolve_target(str(folder), None, None, trust_remote_code)
    if t.adapter is None:
        raise VlmtuneError(f"adapter {path}: a fully fine-tuned model, not a LoRA adapter; it cannot share a base "
                           "with others. Serve it on its own, or pass one of its LoRA runs.")
    return t


def load_generator(source: str | Target, adapters: dict[str, str] | None = None, *, name: str | None = None,
                   trust_remote_code: bool = False) -> Generator:
    """A `Generator` for a run, checkpoint, model folder or hub id, with more LoRA adapters on its base.

    A LoRA run gives two variants: `base` (its base model) and the run (named `name`, or by
    `variant_name`); a model or a fully trained run gives one. Each of `adapters` (name -> a run,
    checkpoint or adapter folder) adds one, loaded onto the same base weights, and answers with the
    processor settings of its own run. The default variant is `source`'s.

    Raises:
        VlmtuneError: an adapter that is not one, or a name used twice.
    """
    t = source if isinstance(source, Target) else target_for(source, trust_remote_code)
    own = name or variant_name(t)
    loras = ([(own, t)] if t.adapter else []) + [(n, adapter_target(p, t, trust_remote_code))
                                                  for n, p in (adapters or {}).items()]
    names = ["base" if t.adapter else own] + [n for n, _ in loras]
    if len(set(names)) != len(names):
        raise VlmtuneError(f"model names must differ: {', '.join(names)}; give each --adapter its own NAME=PATH")
    c = t.config
    base = c.model.name_or_path if t.adapter else t.model
    parts = run_parts(c, model=base)
    model = parts.load_model()
    variants = [Variant(names[0], None, parts.encoder, c, base)]
    for variant, lt in loras:
        if lt.config.model.name_or_path != c.model.name_or_path and lt.run_dir is not None:
            print(f"note: adapter {variant} was trained on {lt.config.model.name_or_path}; it is served on {base}",
                  file=sys.stderr, flush=True)
        if not variants[1:]:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, lt.adapter, adapter_name=variant)
        else:
            model.load_adapter(lt.adapter, adapter_name=variant)
        variants.append(Variant(variant, variant, parts.with_config(lt.config).encoder, lt.config, lt.adapter))
    if torch.cuda.is_available():
        model = model.to("cuda")
    return Generator(model.eval(), variants, own)
