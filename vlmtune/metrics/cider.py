"""CIDEr-D (Vedantam et al., 2015) as computed by the COCO caption evaluation (pycocoevalcap).

For every n in 1..4 a caption becomes a tf-idf vector over its n-grams: the weight of n-gram g is
count(g) * (log N - log max(1, df(g))), where N is the number of images in the corpus and df(g)
the number of images whose references (any of them) contain g. The idf therefore comes from the
references of the evaluated corpus itself: with a single image every weight is 0, and so is CIDEr.

For a candidate c and a reference r of the same image, per n:
    sim_n = sum_g min(c_g, r_g) * r_g / (|c| * |r|) * exp(-(len(c) - len(r))^2 / (2 * sigma^2))
with sigma = 6; the min() is the "-D" clipping that stops repeating a rare word from paying.
The image's score is 10 * mean over n of (sum over its references of sim_n) / number of references,
and CIDEr-D is the mean over images. Scores lie in [0, 10]; papers usually print them x100
(a "CIDEr of 120" is 1.2 here).
"""

from __future__ import annotations

import math
from collections import Counter

from vlmtune.metrics.bleu import ngram_counts

MAX_N = 4
SIGMA = 6.0


def cider_d(
    candidates: list[list[str]], references: list[list[list[str]]], sigma: float = SIGMA,
    corpus: list[list[list[str]]] | None = None,
) -> tuple[float, list[float]]:
    """CIDEr-D of token-list candidates; references[i] holds the token lists for candidates[i].

    Args:
        corpus: the reference sets (one per image) the idf comes from; None: `references`, as
            the COCO evaluation does. Self-critical training scores a few sampled captions at a
            time against the training set's idf.

    Returns:
        (corpus score, per-image scores).
    """
    ref_counts = [[ngram_counts(r, MAX_N) for r in refs] for refs in references]
    doc_freq: Counter = Counter()
    idf_counts = ref_counts if corpus is None else [[ngram_counts(r, MAX_N) for r in refs] for refs in corpus]
    for refs in idf_counts:
        doc_freq.update(set().union(*refs))
    log_n = math.log(len(idf_counts)) if idf_counts else 0.0

    def tfidf(counts: Counter) -> tuple[list[dict], list[float]]:
        vectors: list[dict] = [{} for _ in range(MAX_N)]
        for ngram, count in counts.items():
            # an n-gram no reference contains gets df 1, i.e. the largest idf, log N
            vectors[len(ngram) - 1][ngram] = count * (log_n - math.log(max(1.0, doc_freq[ngram])))
        norms = [math.sqrt(sum(w * w for w in v.values())) for v in vectors]
        return vectors, norms

    scores = []
    for candidate, refs, counts in zip(candidates, references, ref_counts, strict=True):
        cand_vec, cand_norm = tfidf(ngram_counts(candidate, MAX_N))
        total = [0.0] * MAX_N
        for ref, ref_count in zip(refs, counts):
            ref_vec, ref_norm = tfidf(ref_count)
            # pycocoevalcap measures length in bigrams (len - 1); the difference is the same
            # whenever both vectors are non-empty, the only case where it matters.
            penalty = math.exp(-((len(candidate) - len(ref)) ** 2) / (2 * sigma**2))
            for n in range(MAX_N):
                if cand_norm[n] == 0 or ref_norm[n] == 0:
                    continue
                dot = sum(min(w, ref_vec[n].get(g, 0.0)) * ref_vec[n].get(g, 0.0) for g, w in cand_vec[n].items())
                total[n] += dot / (cand_norm[n] * ref_norm[n]) * penalty
        scores.append(10.0 * sum(total) / MAX_N / len(refs))
    return (sum(scores) / len(scores) if scores else 0.0), scores
