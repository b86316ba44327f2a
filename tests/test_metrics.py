"""Metrics against values computed by hand (derivations in the comments) or published elsewhere."""

import math

import numpy as np
import pytest

from vlmtune.errors import ConfigError
from vlmtune.metrics import CORPUS_METRICS, SAMPLE_METRICS, TASKS, compute_metrics, primary_metric, sample_scores
from vlmtune.metrics.bleu import bleu_stats, corpus_bleu, sentence_bleu
from vlmtune.metrics.cider import cider_d
from vlmtune.metrics.latex import latex_tokens, normalize_latex, tokenize_latex
from vlmtune.metrics.latex_render import render, render_match
from vlmtune.metrics.rouge import lcs_length, rouge_l
from vlmtune.metrics.text import caption_tokens, cer, edit_distance, levenshtein, normalize_text, word_tokens


def toks(*sentences: str) -> list[list[str]]:
    return [s.split() for s in sentences]


# --- edit distances -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "a, b, expected",
    [
        ("kitten", "sitting", 3),  # k->s, e->i, +g
        ("flaw", "lawn", 2),  # -f, +n
        ("abc", "abc", 0),
        ("", "abc", 3),
        ("abc", "", 3),
        ("", "", 0),
        ("ab", "ba", 2),  # no transpositions in plain Levenshtein
        (["\\frac", "a"], ["\\frac", "b", "a"], 1),  # token lists work too
    ],
)
def test_levenshtein(a, b, expected):
    assert levenshtein(a, b) == expected
    assert levenshtein(b, a) == expected


def test_levenshtein_matches_the_textbook_recurrence_on_longer_strings():
    # The numpy row trick (insertions via a running minimum) must agree with the plain O(nm) DP.
    rng = np.random.default_rng(0)
    for _ in range(30):
        a = "".join(rng.choice(list("abc"), rng.integers(0, 40)))
        b = "".join(rng.choice(list("abc"), rng.integers(0, 40)))
        prev = list(range(len(b) + 1))
        for i, x in enumerate(a, 1):
            cur = [i]
            for j, y in enumerate(b, 1):
                cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
            prev = cur
        assert levenshtein(a, b) == prev[-1]


def test_cer_and_edit_distance_by_hand():
    assert cer("kitten", "sitting") == pytest.approx(3 / 7)  # 3 edits / 7 reference chars
    assert edit_distance("kitten", "sitting") == pytest.approx(3 / 7)  # / max(6, 7)
    assert cer("abc", "ab") == pytest.approx(1 / 2)  # 1 edit / 2 reference chars
    assert edit_distance("abc", "ab") == pytest.approx(1 / 3)  # / max(3, 2)
    assert cer("abcdef", "ab") == pytest.approx(2.0)  # CER is not capped at 1
    assert cer("", "") == 0.0 and edit_distance("", "") == 0.0
    assert cer("x", "") == 1.0 and edit_distance("x", "") == 1.0
    assert cer("", "ab") == 1.0 and edit_distance("", "ab") == 1.0


def test_ocr_corpus_cer_is_micro_averaged_and_edit_distance_macro():
    metrics = compute_metrics("ocr", ["kitten", "ab", "same  text"], ["sitting", "abcd", "same text"])
    assert metrics["cer"] == pytest.approx((3 + 2 + 0) / (7 + 4 + 9))
    assert metrics["edit_distance"] == pytest.approx((3 / 7 + 2 / 4 + 0) / 3)
    assert metrics["exact_match"] == pytest.approx(1 / 3)  # whitespace runs collapse, case counts


def test_ocr_sample_uses_the_best_reference():
    scores = sample_scores("ocr", "kitten", ["mitten", "sitting"])
    assert scores["cer"] == pytest.approx(1 / 6)
    assert scores["edit_distance"] == pytest.approx(1 / 6)
    assert scores["exact_match"] == 0.0


def test_text_tokenisers():
    assert normalize_text("  a\tb \n c ") == "a b c"
    assert word_tokens("It's 3.5 kg, 重量") == ["It", "'", "s", "3", ".", "5", "kg", ",", "重", "量"]
    assert caption_tokens("A man, riding a well-known HORSE.") == ["a", "man", "riding", "a", "well-known", "horse"]


