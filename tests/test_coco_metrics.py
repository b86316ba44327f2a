"""Caption metrics against the COCO caption evaluation itself (pycocoevalcap, whose tokenizer is
Stanford's Java PTBTokenizer): the same tokens, and BLEU-4, CIDEr-D and ROUGE-L within 1e-6 on a
fixed set of 50 images with 5 references each (tests/data/coco_captions_50.json)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from vlmtune.metrics import compute_metrics
from vlmtune.metrics.text import caption_tokens

DATA = Path(__file__).parent / "data" / "coco_captions_50.json"

needs_java = pytest.mark.skipif(shutil.which("java") is None,
                                reason="no `java` on PATH: pycocoevalcap's PTB tokenizer is a Java program "
                                       "(apt-get install default-jre-headless)")

# Captions with what PTB tokenisation treats specially; the expected tokens are the Java tokenizer's
# (checked by test_tokens_equal_the_java_tokenizer when Java is present).
HARD_CAPTIONS = {
    "A man's dog isn't running.": ["a", "man", "'s", "dog", "is", "n't", "running"],
    "They'll see we've I'm he'd you're": ["they", "'ll", "see", "we", "'ve", "i", "'m", "he", "'d", "you", "'re"],
    "I CAN'T, won't: cannot!": ["i", "ca", "n't", "wo", "n't", "can", "not"],
    "A well-known T-shirt on a 10-year-old.": ["a", "well-known", "t-shirt", "on", "a", "10-year-old"],
    "3.5 kg, 1,000 people at 5:30 p.m. in the U.S.": ["3.5", "kg", "1,000", "people", "at", "5:30", "p.m.", "in",
                                                       "the", "u.s."],
    "Mr. Smith on St. Mark's street, etc.": ["mr.", "smith", "on", "st.", "mark", "'s", "street", "etc."],
    "A dog (brown) [left] {x} and/or 24/7": ["a", "dog", "-lrb-", "brown", "-rrb-", "-lsb-", "left", "-rsb-", "-lcb-",
                                            "x", "-rcb-", "and/or", "24/7"],
    "He said \"hello\" and 'bye' -- \u201cok\u201d \u2026": ["he", "said", "hello", "and", "bye", "ok"],
    "50% off $5 #1 cats & dogs": ["50", "%", "off", "$", "5", "#", "1", "cats", "&", "dogs"],
    "o'clock O'Neil rock 'n' roll in the '90s": ["o'clock", "o'neil", "rock", "'n'", "roll", "in", "the", "'90s"],
    "The dogs' toys; a b. A c": ["the", "dogs", "toys", "a", "b", "a", "c"],
    "What?! Wow!! No. 5 and no. dogs": ["what", "?!", "wow", "!!", "no.", "5", "and", "no", "dogs"],
}


def load() -> list[dict]:
    return json.loads(DATA.read_text(encoding="utf-8"))["images"]


def java_tokens(captions: list[str]) -> list[list[str]]:
    """pycocoevalcap's own tokenisation (PTBTokenizer in Java, then its punctuation filter)."""
    try:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    except ImportError:
        pytest.fail("pycocoevalcap is not installed: .venv/bin/pip install --no-deps pycocoevalcap==1.2 "
                    "(make install does it)")
    tokenized = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(captions)})
    return [tokenized[i][0].split() for i in range(len(captions))]


@pytest.mark.parametrize("caption", HARD_CAPTIONS)
def test_caption_tokens_follow_ptb_rules(caption):
    assert caption_tokens(caption) == HARD_CAPTIONS[caption]


@needs_java
def test_tokens_equal_the_java_tokenizer():
    captions = list(HARD_CAPTIONS) + [c for image in load() for c in [*image["references"], image["candidate"]]]
    expected = java_tokens(captions)
    mismatches = [(c, caption_tokens(c), e) for c, e in zip(captions, expected) if caption_tokens(c) != e]
    assert not mismatches, "\n".join(f"{c!r}: vlmtune {mine} != java {java}" for c, mine, java in mismatches)
    assert [HARD_CAPTIONS[c] for c in HARD_CAPTIONS] == expected[:len(HARD_CAPTIONS)]


@needs_java
def test_bleu_cider_rouge_equal_pycocoevalcap_on_50_images():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    images = load()
    assert len(images) == 50 and all(len(image["references"]) == 5 for image in images)
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({im["image_id"]: [{"caption": r} for r in im["references"]] for im in images})
    res = tokenizer.tokenize({im["image_id"]: [{"caption": im["candidate"]}] for im in images})
    coco = {"bleu4": Bleu(4).compute_score(gts, res, verbose=0)[0][3], "cider": Cider().compute_score(gts, res)[0],
            "rouge_l": Rouge().compute_score(gts, res)[0]}

    ours = compute_metrics("caption", [im["candidate"] for im in images], [im["references"] for im in images])
    for name, value in coco.items():
        assert ours[name] == pytest.approx(value, abs=1e-6), name
    assert 0.5 < coco["bleu4"] < 1 and coco["cider"] > 1  # the set has real overlap, not a degenerate 0 = 0
