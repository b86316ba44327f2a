"""The COCO caption evaluation's tokenisation, in Python: Penn Treebank rules, punctuation removed.

pycocoevalcap tokenises every caption with Stanford CoreNLP 3.4.1's `PTBTokenizer` (options
`-preserveLines -lowerCase`, a Java program) and then drops the tokens in a fixed punctuation list.
`ptb_caption_tokens` gives the same tokens without Java, so vlmtune's BLEU, CIDEr-D and ROUGE-L
equal pycocoevalcap's (checked against the real pipeline in tests/test_coco_metrics.py).

How the Java tokenizer works, and how this module mirrors it: at each position every rule below is
tried and the longest match wins (ties go to the earlier rule), as in the JFlex lexer it is built
from. A few rules only apply when some text follows ("do" before "n't", "no." before a number);
that text counts towards the match length but is left for the next token. The rules were written
from the tokenizer's observed output on captions of every kind; what they give (lowercased):

- clitics split off: "don't" -> do n't, "can't" -> ca n't, "dog's" -> dog 's, "we'd've" -> we 'd 've;
  "cannot" -> can not, "gonna" -> gon na, "'tis" -> 't is;
- words with apostrophes kept whole: "o'clock", "O'Neil", "ma'am", "rock 'n' roll", "'90s";
- hyphenated words and numbers kept whole: "well-known", "t-shirt", "10-year-old", "3.5", "1,000",
  "5:30"; "and/or", "24/7", "1/2" too;
- abbreviations keep their period: "mr.", "st.", "etc.", "u.s.", "p.m.", a single letter ("a."), except
  before a word that starts a sentence ("plan B. The" -> b the); other words lose it ("dog." -> dog);
- brackets become -lrb- -rrb- -lsb- -rsb- -lcb- -rcb- and are kept: pycocoevalcap's punctuation
  list spells them in capitals, but the tokens arrive lowercased, so they never match it;
- removed: . , ; : ? ! ' ` and every kind of quote, - and dashes, ...; kept: runs like "?!" and
  "!!", and symbols: & % $ # @ / * + = < > (so "50%" -> 50 %, "$5" -> $ 5).

Known differences, which few captions meet: the Java tokenizer joins digit groups that look like
phone numbers ("555 555-1234") into one token, and it reads all captions as one file, so a
caption's last word sees the start of the next caption: a caption ending in a single letter and a
period ("... the letter B.") loses that period when the next caption starts with "A ", "The ", ...,
and one ending in "No." keeps it when the next caption starts with a digit. Here each caption is
tokenised alone (as if it were the last). Characters outside Unicode's Basic Multilingual Plane
(emoji) are dropped, as the Java tokenizer does with a warning.
"""

from __future__ import annotations

import re
from functools import lru_cache

# Letters and letters-or-digits as the Java tokenizer sees them: Python's \w also takes "½" and
# "²", which the Java tokenizer treats as symbols.
_NOT_ALNUM = "\\W_\u00b2\u00b3\u00b9\u00bc-\u00be\u2070-\u209f\u2150-\u218f\u2460-\u24ff"
_A = rf"[^{_NOT_ALNUM}\d]"
_ALNUM = rf"[^{_NOT_ALNUM}]"
_APOS = "['\u2019]"

_WORD = rf"{_A}{_ALNUM}*(?:[.!?]{_A}{_ALNUM}*)*"  # "dog", "mr.smith", "www.x.com"
_ACRO = rf"{_A}(?:\.{_A})*\."  # "a.", "u.s.", "p.m."
_ELIDED = rf"(?i:[dlo]{_APOS})"  # "o'" of "o'clock-shadow"
_NUMBER = r"[-+]?(?:\d*(?:[.,:]\d+)+|\d+)"  # "-5.5", "1,000", "5:30", ".5"