# --- LaTeX normalisation --------------------------------------------------------------------------


def test_tokenize_latex():
    assert tokenize_latex(r"\frac{a b}{c}\,x^{12}") == [
        "\\frac", "{", "a", "b", "}", "{", "c", "}", "\\,", "x", "^", "{", "1", "2", "}"
    ]
    assert tokenize_latex(r"\alpha\beta \\ \{x\} \ y") == ["\\alpha", "\\beta", "\\\\", "\\{", "x", "\\}", "\\ ", "y"]
    assert tokenize_latex("a\\") == ["a", "\\"]


@pytest.mark.parametrize(
    "formula, expected",
    [
        ("x^{2}", "x^2"),
        ("x _ { i } ^ { 2 }", "x_i^2"),
        ("x^{\\alpha}", "x^\\alpha"),
        ("x^{{2}}", "x^2"),  # doubled braces first, then script braces
        ("{{a}}+b", "{a}+b"),  # doubled braces collapse to one pair, which is not redundant here
        ("{x + y}", "x+y"),  # braces around the whole formula
        ("{{x}}", "x"),
        ("\\alpha  b", "\\alpha b"),  # the space ends the command name
        ("\\alpha 2", "\\alpha2"),
        ("\\frac { a b } { c }", "\\frac{ab}{c}"),  # command arguments keep their braces
        ("\\sqrt{2}", "\\sqrt{2}"),  # ... even single-token ones
        ("x^{12}", "x^{12}"),  # a multi-token script keeps its braces
        ("1{,}5", "1{,}5"),  # braces that change spacing are kept
        ("x^{}", "x^{}"),
        ("\\frac{a}{", "\\frac{a}{"),  # unbalanced: whitespace removal only
    ],
)
def test_normalize_latex(formula, expected):
    assert normalize_latex(formula) == expected


@pytest.mark.parametrize(
    "a, b",
    [("\\alpha b", "\\alphab"), ("x^{12}", "x^12"), ("\\frac{ab}{c}", "\\frac{a}{bc}"), ("1{,}5", "1,5"), ("x^2", "x^3")],
)
def test_normalize_latex_keeps_different_formulas_apart(a, b):
    assert normalize_latex(a) != normalize_latex(b)


def test_latex_tokens_are_taken_after_normalisation():
    assert latex_tokens("x^{2} + \\alpha") == ["x", "^", "2", "+", "\\alpha"]


# --- BLEU -----------------------------------------------------------------------------------------

CAT_REFS = toks("the cat is on the mat", "there is a cat on the mat")


def test_bleu_by_hand():
    # hypothesis "a cat is on the mat" against CAT_REFS:
    #   1-grams a cat is on the mat            6/6 (a, is: ref2; the: ref1 has 2)
    #   2-grams a_cat cat_is is_on on_the the_mat     5/5 (a_cat from ref2, the rest ref1)
    #   3-grams a_cat_is* cat_is_on is_on_the on_the_mat  3/4
    #   4-grams a_cat_is_on* cat_is_on_the is_on_the_mat  2/3
    #   length 6, closest reference length 6 -> BP 1
    #   BLEU-4 = (1 * 1 * 3/4 * 2/3) ** (1/4) = 0.5 ** 0.25
    hyp = "a cat is on the mat".split()
    assert bleu_stats(hyp, CAT_REFS) == (6, 6, [6, 5, 3, 2], [6, 5, 4, 3])
    assert corpus_bleu([hyp], [CAT_REFS]) == pytest.approx(0.5**0.25)

    # Adding "dogs run" vs "two dogs run fast": 2/2 unigrams, 1/1 bigram, no 3- or 4-grams.
    # Corpus precisions 8/8, 6/6, 3/4, 2/3 (summed, not averaged per sentence); c = 8,
    # r = 6 + 4 = 10, so BP = exp(1 - 10/8). The second sentence alone would score 0.
    corpus = corpus_bleu([hyp, ["dogs", "run"]], [CAT_REFS, toks("two dogs run fast")])
    assert corpus == pytest.approx(0.5**0.25 * math.exp(-0.25))


