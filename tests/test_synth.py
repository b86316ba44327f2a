"""`vlmtune data synth`: files, exact format, determinism, captions that match the pixels,
refusal and no-op on existing folders, and nothing half-written when generation fails."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlmtune import cli
from vlmtune.data import synth
from vlmtune.data.synth import (CAPTION_PROMPT, COLOURS, LATEX_PROMPT, Shape, describe, make_caption, make_latex,
                                random_formula, random_scene, sample_rng, synth_command)
from vlmtune.errors import VlmtuneError


def tree(root: Path) -> dict[str, bytes]:
    """Every file under root, by relative path, with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def check_format(out: Path, n: int, val: int, prompt: str) -> tuple[list[dict], list[dict]]:
    """Assert the exact MiniCPM seed format and return the (train, val) records."""
    train = json.loads((out / "train.json").read_text(encoding="utf-8"))
    valid = json.loads((out / "val.json").read_text(encoding="utf-8"))
    assert len(train) == n and len(valid) == val
    for number, rec in enumerate(train + valid, start=1):
        assert list(rec) == ["id", "image", "conversations"]
        assert rec["id"] == f"identity_{number}"
        assert rec["image"] == f"images/{number:06d}.png"
        user, assistant = rec["conversations"]
        assert user == {"role": "user", "content": f"<image>\n{prompt}"}
        assert list(assistant) == ["role", "content"] and assistant["role"] == "assistant"
        assert isinstance(assistant["content"], str) and assistant["content"]
    images = sorted(p.name for p in (out / "images").iterdir())
    assert images == sorted(Path(r["image"]).name for r in train + valid)  # one file each, none shared
    assert sorted(p.name for p in out.iterdir()) == ["images", "synth.json", "train.json", "val.json"]
    return train, valid


# Which palette colour a pixel is, the background counting as "background".
def colour_at(image: np.ndarray, x: float, y: float) -> str:
    pixel = image[int(round(y)), int(round(x))].astype(float)
    if pixel.min() > 200:
        return "background"
    return min(COLOURS, key=lambda c: np.linalg.norm(pixel - np.array(COLOURS[c])))


def kind_at(image: np.ndarray, s: Shape) -> str:
    """Tell the shapes apart by two probes: a square fills its top-left corner, a triangle (apex up)
    its bottom-left, a circle neither."""
    if colour_at(image, s.cx - 0.8 * s.r, s.cy - 0.8 * s.r) == s.colour:
        return "square"
    if colour_at(image, s.cx - 0.8 * s.r, s.cy + 0.9 * s.r) == s.colour:
        return "triangle"
    return "circle"


def test_caption_files_format_and_sizes(tmp_path):
    out = tmp_path / "cap"
    assert make_caption(out, n=6, val=3, seed=0, shapes=2, size=64) == (out / "train.json", out / "val.json")
    train, valid = check_format(out, 6, 3, CAPTION_PROMPT)
    for rec in train + valid:
        with Image.open(out / rec["image"]) as im:
            assert im.format == "PNG" and im.mode == "RGB" and im.size == (64, 64)
    # The record holds exactly the seed's fields, and the arguments are kept beside it.
    assert json.loads((out / "synth.json").read_text()) == {
        "kind": "caption", "n": 6, "val": 3, "seed": 0, "shapes": 2, "size": 64, "prompt": CAPTION_PROMPT,
        "version": synth.SYNTH_VERSION}


def test_one_shape_captions_use_the_small_vocabulary(tmp_path):
    make_caption(tmp_path / "cap", n=30, val=5, seed=3, size=48)
    train, valid = check_format(tmp_path / "cap", 30, 5, CAPTION_PROMPT)
    answers = [r["conversations"][1]["content"] for r in train + valid]
    assert all(re.fullmatch(r"a (red|green|blue|yellow) (circle|square|triangle)", a) for a in answers), answers
    assert len(set(answers)) > 5  # not one answer for everything


