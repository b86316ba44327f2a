"""Offline synthetic datasets: rendered LaTeX formulas, or captioned scenes of coloured shapes.

Run it as `vlmtune data synth latex DIR --n 200` or `vlmtune data synth caption DIR --n 200`.

Both write `DIR/images/*.png`, `DIR/train.json` and `DIR/val.json` in the MiniCPM format of the
tutorials, with image paths relative to DIR:

    [{"id": "identity_1", "image": "images/000001.png",
      "conversations": [{"role": "user", "content": "<image>\\nPROMPT"},
                        {"role": "assistant", "content": "ANSWER"}]}, ...]

Validation images are numbered after the training ones, so ids and files never collide. Every
sample is drawn from its own random stream, seeded by (seed, split, index): the same arguments
give the same bytes, and train/val come from the same distribution through different streams.
The arguments are saved in `DIR/synth.json`; running the same command again is a no-op.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from vlmtune.data.sample import IMAGE
from vlmtune.errors import VlmtuneError
from vlmtune.fileio import removed_on_failure

LATEX_PROMPT = "你是一个LaText OCR助手,目标是读取用户输入的照片，转换成LaTex公式。"  # LaTeX OCR (Qwen2-VL), verbatim
CAPTION_PROMPT = "COCO Yes:"  # COCO captions (Qwen2-VL)
SYNTH_VERSION = 1  # bump when a generator changes its output, so old folders are not reused
SPLITS = {"train": 0, "val": 1}

# A sample is an image and the assistant's answer; one such function per kind.
SampleFn = Callable[[str, int], tuple[Image.Image, str]]


def sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The random stream of one sample: independent of n, so a larger n extends a smaller one."""
    return np.random.default_rng([seed, SPLITS[split], index])


# --- latex ---------------------------------------------------------------------------------

LETTERS = list("abcknxyz")
GREEK = [r"\alpha", r"\beta", r"\gamma", r"\theta", r"\lambda", r"\mu", r"\pi", r"\sigma", r"\omega"]
SCRIPTS = list("0123456789") + list("ijknx")  # single tokens allowed in ^{} and _{}


def _symbol(rng: np.random.Generator) -> str:
    """A letter or greek letter with an optional subscript and/or superscript: `x`, `a_{i}`, `y_{k}^{3}`."""
    base, r = str(rng.choice(LETTERS if rng.random() < 2 / 3 else GREEK)), rng.random()
    if r < 0.4:
        return base
    if r < 0.65:
        return f"{base}^{{{rng.choice(SCRIPTS)}}}"
    if r < 0.85:
        return f"{base}_{{{rng.choice(SCRIPTS)}}}"
    return f"{base}_{{{rng.choice(SCRIPTS)}}}^{{{rng.choice(SCRIPTS)}}}"


def _term(rng: np.random.Generator, depth: int = 0) -> str:
    """A symbol, a number (`12`, `3^{2}`), a coefficient (`3x^{2}`), a fraction or a square root.

    Fractions and roots hold simple terms only (depth 1), which keeps images 40-60 px high.
    """
    r = rng.random()
    if r < 0.45 or (depth > 0 and r < 0.75):
        return _symbol(rng)
    if r < 0.6 or depth > 0:
        number = str(rng.integers(1, 100))
        return f"{number}^{{{rng.integers(2, 10)}}}" if rng.random() < 0.25 else number
    if r < 0.72:
        return f"{rng.integers(2, 10)}{_symbol(rng)}"

    def inner() -> str:
        return _term(rng, depth + 1) if rng.random() < 0.7 else f"{_term(rng, depth + 1)} + {_term(rng, depth + 1)}"

    if r < 0.87:
        return rf"\frac{{{inner()}}}{{{inner()}}}"
    return rf"\sqrt{{{inner()}}}"


def random_formula(rng: np.random.Generator) -> str:
    """1-3 terms joined by `+`, `-` or (at most once) `=`, e.g. `x^{2} + \\frac{a}{b} = 3`."""
    terms = int(rng.integers(1, 4))
    out, has_equals = _term(rng), False
    for _ in range(terms - 1):
        op = str(rng.choice(["+", "-", "="]))
        if op == "=" and has_equals:
            op = "+"
        has_equals |= op == "="
        out += f" {op} {_term(rng)}"
    return out


