"""Task metrics for evaluation: exact match, CER, edit distance, BLEU-4, CIDEr-D, ROUGE-L and
LaTeX render match, written here without pycocoevalcap or nltk.

    from vlmtune.metrics import compute_metrics, sample_scores, primary_metric
    compute_metrics("caption", ["a dog runs"], [["a dog is running", "a brown dog runs"]])

What each task reports and how is documented in `vlmtune.metrics.tasks`.
"""

from vlmtune.metrics.tasks import (CORPUS_METRICS, SAMPLE_METRICS, TASKS, compute_metrics, lower_is_better,
                                   primary_metric, sample_scores)

__all__ = ["TASKS", "CORPUS_METRICS", "SAMPLE_METRICS", "compute_metrics", "sample_scores", "primary_metric", "lower_is_better"]
