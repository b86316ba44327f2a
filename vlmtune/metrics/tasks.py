"""Which metrics each task reports, and how they are aggregated over an evaluation set.

Metrics per task (all floats; "fraction" means in [0, 1]):

ocr, latex (strings normalised first: `normalize_text` for ocr, `normalize_latex` for latex)
    exact_match    fraction of predictions equal to a reference
    cer            character error rate: sum of Levenshtein distances / sum of reference lengths
                   (micro-average, like jiwer); per sample the reference with the lowest rate
                   is used. Lower is better; can exceed 1
    edit_distance  mean over samples of Levenshtein / max(len(prediction), len(reference)),
                   0 when both are empty, minimum over references. Lower is better
    bleu4          corpus BLEU-4 (see `bleu.corpus_bleu`) on `word_tokens` for ocr,
                   on `latex_tokens` (commands as one token, other characters one each) for latex
latex only
    render_match   fraction of predictions that mathtext draws identically to a reference
                   (see `latex_render`)
    unparseable    fraction of predictions mathtext cannot parse, or cannot draw for lack of a
                   glyph (these never match)
caption (strings tokenised by `caption_tokens` as the COCO caption evaluation does: its PTB
         tokenizer's rules, lowercase, punctuation removed; scores equal pycocoevalcap's)
    bleu4          corpus BLEU-4 with COCO's closest-reference brevity penalty
    cider          CIDEr-D as in pycocoevalcap, in [0, 10] (papers print x100)
    rouge_l        mean over samples of ROUGE-L F (beta 1.2) against the sample's references
    exact_match    fraction of predictions whose tokens equal those of a reference
generic (answers lowercased, whitespace collapsed)
    exact_match    fraction of predictions equal to a reference
    bleu4          corpus BLEU-4 on `word_tokens`

`sample_scores` gives the per-sample counterparts that need no corpus statistics: exact_match
(0 or 1), cer, edit_distance, render_match and unparseable (0 or 1), rouge_l, and bleu4 as a
smoothed sentence BLEU (`bleu.sentence_bleu`). No per-sample CIDEr: its idf needs the corpus.
"""

from __future__ import annotations

from vlmtune.errors import ConfigError
from vlmtune.metrics.bleu import corpus_bleu, sentence_bleu
from vlmtune.metrics.cider import cider_d
from vlmtune.metrics.latex import latex_tokens, normalize_latex
from vlmtune.metrics.latex_render import render_match
from vlmtune.metrics.rouge import rouge_l
from vlmtune.metrics.text import caption_tokens, levenshtein, normalize_answer, normalize_text, word_tokens

TASKS = ("ocr", "latex", "caption", "generic")


def lower_is_better(metric: str) -> bool:
    """True for error-like metrics (CER, edit distance, unparseable fraction, losses)."""
    return metric.removeprefix("val_") in {"cer", "wer", "edit_distance", "unparseable", "perplexity"} or \
        metric.endswith("loss")

CORPUS_METRICS: dict[str, tuple[str, ...]] = {
    "ocr": ("exact_match", "cer", "edit_distance", "bleu4"),
    "latex": ("exact_match", "cer", "edit_distance", "bleu4", "render_match", "unparseable"),
    "caption": ("bleu4", "cider", "rouge_l", "exact_match"),
    "generic": ("exact_match", "bleu4"),
}
SAMPLE_METRICS: dict[str, tuple[str, ...]] = {
    "ocr": ("exact_match", "cer", "edit_distance", "bleu4"),
    "latex": ("exact_match", "cer", "edit_distance", "bleu4", "render_match", "unparseable"),
    "caption": ("exact_match", "bleu4", "rouge_l"),
    "generic": ("exact_match", "bleu4"),
}
_PRIMARY = {
    "ocr": ("cer", False),
    "latex": ("exact_match", True),
    "caption": ("cider", True),
    "generic": ("exact_match", True),
}


def primary_metric(task: str) -> tuple[str, bool]:
    """The metric that decides which checkpoint is better, and whether higher is better."""
    return _PRIMARY[_check_task(task)]


def compute_metrics(task: str, predictions: list[str], references: list[str] | list[list[str]]) -> dict[str, float]:
    """Corpus-level metrics of `predictions` for `task`, keys as in `CORPUS_METRICS[task]`.

    Args:
        task: one of TASKS.
        predictions: one generated string per sample.
        references: per sample, one reference string or a list of acceptable ones.

    Raises:
        ConfigError: unknown task.
        ValueError: no samples, lengths differ, or a sample has no reference.
    """
    _check_task(task)
    refs = _reference_lists(predictions, references)
    if not predictions:
        raise ValueError(f"compute_metrics({task!r}) got no predictions; evaluate at least one sample")
    if task in ("ocr", "latex"):
        return _transcription_metrics(task, predictions, refs)
    if task == "caption":
        cands = [caption_tokens(p) for p in predictions]
        ref_tokens = [[caption_tokens(r) for r in rs] for rs in refs]
        return {
            "bleu4": corpus_bleu(cands, ref_tokens),
            "cider": cider_d(cands, ref_tokens)[0],
            "rouge_l": _mean(rouge_l(c, rs) for c, rs in zip(cands, ref_tokens)),
            "exact_match": _mean(c in rs for c, rs in zip(cands, ref_tokens)),
        }
    answers = [normalize_answer(p) for p in predictions]
    ref_answers = [[normalize_answer(r) for r in rs] for rs in refs]
    return {
        "exact_match": _mean(a in rs for a, rs in zip(answers, ref_answers)),
        "bleu4": corpus_bleu([word_tokens(a) for a in answers], [[word_tokens(r) for r in rs] for rs in ref_answers]),
    }