def test_bleu_clipping_and_closest_reference_length():
    # The BLEU paper's (Papineni et al. 2002, sec. 2.1) example: "the" x7 is credited at most
    # twice, the most it occurs in one reference; modified unigram precision 2/7.
    _, _, matches, totals = bleu_stats(["the"] * 7, toks("the cat is on the mat", "there is a cat on the mat"))
    assert (matches[0], totals[0]) == (2, 7)
    # Reference lengths 4 and 6 are equally close to 5: the shorter one counts (as in COCO/NLTK).
    assert bleu_stats(list("abcde"), [list("abcd"), list("abcdef")])[1] == 4
    # Closest, not shortest: lengths 2 and 6 for a 6-token hypothesis give r = 6 and BP 1.
    assert bleu_stats(list("abcdef"), [list("ab"), list("abcdef")])[1] == 6


def test_bleu_matches_published_nltk_examples():
    # Doctests of nltk.translate.bleu_score (corpus_bleu: 0.5920..., sentence_bleu of hyp1:
    # 0.5045...), the standard unsmoothed BLEU-4 with closest reference length.
    hyp1 = "It is a guide to action which ensures that the military always obeys the commands of the party".split()
    refs1 = toks(
        "It is a guide to action that ensures that the military will forever heed Party commands",
        "It is the guiding principle which guarantees the military forces always being under the command of the Party",
        "It is the practical guide for the army always to heed the directions of the party",
    )
    hyp2 = "he read the book because he was interested in world history".split()
    refs2 = toks("he was interested in world history because he read the book")
    assert corpus_bleu([hyp1, hyp2], [refs1, refs2]) == pytest.approx(0.5920778868801042, abs=1e-12)
    assert corpus_bleu([hyp1], [refs1]) == pytest.approx(0.5045666840058485, abs=1e-12)


def test_bleu_edge_cases():
    assert corpus_bleu([["a", "b", "c", "d"]], [[["a", "b", "c", "d"]]]) == 1.0
    assert corpus_bleu([["a", "b", "c"]], [[["a", "b", "c"]]]) == 0.0  # no 4-gram at all: unsmoothed BLEU-4 is 0
    assert corpus_bleu([[]], [[["a"]]]) == 0.0
    # Sentence BLEU adds one to matches and counts for n >= 2 (Lin & Och 2004):
    # 1, (5+1)/(5+1), (3+1)/(4+1), (2+1)/(3+1) -> (0.8 * 0.75) ** (1/4)
    assert sentence_bleu("a cat is on the mat".split(), CAT_REFS) == pytest.approx(0.6**0.25)
    assert sentence_bleu(["yes"], [["yes"]]) == 1.0
    assert sentence_bleu(["no"], [["yes"]]) == 0.0


# --- ROUGE-L --------------------------------------------------------------------------------------


def test_rouge_l_by_hand():
    assert lcs_length("a cat is on the mat".split(), "there is a cat on the mat".split()) == 5  # a cat on the mat
    # identical -> 1
    assert rouge_l("a cat is on the mat".split(), CAT_REFS[:1] + [["a", "cat", "is", "on", "the", "mat"]]) == 1.0
    # P = 2/2, R = 2/4; F = (1 + 1.44) * 1 * 0.5 / (0.5 + 1.44 * 1) = 1.22 / 1.94 (beta 1 would give 2/3)
    assert rouge_l(["a", "cat"], toks("a black cat sat")) == pytest.approx(1.22 / 1.94)
    # "a cat is on the mat" vs CAT_REFS: LCS 5 with each; P = max(5/6, 5/6), R = max(5/6, 5/7) -> F = 5/6
    assert rouge_l("a cat is on the mat".split(), CAT_REFS) == pytest.approx(5 / 6)
    # As in pycocoevalcap, P and R are maximised over references separately: P = 1 comes from the
    # long reference, R = 1 from the short one, so F = 1 although neither reference alone gives it.
    assert rouge_l(list("abcd"), [list("ab"), list("abcdefgh")]) == pytest.approx(1.0)
    assert rouge_l(["zebra"], CAT_REFS) == 0.0