# Words that keep their period wherever they stand (case ignored). Those of the first list also
# win over a longer word by one letter: "etc.s" is etc. s, but "mr.x" stays whole.
_ABBREVIATIONS_BEFORE_LOWER = (
    "jan feb mar apr jun jul aug sep sept oct nov dec mon tue tues wed thu thurs fri "
    "ala ariz az ark calif colo conn ct dak del fla ga ill ind kan kans ky la mass md mich minn miss mo mont "
    "neb nev okla ore pa penn tenn tex va vt wash wis wisc wyo "
    "inc co cos corp pty ltd plc rt bancorp bhd assn univ intl sys tel est ext sq jr sr bros esq etc al seq "
    "bldg blvd rd"
).split()
# After these (capitalised) a single letter's period ends the sentence: "plan B. The" -> b the.
_SENTENCE_STARTS = ("A About According Additionally After An As At But Earlier He Her Here However If In It Last Many "
                    "More Mr. Ms. Now Once One Other Our She Since So Some Such That The Their Then There These They "
                    "This We What When While Yet You").split()
_ABBREVIATIONS = (
    "mr mrs ms dr drs prof profs sen sens rep reps atty lt col gen messrs gov govs adm rev maj "
    "sgt cpl pvt capt st ste ave pres lieut hon brig cmdr comdr pfc spc supt det mt ft adj adv asst assoc ens "
    "insp mlle mme msgr sfc invt elec natl mfg mtg dept v wm jos cie cf ph vs"
).split()
# Words that keep their period only before a number ("no. 5", "fig.3").
_BEFORE_NUMBER = "ca fig figs prop no nos art pp op".split()
# Contractions written as one word, and where they split.
_ASSIMILATIONS = {"cannot": 3, "gonna": 3, "gotta": 3, "wanna": 3, "lemme": 3, "gimme": 3, "'tis": 2,
                  "\u2019tis": 2, "'twas": 2, "\u2019twas": 2}
_APOSTROPHE_WORDS = "c'mon s'mores li'l ev'ry nat'l nor'easter e'er o'o somethin' dunkin' ol'".split()

_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_CURRENCY = {"\u00a3": "#", "\u20ac": "$", "\u00a2": "cents"}
_FRACTIONS = {"\u00bc": "1/4", "\u00bd": "1/2", "\u00be": "3/4", "\u2153": "1/3", "\u2154": "2/3"}
_ENTITIES = {"&amp;": "&", "&lt;": "<", "&gt;": ">", "(--)": "-lrb----rrb-"}
_QUOTE_FORMS = {"`": "`", "\u2018": "`", "\u2019": "'", "\u201c": "``", "\u201d": "''", "\u00ab": "``", "\u00bb": "''"}