def test_describe_orders_left_to_right():
    red, blue, green = Shape("circle", "red", 10, 50, 5), Shape("square", "blue", 40, 10, 5), Shape("triangle", "green", 80, 80, 5)
    assert describe([red]) == "a red circle"
    assert describe([blue, red]) == "a red circle and a blue square"
    assert describe([green, red, blue]) == "a red circle, a blue square and a green triangle"


@pytest.mark.parametrize("shapes", [1, 3])
def test_captions_match_the_drawn_pixels(tmp_path, shapes):
    out = tmp_path / "cap"
    make_caption(out, n=12, val=4, seed=7, shapes=shapes, size=112)
    train, valid = check_format(out, 12, 4, CAPTION_PROMPT)
    seen_kinds = set()
    for split, records in (("train", train), ("val", valid)):
        for index, rec in enumerate(records):
            scene = random_scene(sample_rng(7, split, index), shapes, 112)
            assert rec["conversations"][1]["content"] == describe(scene)
            assert [s.cx for s in scene] == sorted(s.cx for s in scene)
            image = np.asarray(Image.open(out / rec["image"]).convert("RGB"))
            for s in scene:
                assert colour_at(image, s.cx, s.cy) == s.colour, (rec["image"], s)
                assert kind_at(image, s) == s.kind, (rec["image"], s)
                seen_kinds.add(s.kind)
            assert colour_at(image, 0, 0) == "background"
    assert seen_kinds == {"circle", "square", "triangle"}


def test_train_and_val_images_differ(tmp_path):
    make_caption(tmp_path / "cap", n=10, val=10, seed=0, size=48)
    files = tree(tmp_path / "cap" / "images")
    assert len(set(files.values())) == 20


def test_latex_files_format_and_answers_parse(tmp_path):
    from matplotlib.mathtext import MathTextParser

    out = tmp_path / "tex"
    make_latex(out, n=8, val=4, seed=0)
    train, valid = check_format(out, 8, 4, LATEX_PROMPT)
    parser = MathTextParser("path")
    for rec in train + valid:
        parser.parse(f"${rec['conversations'][1]['content']}$")  # raises ValueError on bad LaTeX
        with Image.open(out / rec["image"]) as im:
            assert im.mode == "RGB" and 40 <= im.size[1] <= 80 and im.size[0] >= 20
            pixels = np.asarray(im)
        assert pixels[0, 0].tolist() == [255, 255, 255] and pixels.min() < 100  # white page, dark ink


def test_latex_val_never_repeats_a_train_formula(tmp_path, monkeypatch):
    # Short formulas such as `x` recur; with 300 train samples several val draws hit one of them.
    monkeypatch.setattr(synth, "render_latex", lambda formula: Image.new("RGB", (8, 8), "white"))
    make_latex(tmp_path / "tex", n=300, val=100, seed=0)
    train, valid = check_format(tmp_path / "tex", 300, 100, LATEX_PROMPT)
    train_answers = {r["conversations"][1]["content"] for r in train}
    assert not train_answers & {r["conversations"][1]["content"] for r in valid}


def test_latex_grammar_covers_its_constructs_and_always_parses():
    from matplotlib.mathtext import MathTextParser

    parser = MathTextParser("path")
    formulas = [random_formula(sample_rng(1, "train", i)) for i in range(120)]
    for f in formulas:
        parser.parse(f"${f}$")
    text = " ".join(formulas)
    for construct in [r"\frac{", r"\sqrt{", "^{", "_{", r"\alpha", " + ", " - ", " = "]:
        assert construct in text, construct
    assert all(f.count(" = ") <= 1 for f in formulas)
    assert len(set(formulas)) > 100


@pytest.mark.parametrize("kind, extra", [("latex", []), ("caption", ["--shapes", "2", "--size", "48"])])
def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path, kind, extra):
    base = ["data", "synth", kind, "--n", "4", "--val", "2"] + extra
    assert cli.main(base + ["--out", str(tmp_path / "a")]) == 0
    assert cli.main(base + ["--out", str(tmp_path / "b")]) == 0
    assert cli.main(base + ["--out", str(tmp_path / "c"), "--seed", "1"]) == 0
    a, b, c = (tree(tmp_path / x) for x in "abc")
    assert a == b
    assert a.keys() == c.keys() and a["train.json"] != c["train.json"]