# --- CIDEr-D --------------------------------------------------------------------------------------

# Two images, two references each. N = 2, so idf = log 2 - log df: "a" is in both images'
# references (df 2, idf 0); every other n-gram has df 1 (idf L = log 2), and a candidate n-gram no
# reference has gets df 1 as well. Write e = exp(-1 / 72), the length penalty for a 1-token gap.
CIDER_CANDIDATES = toks("a black cat", "a dog barks")
CIDER_REFERENCES = [toks("a black cat", "a cat"), toks("a white dog", "a dog")]


def test_cider_d_by_hand():
    e = math.exp(-1 / (2 * 6.0**2))
    # Image 1, "a black cat". Vectors: 1-grams {a: 0, black: L, cat: L} (norm L*sqrt2), 2-grams
    # {a_black: L, black_cat: L} (norm L*sqrt2), 3-gram {a_black_cat: L}, no 4-grams.
    #   vs "a black cat" (identical): n = 1, 2, 3 each give 1, n = 4 gives 0.
    #   vs "a cat": 1-grams {a: 0, cat: L}: cat gives L*L / (L*sqrt2 * L) = 1/sqrt2; no shared
    #     2-gram; length 3 vs 2 -> times e.
    #   score = 10 * mean_n(sum over refs) / 2 refs = 10 * ((3 + e/sqrt2) / 4) / 2
    image1 = 10 * ((3 + e / math.sqrt(2)) / 4) / 2
    # Image 2, "a dog barks": 1-grams {a: 0, dog: L, barks: L}, 2-grams {a_dog: L, dog_barks: L}.
    #   vs "a white dog": only "dog" shared: L*L / (L*sqrt2 * L*sqrt2) = 1/2; same length.
    #   vs "a dog": 1-grams 1/sqrt2 (dog), 2-grams 1/sqrt2 (a_dog), times e.
    #   score = 10 * ((1/2 + 2e/sqrt2) / 4) / 2
    image2 = 10 * ((0.5 + math.sqrt(2) * e) / 4) / 2
    score, per_image = cider_d(CIDER_CANDIDATES, CIDER_REFERENCES)
    assert per_image == pytest.approx([image1, image2])  # 4.62169..., 2.36838...
    assert score == pytest.approx((image1 + image2) / 2)


def test_cider_d_clips_repeated_words_and_scores_nonsense_zero():
    # "cat cat cat": the 1-gram weight 3L is clipped to the reference's L, so the repeated word
    # earns less than the plain cosine would; "zebra" shares nothing and scores 0.
    _, scores = cider_d(toks("cat cat cat", "zebra"), CIDER_REFERENCES)
    # vs "a black cat": min(3L, L) * L / (3L * L*sqrt2) = 1/(3 sqrt2), length 3 = 3;
    # vs "a cat": min(3L, L) * L / (3L * L) = 1/3, length gap 1 -> e. 2-grams "cat cat" share nothing.
    e = math.exp(-1 / 72)
    assert scores[0] == pytest.approx(10 * ((1 / (3 * math.sqrt(2)) + e / 3) / 4) / 2)
    assert scores[1] == 0.0


def test_cider_d_rewards_a_candidate_equal_to_every_reference():
    refs = [toks("a man rides a brown horse", "a man rides a brown horse"), toks("two dogs play in the snow")]
    _, scores = cider_d(toks("a man rides a brown horse", "a cat sleeps"), refs)
    assert scores[0] == pytest.approx(10.0)  # cosine 1 for every n, no length penalty
    assert scores[1] == 0.0
    # With a single image every idf is log 1 - log 1 = 0, so CIDEr is 0 (as in pycocoevalcap).
    assert cider_d(toks("a b c d"), [toks("a b c d")])[0] == 0.0


# --- render match ---------------------------------------------------------------------------------