# What pycocoevalcap removes after tokenising (in the forms they take here).
_DROPPED = frozenset(["''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";"])

_KEEP, _DROP, _SPLIT, _MAP, _CLITIC, _SMILEY, _QUOTES = range(7)


def _rule(pattern: str, kind: int, context: str | None = None, flags: int = re.IGNORECASE) -> tuple:
    """A lexer rule: the token's pattern, what to emit, and the text that must follow it (if any)."""
    if context is not None:
        pattern = rf"(?:{pattern})(?=(?P<ctx>{context}))"
    return re.compile(pattern, flags), kind


def _words(words) -> str:
    return "|".join(re.escape(w).replace("'", _APOS) for w in sorted(words, key=len, reverse=True))


def _starts(words) -> str:
    """The words with a capital first letter and the rest in any case ("The", "THE", not "the")."""
    return "|".join(w[0] + (f"(?i:{re.escape(w[1:])})" if len(w) > 1 else "") for w in words)


# In priority order: on equal lengths the earlier rule wins.
_RULES = [
    _rule(_words(_ASSIMILATIONS), _SPLIT),
    _rule(r"[a-z]*[a-mo-z]", _KEEP, context=rf"n{_APOS}t"),  # "do" of "don't"
    _rule(rf"n{_APOS}t", _CLITIC),
    _rule(rf"{_APOS}(?:s|m|d|re|ve|ll)(?!{_A})", _CLITIC),
    _rule(rf"{_A}+", _KEEP, context=rf"{_APOS}(?:s|m|d|re|ve|ll)(?!{_A})"),  # "they" of "they've"
    _rule(_words(_APOSTROPHE_WORDS), _KEEP),
    _rule(rf"[dlno]{_APOS}{_A}{{2,}}", _KEEP),  # "o'clock", "d'Avignon"
    _rule(rf"[A-HJ-XZ]{_APOS}{_A}{{2,}}", _KEEP, flags=0),  # "O'Neil", "B'nai"
    _rule(rf"{_A}+[aeiouyAEIOUY]{_APOS}[aeiouA-Z]{_A}*", _KEEP, flags=0),  # "ma'am", "ne'er"
    _rule(rf"{_APOS}n{_APOS}|{_APOS}(?:em|till?|cause|[2-9]0s)|[dljy]{_APOS}", _KEEP),  # "'n'", "'90s", "y'"
    _rule(rf"{_APOS}\d\d|{_APOS}n", _KEEP, context=r"\s|\Z"),  # "'10" (a year), "rock 'n roll"
    _rule(rf"(?:{_words(_ABBREVIATIONS_BEFORE_LOWER)})\.", _KEEP, context=r"[\s\S]|\Z"),
    _rule(rf"(?:{_words(_ABBREVIATIONS)})\.", _KEEP),
    _rule(rf"(?:{_words(_BEFORE_NUMBER)})\.", _KEEP, context=r"[ \t]?\d"),
    _rule(rf"(?:{_WORD}|{_ALNUM}+)\.", _KEEP, context="[,;:]"),  # a period before a comma stays
    _rule(_ACRO, _KEEP),
    _rule(rf"{_A}(?=\.)", _KEEP, flags=0, context=rf"\.\s+(?:{_starts(_SENTENCE_STARTS)})\s"),  # "B" of "B. The"
    _rule(_WORD, _KEEP),
    _rule(_NUMBER, _KEEP),
    _rule(rf"{_ALNUM}+", _KEEP),  # "2nd", "5km"
    # hyphens and underscores join: "well-known", "10-year-old", "u.s.-based", "a_b"
    _rule(rf"{_ELIDED}?{_ALNUM}(?:{_ALNUM}|[.,])*(?:[-_\u2010\u2011](?:{_A}(?:\.{_A})+\.|{_ELIDED}?{_ALNUM}+))+",
          _KEEP),
    _rule(rf"{_ALNUM}+(?:-{_A}+){{0,2}}(?:/{_ALNUM}+(?:-{_A}+){{0,2}}){{1,2}}", _KEEP),  # "and/or", "24/7"
    _rule(r"\d{1,4}[- ]\d{1,4}/\d{1,4}", _KEEP),  # "1 1/2"
    _rule(r"[A-Z]+(?:&[A-Z]+)+", _KEEP, flags=0),  # "AT&T", "Q&A" (capitals only)
    _rule(rf"{_ALNUM}[^\s\"<>|(){{}}]*@(?:[^\s\"<>|(){{}}.]+\.)*[^\s\"<>|(){{}}\[\].,;:]+", _KEEP),  # e-mail
    _rule(r"(?:https?|ftp)://[^\s<>\"]*[^\s<>\".,;:!?')\]]", _KEEP),
    _rule(rf"[@#]{_A}\w*", _KEEP),  # "@home", "#hashtag"
    _rule(r"</?[a-z!][^>\n]*>", _KEEP),  # "<unk>", "<b>"
    _rule(r"&(?:amp|lt|gt);", _MAP),
    _rule(r"&(?:quot|apos);", _DROP),
    _rule(r"&#\d+;", _KEEP),
    _rule(r"\.{3,}|\u2026", _DROP),
    _rule(r"[?!]{2,}", _KEEP),
    _rule(r"[-\u2012-\u2015]+", _DROP),  # hyphens and dashes standing alone
    _rule(r"''|[\"']", _DROP),
    _rule(r"[`\u2018\u2019\u201c\u201d\u00ab\u00bb]{1,2}", _QUOTES),  # curly quotes: two make one token
    _rule(r"\(--\)", _MAP),
    _rule(r"\*+|#+|@+|_+", _KEEP),
    _rule(r"[<>]?[:;=][-o*']?[()\[\]{}DPdpO\\@|](?![^\W_])", _SMILEY, flags=0),  # ":)" -> :-rrb-
]
# Most tokens are a plain word, maybe with a comma or a period, before a space: no rule above
# does anything else with them, except for the words these sets hold.
_PLAIN = re.compile(r"([A-Za-z]+)([.,]?)(?=\s|\Z)")
_NOT_PLAIN = frozenset(_ASSIMILATIONS)
_NOT_PLAIN_BEFORE_PERIOD = frozenset(_ABBREVIATIONS_BEFORE_LOWER + _ABBREVIATIONS + _BEFORE_NUMBER)


def _emit(text: str, kind: int, out: list[str]) -> None:
    if kind == _KEEP:
        out += text.split()  # pycocoevalcap's BLEU and CIDEr split a token like "<b a>" at its space
    elif kind == _CLITIC:
        out.append(text.replace("\u2019", "'"))
    elif kind == _MAP:
        out.append(_ENTITIES[text.lower()])
    elif kind == _QUOTES:
        out.append("".join(_QUOTE_FORMS[c] for c in text))
    elif kind == _SMILEY:
        out.append(text.replace("(", "-lrb-").replace(")", "-rrb-"))


def _single(char: str, out: list[str]) -> None:
    """A character no rule matched: one token of its own, mapped, dropped or removed."""
    if char in _BRACKETS:
        out.append(_BRACKETS[char])
    elif char in _CURRENCY or char in _FRACTIONS:
        out.append(_CURRENCY.get(char) or _FRACTIONS[char])
    elif ord(char) > 0xFFFF or not char.isprintable():
        return  # emoji and control characters: the Java tokenizer drops them
    elif char not in _DROPPED:
        out.append(char)


@lru_cache(maxsize=65536)
def ptb_caption_tokens(text: str) -> tuple[str, ...]:
    """The tokens pycocoevalcap scores `text` with: PTB-tokenised, lowercased, punctuation removed."""
    text = text.replace("\u200b", " ").replace("\ufeff", " ")
    out: list[str] = []
    pos, end = 0, len(text)
    while pos < end:
        if text[pos].isspace():
            pos += 1
            continue
        plain = _PLAIN.match(text, pos)
        if plain:
            word, mark = plain.group(1), plain.group(2)
            lower = word.lower()
            if lower not in _NOT_PLAIN and not (mark == "." and (len(word) == 1 or lower in _NOT_PLAIN_BEFORE_PERIOD)):
                out.append(word)
                pos = plain.end()
                continue
        best, best_length, best_kind = None, 0, _KEEP
        for pattern, kind in _RULES:
            m = pattern.match(text, pos)
            if m is None:
                continue
            length = (m.end("ctx") if "ctx" in pattern.groupindex else m.end()) - pos
            if m.end() > pos and length > best_length:
                best, best_length, best_kind = m, length, kind
        if best is None:
            _single(text[pos], out)
            pos += 1
            continue
        if best_kind == _SPLIT:  # "cannot": "can", and "not" is read again
            cut = _ASSIMILATIONS[best.group().lower()]
            out.append(best.group()[:cut].replace("\u2019", "'"))
            pos += cut
            continue
        _emit(best.group(), best_kind, out)
        pos = best.end()
    return tuple(t.lower() for t in out if t not in _DROPPED)
