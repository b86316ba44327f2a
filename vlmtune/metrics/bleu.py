"""BLEU-4 (Papineni et al., 2002) over token lists, computed the way the COCO caption evaluation does.

Corpus BLEU sums clipped n-gram matches and n-gram counts over all samples before dividing
(micro-average), takes the geometric mean of the 1..4-gram precisions and multiplies by the
brevity penalty exp(1 - r/c) when the total hypothesis length c is below r, the sum over samples
of the reference length closest to each hypothesis (ties go to the shorter reference).
A corpus without a single matching 4-gram scores 0, as in NLTK. pycocoevalcap instead computes
each precision as (matches + 1e-15) / (count + 1e-9) and returns tiny positive numbers there
(and slightly less than 1 for a perfect corpus); elsewhere the two agree to about 1e-9.
"""

from __future__ import annotations

import math
from collections import Counter

MAX_N = 4


def ngram_counts(tokens: list[str], max_n: int = MAX_N) -> Counter:
    """Counts of every n-gram (as a tuple) of length 1..max_n."""
    return Counter(tuple(tokens[i : i + n]) for n in range(1, max_n + 1) for i in range(len(tokens) - n + 1))


def bleu_stats(
    hypothesis: list[str], references: list[list[str]], max_n: int = MAX_N
) -> tuple[int, int, list[int], list[int]]:
    """What one sample adds to corpus BLEU.

    Returns:
        (hypothesis length, closest reference length, clipped matches per n, n-gram count per n).
        A hypothesis n-gram is clipped to the most times it occurs in any single reference.
    """
    max_ref_counts: Counter = Counter()
    for reference in references:
        max_ref_counts |= ngram_counts(reference, max_n)  # | keeps the maximum count per n-gram
    matches = [0] * max_n
    for ngram, count in ngram_counts(hypothesis, max_n).items():
        matches[len(ngram) - 1] += min(count, max_ref_counts[ngram])
    totals = [max(len(hypothesis) - n + 1, 0) for n in range(1, max_n + 1)]
    closest = min((abs(len(r) - len(hypothesis)), len(r)) for r in references)[1]
    return len(hypothesis), closest, matches, totals


def corpus_bleu(hypotheses: list[list[str]], references: list[list[list[str]]], max_n: int = MAX_N) -> float:
    """Corpus BLEU-max_n in [0, 1]; references[i] holds one or more token lists for hypotheses[i]."""
    hyp_len = ref_len = 0
    matches = [0] * max_n
    totals = [0] * max_n
    for hypothesis, refs in zip(hypotheses, references, strict=True):
        h, r, m, t = bleu_stats(hypothesis, refs, max_n)
        hyp_len, ref_len = hyp_len + h, ref_len + r
        matches = [a + b for a, b in zip(matches, m)]
        totals = [a + b for a, b in zip(totals, t)]
    if min(matches) == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matches, totals)) / max_n
    return math.exp(log_precision) * _brevity_penalty(hyp_len, ref_len)


def sentence_bleu(hypothesis: list[str], references: list[list[str]], max_n: int = MAX_N) -> float:
    """BLEU of one sample, smoothed so that short answers are not scored 0 for lacking 4-grams.

    Smoothing as in Lin & Och (2004): for n >= 2, one is added to both the matches and the
    n-gram count, so "yes" against "yes" scores 1.0. Use it for per-sample diagnostics only;
    the corpus score is `corpus_bleu`, unsmoothed.
    """
    h, r, matches, totals = bleu_stats(hypothesis, references, max_n)
    if matches[0] == 0:
        return 0.0
    log_precision = math.log(matches[0] / totals[0])
    log_precision += sum(math.log((m + 1) / (t + 1)) for m, t in zip(matches[1:], totals[1:]))
    return math.exp(log_precision / max_n) * _brevity_penalty(h, r)


def _brevity_penalty(hyp_len: int, ref_len: int) -> float:
    """exp(1 - r/c) for a hypothesis shorter than its reference length r, else 1."""
    if hyp_len >= ref_len:
        return 1.0
    return math.exp(1 - ref_len / hyp_len) if hyp_len else 0.0