def test_render_match():
    assert render("x^{2}") is not None and render("x^{2}").any()
    assert render_match("x^{2}", ["x^2"]) == (True, True)
    assert render_match("x^2", ["x^3"]) == (False, True)
    assert render_match("\\mathrm{d}x", ["{\\rm d}x"]) == (True, True)  # same picture, different spelling
    assert render_match("\\frac{a}{", ["\\frac{a}{b}"]) == (False, False)
    # mathtext cannot draw environments: for such a reference the normalised strings decide.
    assert render_match("\\begin{matrix} a \\end{matrix}", ["\\begin{matrix}a\\end{matrix}"]) == (True, False)
    assert render_match("", [""]) == (True, True)
    # mathtext's fonts have no CJK glyphs and would draw every such character as the same box;
    # repeats must agree although mathtext only warns on the first parse.
    assert render("\\mathrm{中}") is None and render("\\mathrm{中}") is None
    assert render_match("\\mathrm{中}", ["\\mathrm{国}"]) == (False, False)
    # An unescaped "$" would leave math mode ("$x$+$y$" is two formulas around text): unparseable.
    assert render("x$+$y") is None and render("\\$5") is not None


# --- task API -------------------------------------------------------------------------------------


def test_latex_task_end_to_end():
    predictions = ["x^{2}", "x^3", "\\frac{a}{", "\\alpha  b"]
    references = ["x^2", "x^2", "\\frac{a}{b}", ["\\beta", "\\alpha b"]]
    metrics = compute_metrics("latex", predictions, references)
    assert metrics["exact_match"] == pytest.approx(2 / 4)
    assert metrics["render_match"] == pytest.approx(2 / 4)
    assert metrics["unparseable"] == pytest.approx(1 / 4)
    # normalised: "x^2"/"x^2" 0 edits of 3, "x^3"/"x^2" 1 of 3, "\frac{a}{"/"\frac{a}{b}" 2 of 11,
    # "\alpha b"/"\alpha b" 0 of 8
    assert metrics["cer"] == pytest.approx(3 / 25)
    scores = sample_scores("latex", "x^3", "x^2")
    assert scores["render_match"] == 0.0 and scores["unparseable"] == 0.0
    assert scores["cer"] == pytest.approx(1 / 3)


def test_caption_task_tokenises_before_scoring():
    predictions = ["A black cat.", "a dog, barks!"]
    references = [["a black cat", "A cat"], ["a white dog", "a dog"]]
    metrics = compute_metrics("caption", predictions, references)
    assert metrics["cider"] == pytest.approx(cider_d(CIDER_CANDIDATES, CIDER_REFERENCES)[0])
    assert metrics["exact_match"] == pytest.approx(1 / 2)
    assert sample_scores("caption", "A black cat.", references[0])["rouge_l"] == 1.0


def test_generic_exact_match_ignores_case_and_whitespace():
    metrics = compute_metrics("generic", ["Yes ", "two", "Red  car"], ["yes", "2", ["blue car", "red car"]])
    assert metrics["exact_match"] == pytest.approx(2 / 3)
    assert sample_scores("generic", "YES", "yes")["exact_match"] == 1.0


@pytest.mark.parametrize("task", TASKS)
def test_metric_keys_per_task(task):
    metrics = compute_metrics(task, ["a b", "c"], ["a b", ["d", "c"]])
    assert tuple(metrics) == CORPUS_METRICS[task]
    assert all(type(v) is float for v in metrics.values())
    scores = sample_scores(task, "a b", "a b")
    assert tuple(scores) == SAMPLE_METRICS[task]
    assert all(type(v) is float for v in scores.values())
    name, _ = primary_metric(task)
    assert name in metrics


def test_primary_metrics():
    assert primary_metric("latex") == ("exact_match", True)
    assert primary_metric("caption") == ("cider", True)
    assert primary_metric("ocr") == ("cer", False)


def test_bad_arguments_say_what_is_wrong():
    with pytest.raises(ConfigError, match="unknown task 'vqa'"):
        compute_metrics("vqa", ["a"], ["a"])
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        compute_metrics("generic", ["a", "b"], ["a"])
    with pytest.raises(ValueError, match="sample 0"):
        compute_metrics("generic", ["a"], [[]])
    with pytest.raises(ValueError, match="no predictions"):
        compute_metrics("generic", [], [])
