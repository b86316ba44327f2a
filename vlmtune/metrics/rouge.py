"""ROUGE-L (Lin, 2004) with beta = 1.2, as computed by the COCO caption evaluation (pycocoevalcap)."""

from __future__ import annotations

BETA = 1.2


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two token lists."""
    if len(a) < len(b):
        a, b = b, a
    row = [0] * (len(b) + 1)  # LCS of the a-prefix so far with every prefix of b
    for x in a:
        diagonal = 0  # the previous row's value one column to the left
        for j, y in enumerate(b, start=1):
            above = row[j]
            row[j] = diagonal + 1 if x == y else max(above, row[j - 1])
            diagonal = above
    return row[-1]


def rouge_l(candidate: list[str], references: list[list[str]], beta: float = BETA) -> float:
    """ROUGE-L F-score of one candidate against its references, in [0, 1].

    As in pycocoevalcap, precision (LCS / len(candidate)) and recall (LCS / len(reference)) are
    each maximised over the references *separately*, then combined:
    F = (1 + beta^2) P R / (R + beta^2 P); beta > 1 weighs recall more. An empty candidate scores
    1.0 if some reference is empty too, else 0.0.
    """
    if not candidate:
        return 1.0 if any(not r for r in references) else 0.0
    lcs = [lcs_length(candidate, r) for r in references]
    precision = max(n / len(candidate) for n in lcs)
    recall = max((n / len(r) for n, r in zip(lcs, references) if r), default=0.0)
    if precision == 0 or recall == 0:
        return 0.0
    return (1 + beta**2) * precision * recall / (recall + beta**2 * precision)