def sample_scores(task: str, prediction: str, reference: str | list[str]) -> dict[str, float]:
    """Scores of one sample for the per-sample JSONL output, keys as in `SAMPLE_METRICS[task]`."""
    _check_task(task)
    refs = _reference_lists([prediction], [reference])[0]
    if task in ("ocr", "latex"):
        normalize, tokens = _TRANSCRIPTION[task]
        pred = normalize(prediction)
        norm_refs = [normalize(r) for r in refs]
        exact, edits, ref_chars, distance = _transcription_sample(pred, norm_refs)
        scores = {
            "exact_match": float(exact),
            "cer": _error_rate(edits, ref_chars),
            "edit_distance": distance,
            "bleu4": sentence_bleu(tokens(pred), [tokens(r) for r in norm_refs]),
        }
        if task == "latex":
            matches, parseable = render_match(prediction, refs)
            scores["render_match"] = float(matches)
            scores["unparseable"] = float(not parseable)
        return scores
    if task == "caption":
        cand = caption_tokens(prediction)
        ref_tokens = [caption_tokens(r) for r in refs]
        return {
            "exact_match": float(cand in ref_tokens),
            "bleu4": sentence_bleu(cand, ref_tokens),
            "rouge_l": rouge_l(cand, ref_tokens),
        }
    answer = normalize_answer(prediction)
    ref_answers = [normalize_answer(r) for r in refs]
    return {
        "exact_match": float(answer in ref_answers),
        "bleu4": sentence_bleu(word_tokens(answer), [word_tokens(r) for r in ref_answers]),
    }


# normaliser, and tokeniser of the normalised string for BLEU
_TRANSCRIPTION = {
    "ocr": (normalize_text, word_tokens),
    "latex": (normalize_latex, latex_tokens),
}


def _transcription_metrics(task: str, predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    normalize, tokens = _TRANSCRIPTION[task]
    exact = edits = ref_chars = 0
    distances = []
    pred_tokens, ref_tokens = [], []
    for prediction, refs in zip(predictions, references):
        pred = normalize(prediction)
        norm_refs = [normalize(r) for r in refs]
        sample_exact, sample_edits, sample_chars, distance = _transcription_sample(pred, norm_refs)
        exact += sample_exact
        edits += sample_edits
        ref_chars += sample_chars
        distances.append(distance)
        pred_tokens.append(tokens(pred))
        ref_tokens.append([tokens(r) for r in norm_refs])
    metrics = {
        "exact_match": exact / len(predictions),
        "cer": _error_rate(edits, ref_chars),
        "edit_distance": _mean(distances),
        "bleu4": corpus_bleu(pred_tokens, ref_tokens),
    }
    if task == "latex":
        results = [render_match(p, rs) for p, rs in zip(predictions, references)]
        metrics["render_match"] = _mean(m for m, _ in results)
        metrics["unparseable"] = _mean(not ok for _, ok in results)
    return metrics


def _transcription_sample(pred: str, refs: list[str]) -> tuple[bool, int, int, float]:
    """(exact, edits, reference length, normalised edit distance) of normalised strings; CER's
    edits and length come from the reference with the lowest error rate."""
    distances = [levenshtein(pred, r) for r in refs]
    edits, chars = min(zip(distances, (len(r) for r in refs)), key=lambda dc: _error_rate(*dc))
    normalised = min(d / max(len(pred), len(r)) if (pred or r) else 0.0 for d, r in zip(distances, refs))
    return pred in refs, edits, chars, normalised


def _error_rate(edits: int, ref_chars: int) -> float:
    # an empty reference: anything predicted is all wrong, nothing predicted is all right
    if ref_chars == 0:
        return 0.0 if edits == 0 else 1.0
    return edits / ref_chars


def _mean(values) -> float:
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else 0.0


def _check_task(task: str) -> str:
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    return task


def _reference_lists(predictions: list[str], references: list[str] | list[list[str]]) -> list[list[str]]:
    """Every sample's references as a non-empty list of strings."""
    if len(predictions) != len(references):
        raise ValueError(
            f"{len(predictions)} predictions but {len(references)} references; "
            "pass one reference (or list of references) per prediction"
        )
    lists = []
    for i, refs in enumerate(references):
        refs = [refs] if isinstance(refs, str) else list(refs)
        if not refs or not all(isinstance(r, str) for r in refs):
            raise ValueError(f"sample {i}: references must be a string or a non-empty list of strings, got {refs!r}")
        lists.append(refs)
    return lists
