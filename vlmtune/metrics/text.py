"""Plain-text building blocks: normalisation, tokenisers, Levenshtein distance, CER.

Every function here works on one prediction/reference pair; the corpus-level aggregation lives in
`vlmtune.metrics.tasks`.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Sequence

import numpy as np

from vlmtune.metrics.ptb import ptb_caption_tokens

_WHITESPACE = re.compile(r"\s+")
# CJK ideographs, kana and hangul are written without spaces, so each character is a word.
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
_WORD = re.compile(rf"[{_CJK}]|[^\W{_CJK}]+|[^\w\s]")


def normalize_text(text: str) -> str:
    """Collapse every run of whitespace (spaces, tabs, newlines) into one space and strip the ends.

    Case and punctuation are kept: for OCR they are part of what the model must read.
    """
    return _WHITESPACE.sub(" ", text).strip()


def normalize_answer(text: str) -> str:
    """`normalize_text` plus lowercasing: the form in which generic VQA answers are compared."""
    return normalize_text(text).lower()


def word_tokens(text: str) -> list[str]:
    """Split text into words for BLEU: runs of letters/digits, each punctuation mark on its own,
    and each CJK character on its own (those scripts have no spaces between words).

    >>> word_tokens("It's 3.5 kg, 重量")
    ['It', "'", 's', '3', '.', '5', 'kg', ',', '重', '量']
    """
    return _WORD.findall(text)


def caption_tokens(text: str) -> list[str]:
    """Tokenise a caption as the COCO caption evaluation (pycocoevalcap) does.

    That evaluation runs Stanford's Penn Treebank tokenizer (Java) with lowercasing, then drops
    punctuation tokens; `vlmtune.metrics.ptb` does the same in Python, so BLEU, CIDEr-D and
    ROUGE-L on these tokens equal pycocoevalcap's. Clitics are split off ("don't" -> do n't,
    "dog's" -> dog 's), hyphenated words and numbers stay whole, abbreviations keep their period,
    and brackets become -lrb- / -rrb- tokens, as they do there.

    >>> caption_tokens("A man's well-known horse (3.5 years old) doesn't run.")
    ['a', 'man', "'s", 'well-known', 'horse', '-lrb-', '3.5', 'years', 'old', '-rrb-', 'does', "n't", 'run']
    """
    return list(ptb_caption_tokens(text))


def levenshtein(a: Sequence[Hashable], b: Sequence[Hashable]) -> int:
    """Edit distance (insertions, deletions, substitutions, each costing 1) between two sequences.

    Works on strings (character level) and on token lists alike. The dynamic programme keeps one
    numpy row over the longer sequence, so a 2,000-character page costs milliseconds, not seconds.
    """
    if len(a) > len(b):
        a, b = b, a
    if not a:
        return len(b)
    ids: dict[Hashable, int] = {}
    a_ids = [ids.setdefault(x, len(ids)) for x in a]
    b_ids = np.array([ids.setdefault(x, len(ids)) for x in b])
    steps = np.arange(len(b) + 1)
    row = steps.copy()  # distances from a[:0] to every prefix of b
    for i, x in enumerate(a_ids, start=1):
        new = np.empty_like(row)
        new[0] = i
        # substitution (or match) from the diagonal, deletion from the row above
        np.minimum(row[:-1] + (b_ids != x), row[1:] + 1, out=new[1:])
        # insertions chain along the row: new[j] = min over k <= j of new[k] + (j - k)
        row = np.minimum.accumulate(new - steps) + steps
    return int(row[-1])


def cer(prediction: str, reference: str) -> float:
    """Character error rate: levenshtein(prediction, reference) / len(reference).

    Can exceed 1 when the prediction is much longer than the reference. With an empty reference
    the rate is 0.0 for an empty prediction and 1.0 for anything else.
    """
    if not reference:
        return 0.0 if not prediction else 1.0
    return levenshtein(prediction, reference) / len(reference)


def edit_distance(prediction: str, reference: str) -> float:
    """Normalised edit distance in [0, 1]: levenshtein / max(len(prediction), len(reference)),
    0.0 when both are empty."""
    longest = max(len(prediction), len(reference))
    return levenshtein(prediction, reference) / longest if longest else 0.0