def test_refuses_a_non_empty_folder_that_holds_something_else(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(VlmtuneError, match="not empty.*no readable synth.json"):
        synth_command("caption", out=str(out), n=2, val=1, size=48)
    assert tree(out) == {"notes.txt": b"mine"}

    other = tmp_path / "other"
    synth_command("caption", out=str(other), n=2, val=1, size=48)
    before = tree(other)
    with pytest.raises(VlmtuneError, match=r"n=2 \(asked 3\)"):
        synth_command("caption", out=str(other), n=3, val=1, size=48)
    assert tree(other) == before
    # Through the CLI the refusal is one line on stderr and exit code 2.
    assert cli.main(["data", "synth", "latex", "--out", str(other)]) == 2
    assert "error:" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "out"]  # no temp folder left


def test_empty_existing_folder_is_used(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    assert synth_command("caption", out=str(out), n=2, val=1, size=48) == 0
    check_format(out, 2, 1, CAPTION_PROMPT)


def test_repeat_is_a_no_op(tmp_path, capsys, monkeypatch):
    out = tmp_path / "tex"
    assert synth_command("latex", out=str(out), n=3, val=1) == 0
    assert "wrote 3 train + 1 val latex samples" in capsys.readouterr().out
    before = tree(out)
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    monkeypatch.setattr(synth, "render_latex", lambda *a, **k: pytest.fail("should not render again"))
    assert synth_command("latex", out=str(out), n=3, val=1) == 0
    assert "already holds this latex dataset" in capsys.readouterr().out
    assert make_latex(out, n=3, val=1, seed=0) == (out / "train.json", out / "val.json")
    assert tree(out) == before and {p: p.stat().st_mtime_ns for p in out.rglob("*")} == mtimes


@pytest.mark.parametrize("kind, renderer", [("latex", "render_latex"), ("caption", "draw_scene")])
def test_failure_midway_leaves_nothing(tmp_path, monkeypatch, kind, renderer):
    real, calls = getattr(synth, renderer), []

    def third_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("renderer broke")
        return real(*args, **kwargs)

    monkeypatch.setattr(synth, renderer, third_fails)
    out = tmp_path / "ds"
    with pytest.raises(RuntimeError, match="renderer broke"):
        synth_command(kind, out=str(out), n=5, val=2)
    assert len(calls) == 3
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_progress_bar_only_for_large_runs(tmp_path, monkeypatch):
    shown = []
    real = synth.tqdm
    monkeypatch.setattr(synth, "tqdm", lambda *a, **k: shown.append(not k["disable"]) or real(*a, **k))
    # A blank image keeps the 501-image run cheap; only the bar is under test here.
    monkeypatch.setattr(synth, "draw_scene", lambda scene, size, rng: Image.new("RGB", (8, 8)))
    make_caption(tmp_path / "small", n=10, val=0, seed=0, size=32)
    make_caption(tmp_path / "large", n=501, val=0, seed=0, size=32)
    assert shown == [False, True]


@pytest.mark.parametrize("kwargs, message", [
    ({"kind": "caption", "n": 0}, "--n must be at least 1"),
    ({"kind": "caption", "val": -1}, "--val at least 0"),
    ({"kind": "caption", "seed": -2}, "--seed must be 0 or more"),
    ({"kind": "caption", "shapes": 4}, "--shapes must be 1, 2 or 3"),
    ({"kind": "caption", "size": 16}, "--size must be between"),
    ({"kind": "latex", "shapes": 2}, "apply to `caption` only"),
])
def test_bad_arguments_are_user_errors(tmp_path, kwargs, message):
    with pytest.raises(VlmtuneError, match=re.escape(message)):
        synth_command(out=str(tmp_path / "x"), **kwargs)
    assert list(tmp_path.iterdir()) == []
