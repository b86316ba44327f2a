"""Generate with a model: over a whole dataset (`predict`), or in a conversation (`chat`).

    vlmtune predict runs/latex --data val.json --out predictions.jsonl
    vlmtune chat runs/caption                      # interactive: /image PATH, /reset, /exit
    vlmtune chat runs/caption --image plane.jpg --prompt "Tell me the model of this aircraft." \\
        --prompt "Introduce something about Airbus A380."
    printf '/image a.png\\nWhat is this?\\nAnd the colour?\\n' | vlmtune chat runs/caption

Both take what `vlmtune eval` takes (a run folder, a checkpoint, or --model [--adapter]) and
build prompts with the run's own `Encoder`, so the model is asked exactly as it was trained.
`predict` goes through `generation.generate`: batches padded on the left, greedy decoding. `chat`
sends the whole conversation again at every turn, earlier answers and images included, because
the model keeps no memory between calls; that is how seed 001's second round sees the first.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

from vlmtune.data.encode import Encoder
from vlmtune.data.sample import IMAGE, Sample, Turn
from vlmtune.errors import VlmtuneError
from vlmtune.evaluate import PartialJsonl, preflight
from vlmtune.generation import (DEFAULT_MAX_NEW_TOKENS, derive_max_new_tokens, generate, ready_model, resolve_target,
                                target_parts)
from vlmtune.scoring import prompt_text

CHAT_HELP = "/image PATH attaches an image to your next message, /reset forgets the conversation, /exit quits"


# -- predict --------------------------------------------------------------------------------

def prediction_row(index: int, sample: Sample, prediction: str) -> dict:
    """One line of the output; `reference` only for samples that hold an answer."""
    row = {"index": index, "source": sample.source, "images": sample.images, "prompt": prompt_text(sample),
           "prediction": prediction}
    if any(t.role == "assistant" for t in sample.turns):
        row["reference"] = sample.answer()
    return row


def predict_command(target: str | None = None, /, model: str | None = None, adapter: str | None = None, *,
                    data: str, out: str, batch_size: int = 8, max_new_tokens: int | None = None,
                    limit: int | None = None, trust_remote_code: bool = False) -> int:
    """Generate an answer for every sample of a dataset and write them to a JSONL file.

    Each sample is answered from its turns before the last answer (all of them when it has none),
    greedily, in batches. Unlike `vlmtune eval`, nothing is scored. Every record is checked first
    (images exist and open, turns are well formed): a bad one stops the command before the model
    loads, with `FILE:INDEX: what is wrong`. Answers are written as each batch finishes, to
    OUT's NAME.partial.jsonl, renamed to OUT at the end: a crash or Ctrl-C keeps the finished ones;
    a second predict into the same OUT while this one runs is refused.

    Args:
        target: Run folder (uses final/, else the newest checkpoint) or checkpoint folder.
        model: Base model (hub id or folder) when no run folder is given.
        adapter: LoRA adapter folder to apply on --model.
        data: Dataset to answer, in any supported format.
        out: Output JSONL file; one line per sample: index, source, images, prompt, prediction,
            and reference when the sample has an answer.
        batch_size: Samples per generation batch.
        max_new_tokens: Longest answer; default: the run's eval.max_new_tokens, else 1.5x the
            longest reference plus 8 tokens, else 256.
        limit: Predict only the first N samples.
        trust_remote_code: Run the Python files of the model folder (read them first); a run folder's
            config never enables it.
    """
    from vlmtune.data.formats import load_samples

    t = resolve_target(target, model, adapter, trust_remote_code)
    c = t.config
    samples = load_samples(data, c.data.format)
    samples = samples[:limit] if limit else samples
    if not samples:
        raise VlmtuneError(f"{data}: no samples to predict")
    out_path = Path(out)
    if out_path.is_dir():
        raise VlmtuneError(f"--out {out} is a folder; give a file name such as {out_path / 'predictions.jsonl'}")
    preflight(samples, data, need_answers=False)

    parts = target_parts(t)
    net, encoder = ready_model(parts, t.adapter), parts.encoder
    answered = [s for s in samples if s.answer()]
    max_new_tokens = (max_new_tokens or c.eval.max_new_tokens
                      or (derive_max_new_tokens(encoder.tokenizer, answered) if answered else DEFAULT_MAX_NEW_TOKENS))
    with PartialJsonl(out_path, len(samples)) as writer:
        def write(indices: list[int], answers: list[str]) -> None:
            writer.write([prediction_row(i, samples[i], answer) for i, answer in zip(indices, answers)])

        generate(net, encoder, samples, batch_size, max_new_tokens, desc="predicting", on_batch=write)
        writer.finish()
    print(f"wrote {len(samples)} predictions to {out_path}")
    return 0


# -- chat -----------------------------------------------------------------------------------

def check_image(path: str) -> str:
    """The absolute path of a readable image file, or an error that says what is wrong with it."""
    p = Path(path).expanduser()
    if not p.exists():
        raise VlmtuneError(f"image {path}: no such file (looked in {p.resolve().parent}); check the path")
    if not p.is_file():
        raise VlmtuneError(f"image {path}: is a folder, not an image file")
    from PIL import Image

    try:
        with Image.open(p) as im:
            im.verify()
    except Exception as e:  # PIL raises several classes for "not an image" and "truncated"
        raise VlmtuneError(f"image {path}: not a readable image ({type(e).__name__}: {e})") from None
    return str(p.resolve())


class ChatSession:
    """One conversation with a model: its turns and images so far, and images for the next message.

    Each answer is generated from the whole conversation, rendered by the run's `Encoder` like a
    training sample, so a follow-up question sees the earlier questions, answers and images.

    Args:
        model: the model, ready for generation (`generation.ready_model`).
        encoder: the run's encoder (`RunParts.encoder`).
        max_new_tokens: longest answer per turn.
    """

    def __init__(self, model, encoder: Encoder, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS):
        self.model = model
        self.encoder = encoder
        self.max_new_tokens = max_new_tokens
        self.turns: list[Turn] = []
        self.images: list[str] = []  # images of `turns`, in placeholder order
        self.pending: list[str] = []  # attached, sent with the next message

    def attach(self, path: str) -> str:
        """Attach an image to the next message; returns its absolute path."""
        self.pending.append(check_image(path))
        return self.pending[-1]

    def reset(self) -> None:
        self.turns, self.images, self.pending = [], [], []

    def request(self, text: str) -> Sample:
        """The conversation plus the message `text` (with the attached images) as a `Sample`.

        It ends with an empty assistant turn: `Encoder.encode_prompt` prompts with the turns
        before the last answer, so the whole conversation is the prompt.
        """
        # Images go first and on their own line, as in the training data ("<image>\nquestion").
        message = IMAGE * len(self.pending) + "\n" + text if self.pending else text
        return Sample(self.images + self.pending, [*self.turns, Turn("user", message), Turn("assistant", "")],
                      source=f"chat:turn {len(self.turns) // 2 + 1}")

    def prompt(self, text: str) -> str:
        """The text the model would be given for the message `text` (chat template applied)."""
        sample = self.request(text)
        return self.encoder.render(self.encoder.messages(sample, sample.prompt_turns()), add_generation_prompt=True)

    def ask(self, text: str, stream: bool = False) -> str:
        """The model's answer to `text`; with `stream`, it is printed as it is generated."""
        sample = self.request(text)
        answer = generate(self.model, self.encoder, [sample], batch_size=1, max_new_tokens=self.max_new_tokens,
                          progress=False, on_text=(lambda _, piece: print(piece, end="", flush=True)) if stream else None)[0]
        if stream:
            print(flush=True)
        # Only now, so that a failed turn leaves the conversation as it was.
        self.turns += [sample.turns[-2], Turn("assistant", answer)]
        self.images, self.pending = sample.images, []
        return answer