def render_latex(formula: str, fontsize: int = 18, pad: int = 8, min_height: int = 40) -> Image.Image:
    """Black-on-white RGB image of `formula` (math mode, no `$`), cropped to the ink plus `pad`.

    Uses matplotlib's own mathtext, so no LaTeX install is needed. Heights come out at
    40-60 px for the grammar above (up to ~70 for a fraction with scripts on both sides).
    """
    # Imported here so that `synth caption` does not pay for matplotlib.
    import matplotlib
    from matplotlib.font_manager import FontProperties
    from matplotlib.mathtext import MathTextParser

    # Pin the fonts so that a user's matplotlibrc cannot change the bytes we write.
    with matplotlib.rc_context({"mathtext.fontset": "dejavusans"}):
        parsed = MathTextParser("agg").parse(f"${formula}$", dpi=100, prop=FontProperties(family="DejaVu Sans", size=fontsize))
    ink = np.asarray(parsed.image)
    rows, cols = np.nonzero(ink)
    ink = ink[rows.min(): rows.max() + 1, cols.min(): cols.max() + 1]
    height = max(min_height, ink.shape[0] + 2 * pad)
    top = (height - ink.shape[0]) // 2
    canvas = np.zeros((height, ink.shape[1] + 2 * pad), dtype=np.uint8)
    canvas[top: top + ink.shape[0], pad: pad + ink.shape[1]] = ink
    return Image.fromarray(255 - canvas, mode="L").convert("RGB")


def make_latex(out_dir: str | Path, n: int, val: int, seed: int, prompt: str | None = None) -> tuple[Path, Path]:
    """Write a synthetic LaTeX OCR dataset; see `synth_command`. Returns (train.json, val.json)."""
    args = _latex_args(n, val, seed, prompt)
    train_answers: set[str] = set()

    def sample(split: str, index: int) -> tuple[Image.Image, str]:
        rng = sample_rng(seed, split, index)
        formula = random_formula(rng)
        # Short formulas repeat often; keep them out of val so that val measures reading, not recall.
        while split == "val" and formula in train_answers:
            formula = random_formula(rng)
        if split == "train":
            train_answers.add(formula)
        return render_latex(formula), formula

    return _write_dataset(Path(out_dir), args, sample)


# --- caption -------------------------------------------------------------------------------

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (230, 200, 40)}
KINDS = ("circle", "square", "triangle")
# Half-size of a shape as a fraction of the image side, by number of shapes: room for three.
RADIUS = {1: (0.12, 0.28), 2: (0.10, 0.20), 3: (0.08, 0.16)}


@dataclass(frozen=True)
class Shape:
    kind: str  # one of KINDS
    colour: str  # one of COLOURS
    cx: int  # centre, pixels from the left
    cy: int  # centre, pixels from the top
    r: int  # half-size: circle radius, half a square side, half a triangle's base and height


def random_scene(rng: np.random.Generator, shapes: int, size: int) -> list[Shape]:
    """`shapes` distinct (colour, kind) pairs at non-overlapping places, sorted left to right."""
    lo, hi = (max(4, round(f * size)) for f in RADIUS[shapes])
    pairs = [(c, k) for c in COLOURS for k in KINDS]
    while True:  # rejection sampling; a few tries at most for the sizes allowed
        chosen = rng.choice(len(pairs), size=shapes, replace=False)
        scene: list[Shape] = []
        for i in chosen:
            colour, kind = pairs[i]
            for _ in range(100):
                r = int(rng.integers(lo, hi + 1))
                cx, cy = (int(v) for v in rng.integers(r + 2, size - r - 2, size=2, endpoint=True))
                # Bounding circles (a square's is r*sqrt(2)) stay apart, and no two centres are
                # stacked vertically, so "left to right" in the caption is never ambiguous.
                if all(np.hypot(cx - s.cx, cy - s.cy) >= 1.42 * (r + s.r) + 2 and abs(cx - s.cx) >= 0.08 * size
                       for s in scene):
                    scene.append(Shape(kind, colour, cx, cy, r))
                    break
        if len(scene) == shapes:
            return sorted(scene, key=lambda s: s.cx)


