"""The `vlmtune` command: a plain table from command name to function.

Each command is one typed function; its signature is its command line. Parameters without a
default are positional (keyword-only ones are required `--options`), the others are `--options`
(positional-only ones, before `/`, are optional positionals); the `Args:` section of the function's
docstring is the `--help` text. Run `vlmtune --help` for the list.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import re
import sys
import types
import typing
import warnings

from vlmtune.errors import VlmtuneError

# name -> ("module:function", one-line summary). Modules are imported only when their command
# runs, so `vlmtune --help` stays fast (no torch import).
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("vlmtune.train:train_command", "Fine-tune a model from a YAML config (LoRA, QLoRA or full)."),
    "demo": ("vlmtune.demo:demo", "Run the offline demo: synthetic data, tiny model, fine-tune, before/after metrics."),
    "tiny-model": ("vlmtune.models.tiny:tiny_model_command", "Build a random-weight tiny checkpoint with a real processor."),
    "data check": ("vlmtune.data_commands:check_command", "Pre-flight check of a dataset: images, placeholders, roles, token lengths."),
    "data synth": ("vlmtune.data.synth:synth_command", "Write an offline synthetic dataset (latex formulas or captioned scenes)."),
    "data convert": ("vlmtune.data.convert:convert_command", "Convert a dataset between the supported formats."),
    "data split": ("vlmtune.data.convert:split_command", "Split a dataset into train and validation files, reproducibly."),
    "data prepare": ("vlmtune.data.prepare:prepare_command", "Download or read a dataset and write a training file (latex-ocr, coco-caption, generic)."),
    "data stats": ("vlmtune.data_commands:stats_command", "Sample, image and token-length statistics with a histogram."),
    "data make-pairs": ("vlmtune.make_pairs:make_pairs_command",
                        "DPO preference pairs from a model's own sampled answers, scored by the task metric."),
    "eval": ("vlmtune.evaluate:eval_command", "Evaluate a run, checkpoint or model on a dataset with task metrics."),
    "predict": ("vlmtune.infer:predict_command", "Batched generation over a dataset to JSONL."),
    "chat": ("vlmtune.infer:chat_command", "Chat with a model (interactive, or one-shot with --prompt/--image)."),
    "serve": ("vlmtune.serve.command:serve_command", "Serve a run or model over an OpenAI-compatible HTTP API."),
    "ui": ("vlmtune.ui:ui_command", "Open a web UI: chat (base vs tuned side by side), evaluations, training curves."),
    "merge": ("vlmtune.merge:merge_command", "Merge a LoRA checkpoint into its base model and verify the result."),
    "report": ("vlmtune.report:report_command", "Rebuild report.html for a run folder."),
    "plan": ("vlmtune.plan:plan_command", "Estimate peak memory per device of a training run before loading weights."),
}


def _arg_docs(fn) -> dict[str, str]:
    """Parameter descriptions from a Google-style `Args:` docstring section."""
    doc = inspect.getdoc(fn) or ""
    match = re.search(r"^Args:\n(.*?)(?:^\S|\Z)", doc, flags=re.S | re.M)
    docs: dict[str, str] = {}
    if match:
        name = None
        for line in match.group(1).splitlines():
            m = re.match(r"\s{2,4}(\w+)(?: \(.*?\))?: (.*)", line)
            if m:
                name, text = m.groups()
                docs[name] = text.strip()
            elif name and line.strip():
                docs[name] += " " + line.strip()
    return docs


def _unwrap_optional(tp):
    """`X | None` -> X."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def build_parser(fn, prog: str, summary: str) -> argparse.ArgumentParser:
    doc = inspect.getdoc(fn) or summary
    description = doc.split("\nArgs:")[0].strip()
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    docs = _arg_docs(fn)
    hints = typing.get_type_hints(fn)
    for name, param in inspect.signature(fn).parameters.items():
        tp = _unwrap_optional(hints.get(name, str))
        help_text = docs.get(name, "")
        origin = typing.get_origin(tp)
        kwargs: dict = {"help": help_text}
        if origin is typing.Literal:
            kwargs["choices"] = list(typing.get_args(tp))
            kwargs["type"] = type(kwargs["choices"][0])
        elif origin is list:
            kwargs["nargs"] = "*"
            kwargs["type"] = typing.get_args(tp)[0] if typing.get_args(tp) else str
        elif tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif tp in (int, float, str):
            kwargs["type"] = tp
        if param.default is inspect.Parameter.empty and param.kind == param.KEYWORD_ONLY:
            # keyword-only without a default: a required --option (`--out DIR` reads better)
            parser.add_argument("--" + name.replace("_", "-"), dest=name, required=True, **kwargs)
        elif param.default is inspect.Parameter.empty:
            parser.add_argument(name, **kwargs)
        elif param.kind == param.POSITIONAL_ONLY:  # `def f(target=None, /)`: an optional positional
            parser.add_argument(name, nargs="?", default=param.default, **kwargs)
        else:
            if param.default is not None and tp is not bool:
                kwargs["help"] = f"{help_text} (default: {param.default})".strip()
            if origin is list:  # `--prompt a --prompt b` adds up instead of keeping only the last
                kwargs["action"] = "extend"
            parser.add_argument("--" + name.replace("_", "-"), dest=name, default=param.default, **kwargs)
    return parser


def _load(target: str):
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = ["usage: vlmtune COMMAND [ARGS] (vlmtune COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from vlmtune import __version__
        print(__version__)
        return 0
    name = argv[0]
    if len(argv) > 1 and f"{argv[0]} {argv[1]}" in COMMANDS:
        name = f"{argv[0]} {argv[1]}"
    if name not in COMMANDS:
        group = [n for n in COMMANDS if n.startswith(name + " ")]
        if group:
            print(f"usage: vlmtune {name} {{{','.join(n.split()[1] for n in group)}}} ...", file=sys.stderr)
            for n in group:
                print(f"  {n:<14}  {COMMANDS[n][1]}", file=sys.stderr)
        else:
            print(f"vlmtune: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    rest = argv[len(name.split()):]
    target, summary = COMMANDS[name]
    # peft asks every model `is_gradient_checkpointing`, which transformers 5 deprecates with a
    # FutureWarning on each call: noise about two dependencies, nothing the user can act on.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    fn = _load(target)
    args = build_parser(fn, f"vlmtune {name}", summary).parse_intermixed_args(rest)
    try:
        values = vars(args)
        params = inspect.signature(fn).parameters.values()
        positional = [values.pop(p.name) for p in params if p.kind == p.POSITIONAL_ONLY]
        result = fn(*positional, **values)
    except VlmtuneError as e:
        print(f"{getattr(e, 'label', 'error')}: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a full disk where no command part foresaw it: one line, not a traceback
        from vlmtune.fileio import is_disk_full

        if not is_disk_full(e):
            raise
        where = f" writing {e.filename}" if getattr(e, "filename", None) else ""
        print(f"error: no space left on the device{where} during `vlmtune {name}` ({e}); free some space or "
              "write elsewhere", file=sys.stderr)
        return 2
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