def run_chat(session: ChatSession, lines: Iterable[str], stream: bool = True, interactive: bool = False) -> None:
    """Answer `lines` one by one; `/image PATH`, `/reset` and `/exit` are commands.

    A bad command or image is reported and the chat goes on when a person is typing
    (`interactive`); from a script it is an error, so the script does not go on without it.
    """
    for line in lines:
        line = line.strip()
        if not line:
            continue
        if not line.startswith("/"):
            answer = session.ask(line, stream)
            if not stream:
                print(answer, flush=True)
            continue
        command, _, arg = line.partition(" ")
        arg = arg.strip()
        try:
            if command in ("/exit", "/quit"):
                return
            if command == "/reset":
                session.reset()
                print("(conversation cleared)", file=sys.stderr)
            elif command == "/image":
                if not arg:
                    raise VlmtuneError("/image needs a path: /image PATH")
                session.attach(arg)
                print(f"(image attached to your next message: {arg})", file=sys.stderr)
            else:
                raise VlmtuneError(f"unknown command {command}; {CHAT_HELP}")
        except VlmtuneError as e:
            if not interactive:
                raise
            print(f"error: {e}", file=sys.stderr)


def _terminal_lines() -> Iterator[str]:
    while True:
        try:
            yield input("> ")
        except EOFError:  # Ctrl-D
            print()
            return


def chat_command(target: str | None = None, /, model: str | None = None, adapter: str | None = None,
                 prompt: list[str] | None = None, image: list[str] | None = None, max_new_tokens: int = 256,
                 stream: bool = True, trust_remote_code: bool = False) -> int:
    """Chat with a model about images, interactively or one round per --prompt.

    Interactive (a terminal, no --prompt): type messages; /image PATH attaches an image to the
    next message, /reset forgets the conversation, /exit or Ctrl-D quits. With stdin piped and no
    --prompt, each stdin line is a message or command. Every answer sees the whole conversation.

    Args:
        target: Run folder (uses final/, else the newest checkpoint) or checkpoint folder.
        model: Base model (hub id or folder) when no run folder is given.
        adapter: LoRA adapter folder to apply on --model.
        prompt: A user message; repeat --prompt for more rounds, answered in order.
        image: Image file attached to the first message; repeat for more images.
        max_new_tokens: Longest answer per turn.
        stream: Print each answer's tokens as they are generated.
        trust_remote_code: Run the Python files of the model folder (read them first); a run folder's
            config never enables it.
    """
    images = [check_image(p) for p in image or []]  # before loading the model: fail fast
    t = resolve_target(target, model, adapter, trust_remote_code)
    parts = target_parts(t)
    session = ChatSession(ready_model(parts, t.adapter), parts.encoder, max_new_tokens)
    session.pending = images
    if prompt:  # each --prompt is a message, never a /command
        for text in prompt:
            answer = session.ask(text, stream)
            if not stream:
                print(answer, flush=True)
        return 0
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {t.model}" + (f" + {t.adapter}" if t.adapter else "") + f". {CHAT_HELP}.",
              file=sys.stderr)
    run_chat(session, _terminal_lines() if interactive else sys.stdin, stream, interactive)
    return 0