def describe(scene: list[Shape]) -> str:
    """COCO-style caption, left to right: `a red circle`, `a red circle and a blue square`."""
    parts = [f"a {s.colour} {s.kind}" for s in sorted(scene, key=lambda s: s.cx)]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def draw_scene(scene: list[Shape], size: int, rng: np.random.Generator) -> Image.Image:
    """A light, slightly tinted and noisy background with the shapes in jittered colours."""
    background = tuple(int(v) for v in rng.integers(225, 251) + rng.integers(-5, 6, size=3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    for s in scene:
        fill = tuple(int(np.clip(v + rng.integers(-15, 16), 0, 255)) for v in COLOURS[s.colour])
        box = (s.cx - s.r, s.cy - s.r, s.cx + s.r, s.cy + s.r)
        if s.kind == "circle":
            draw.ellipse(box, fill=fill)
        elif s.kind == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(s.cx, s.cy - s.r), (s.cx - s.r, s.cy + s.r), (s.cx + s.r, s.cy + s.r)], fill=fill)
    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, 3, size=(size, size, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).round().astype(np.uint8), mode="RGB")


def make_caption(out_dir: str | Path, n: int, val: int, seed: int, shapes: int = 1, size: int = 112,
                 prompt: str | None = None) -> tuple[Path, Path]:
    """Write a synthetic captioning dataset; see `synth_command`. Returns (train.json, val.json)."""
    args = _caption_args(n, val, seed, shapes, size, prompt)

    def sample(split: str, index: int) -> tuple[Image.Image, str]:
        rng = sample_rng(seed, split, index)
        scene = random_scene(rng, shapes, size)
        return draw_scene(scene, size, rng), describe(scene)

    return _write_dataset(Path(out_dir), args, sample)


# --- writing -------------------------------------------------------------------------------

def _latex_args(n: int, val: int, seed: int, prompt: str | None) -> dict:
    """The arguments that define a latex dataset, as recorded in synth.json."""
    _check_counts(n, val, seed)
    return {"kind": "latex", "n": n, "val": val, "seed": seed, "prompt": LATEX_PROMPT if prompt is None else prompt,
            "version": SYNTH_VERSION}


def _caption_args(n: int, val: int, seed: int, shapes: int, size: int, prompt: str | None) -> dict:
    """The arguments that define a caption dataset, as recorded in synth.json."""
    _check_counts(n, val, seed)
    if shapes not in RADIUS:
        raise VlmtuneError(f"--shapes must be 1, 2 or 3, got {shapes}")
    if not 32 <= size <= 1024:
        raise VlmtuneError(f"--size must be between 32 and 1024 pixels, got {size}")
    return {"kind": "caption", "n": n, "val": val, "seed": seed, "shapes": shapes, "size": size,
            "prompt": CAPTION_PROMPT if prompt is None else prompt, "version": SYNTH_VERSION}


def _check_counts(n: int, val: int, seed: int) -> None:
    if n < 1 or val < 0:
        raise VlmtuneError(f"--n must be at least 1 and --val at least 0, got n={n}, val={val}")
    if seed < 0:
        raise VlmtuneError(f"--seed must be 0 or more, got {seed}")


