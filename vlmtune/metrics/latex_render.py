"""Render match for formulas: do prediction and reference draw the same picture?

Two formulas match when matplotlib's mathtext draws them (as "$...$", Agg rasteriser, fixed DPI
and font size, no antialiasing) into the same binary image once each is cropped to its ink
bounding box. This forgives spellings that normalisation does not cover ("\\mathrm{d}" vs
"{\\rm d}", "x_i^2" vs "x^2_i") and stays strict about anything visible.

mathtext knows only part of LaTeX (no environments such as "\\begin{matrix}"), and its fonts lack
many characters (CJK in "\\text{...}"), which it would draw as the same placeholder box. Such a
formula has no image. A prediction without an image never matches and is counted as
unparseable; a reference without an image falls back to comparing normalised strings, so that
mathtext's gaps do not count against the model.

Cost: mathtext's pyparsing grammar dominates, ~2-3 ms for "x^2", ~10-25 ms for a formula of
30-40 tokens. References are cached across calls.
"""

from __future__ import annotations

import logging
import re
from functools import lru_cache

import numpy as np
from matplotlib.font_manager import FontProperties
from matplotlib.mathtext import MathTextParser

from vlmtune.metrics.latex import normalize_latex

DPI = 100
FONT_SIZE = 12.0  # points: at 100 dpi an "x^2" superscript is ~7 pixels tall, enough to tell 2 from 3
_PARSER = MathTextParser("agg")
_FONT = FontProperties(size=FONT_SIZE)
_UNESCAPED_DOLLAR = re.compile(r"(?<!\\)\$")
_MATHTEXT_LOG = logging.getLogger("matplotlib.mathtext")
# Formulas seen to need a glyph the fonts lack. mathtext logs that only when it first parses a
# formula and serves repeats from its own cache, so the fact is remembered here.
_MISSING_GLYPHS: set[str] = set()


class _MissingGlyphFilter(logging.Filter):
    """Notices mathtext's "does not have a glyph" warning (and keeps it out of the log)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        if "does not have a glyph" in record.getMessage():
            self.seen = True
            return False
        return True


def render(formula: str) -> np.ndarray | None:
    """Binary image (True = ink) of the formula cropped to its ink, or None if mathtext cannot
    parse it or lacks a glyph for one of its characters.

    An empty or blank formula gives an empty (0 x 0) image rather than None.
    """
    if not formula.strip():
        return np.zeros((0, 0), dtype=bool)
    if _UNESCAPED_DOLLAR.search(formula):  # would end math mode early and render something else
        return None
    missing = _MissingGlyphFilter()
    _MATHTEXT_LOG.addFilter(missing)
    try:
        parsed = _PARSER.parse(f"${formula}$", dpi=DPI, prop=_FONT, antialiased=False)
    # mathtext reports bad input as ValueError, but odd input has also raised KeyError,
    # RuntimeError and others; any failure means "cannot render", never a crashed evaluation.
    except Exception:
        return None
    finally:
        _MATHTEXT_LOG.removeFilter(missing)
    if missing.seen:
        if len(_MISSING_GLYPHS) > 100_000:  # bound the memory; mathtext's own cache holds only 50
            _MISSING_GLYPHS.clear()
        _MISSING_GLYPHS.add(formula)
    if formula in _MISSING_GLYPHS:
        return None
    ink = np.asarray(parsed.image) > 127
    rows = np.flatnonzero(ink.any(axis=1))
    cols = np.flatnonzero(ink.any(axis=0))
    if rows.size == 0:
        return np.zeros((0, 0), dtype=bool)
    # a copy, so that a cached crop does not keep the whole uncropped canvas alive
    return ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].copy()


# References repeat at every evaluation of a training run; predictions change, so only
# references are cached. Images are a few hundred bytes to a few kB each.
_render_reference = lru_cache(maxsize=50_000)(render)


def render_match(prediction: str, references: list[str]) -> tuple[bool, bool]:
    """Compare a prediction with each reference by rendering.

    Returns:
        (matches, parseable): matches is True if the prediction draws the same image as any
        reference (or, for a reference mathtext cannot draw, has the same normalised string);
        parseable is False if mathtext cannot parse the prediction.
    """
    image = render(prediction)
    for reference in references:
        expected = _render_reference(reference)
        if expected is None:
            if normalize_latex(prediction) == normalize_latex(reference):
                return True, image is not None
        elif image is not None and image.shape == expected.shape and np.array_equal(image, expected):
            return True, True
    return False, image is not None