def _record(number: int, image: str, prompt: str, answer: str) -> dict:
    return {"id": f"identity_{number}", "image": image,
            "conversations": [{"role": "user", "content": f"{IMAGE}\n{prompt}"},
                              {"role": "assistant", "content": answer}]}


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def _already_there(out_dir: Path, args: dict) -> bool:
    """True if out_dir holds exactly this dataset; False if it is absent or empty; else raise."""
    if not out_dir.exists():
        return False
    if not out_dir.is_dir():
        raise VlmtuneError(f"{out_dir} exists and is not a folder; pass another --out")
    if not any(out_dir.iterdir()):
        return False
    try:
        recorded = json.loads((out_dir / "synth.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        recorded = None
    complete = (out_dir / "train.json").is_file() and (out_dir / "val.json").is_file()
    if recorded == args and complete:
        return True
    if isinstance(recorded, dict):
        diff = ", ".join(f"{k}={recorded.get(k)!r} (asked {v!r})" for k, v in args.items() if recorded.get(k) != v)
        diff = diff or "train.json or val.json is missing"
        what = f"it holds another synthetic dataset: {diff}"
    else:
        what = "it is not a synthetic dataset (no readable synth.json)"
    raise VlmtuneError(f"{out_dir} already exists and is not empty; {what}. "
                       "Pass a new output folder or remove this one first; nothing was written.")


def _write_dataset(out_dir: Path, args: dict, sample: SampleFn) -> tuple[Path, Path]:
    """Build the dataset in a temporary folder beside out_dir, then rename it into place.

    A crash or Ctrl-C midway leaves nothing behind: the temporary folder is removed and out_dir
    is never half-written.
    """
    n, val = args["n"], args["val"]
    paths = out_dir / "train.json", out_dir / "val.json"
    if _already_there(out_dir, args):
        return paths
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    with removed_on_failure(tmp, out_dir, f"the dataset {out_dir}"):
        (tmp / "images").mkdir()
        width = max(6, len(str(n + val)))
        records: dict[str, list[dict]] = {"train": [], "val": []}
        number = 0
        with tqdm(total=n + val, disable=n + val <= 500, desc=f"synth {args['kind']}", unit="img") as bar:
            for split, count in (("train", n), ("val", val)):
                for index in range(count):
                    number += 1
                    image, answer = sample(split, index)
                    name = f"images/{number:0{width}d}.png"
                    image.save(tmp / name, format="PNG")  # PIL writes no timestamp: same bytes each run
                    records[split].append(_record(number, name, args["prompt"], answer))
                    bar.update()
        _write_json(tmp / "train.json", records["train"])
        _write_json(tmp / "val.json", records["val"])
        _write_json(tmp / "synth.json", args)
        try:
            if out_dir.is_dir():
                out_dir.rmdir()  # empty, as checked above; rename cannot replace a folder with content
            os.rename(tmp, out_dir)
        except OSError as e:
            raise VlmtuneError(f"could not move the new dataset into {out_dir}: {e}") from e
    return paths


def synth_command(kind: Literal["latex", "caption"], *, out: str, n: int = 200, val: int = 40, seed: int = 0,
                  shapes: int = 1, size: int = 112, prompt: str | None = None) -> int:
    """Write an offline synthetic dataset: rendered LaTeX formulas or captioned shape scenes.

    Writes OUT/images/*.png, OUT/train.json and OUT/val.json in the MiniCPM format
    ({"id", "image", "conversations": [user "<image>\\nPROMPT", assistant ANSWER]}), plus
    OUT/synth.json with the arguments. The same arguments give the same bytes; rerunning them on
    the same folder does nothing; a non-empty folder holding anything else is refused.

    Args:
        kind: latex (formula images, answer = LaTeX source) or caption (shape scenes, answer =
            "a red circle", "a red circle and a blue square", ...).
        out: Output folder; must not exist, be empty, or hold this very dataset.
        n: Number of training samples.
        val: Number of validation samples (other images, same distribution).
        seed: Random seed; each sample has its own stream derived from (seed, split, index).
        shapes: caption only: shapes per image, 1-3 (1 is what a tiny model learns in minutes).
        size: caption only: image side in pixels.
        prompt: User prompt after the image placeholder; default is the tutorials' prompt
            (the Qwen2-VL LaTeX OCR prompt for latex, "COCO Yes:" for caption).
    """
    out_dir = Path(out)
    if kind == "latex":
        if (shapes, size) != (1, 112):
            raise VlmtuneError("--shapes and --size apply to `caption` only; drop them for `latex`")
        args = _latex_args(n, val, seed, prompt)
    elif kind == "caption":
        args = _caption_args(n, val, seed, shapes, size, prompt)
    else:
        raise VlmtuneError(f"unknown kind {kind!r}; choose latex or caption")
    if _already_there(out_dir, args):
        print(f"{out_dir} already holds this {kind} dataset ({n} train + {val} val); nothing to do")
        return 0
    if kind == "latex":
        make_latex(out_dir, n, val, seed, prompt)
    else:
        make_caption(out_dir, n, val, seed, shapes, size, prompt)
    print(f"wrote {n} train + {val} val {kind} samples to {out_dir} (train.json, val.json, images/)")
    return 0
