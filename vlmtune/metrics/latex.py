"""LaTeX tokeniser and the normalisation used for exact match, CER and BLEU on formulas."""

from __future__ import annotations

import re

# A command (backslash + letters), a control symbol (backslash + one other character, e.g. "\,",
# "\{", "\\" or the control space "\ "), or any other single non-space character.
_TOKEN = re.compile(r"\\[A-Za-z]+|\\[\s\S]|\\$|\S")
_COMMAND = re.compile(r"\\[A-Za-z]+")
_SCRIPTS = ("^", "_")

Node = str | list  # a token, or a brace group holding a list of nodes


def tokenize_latex(formula: str) -> list[str]:
    """Split a formula into tokens; whitespace between tokens is dropped.

    >>> tokenize_latex(r"\\frac{a b}{c}\\,x^{12}")
    ['\\\\frac', '{', 'a', 'b', '}', '{', 'c', '}', '\\\\,', 'x', '^', '{', '1', '2', '}']

    A control space ("\\ " or a backslash before a newline or tab) is one token, always "\\ ".
    """
    return [r"\ " if tok[0] == "\\" and tok[1:].isspace() else tok for tok in _TOKEN.findall(formula)]


def normalize_latex(formula: str) -> str:
    """Canonical form of a formula, so that spellings that mean the same compare equal.

    1. Whitespace is removed, except one space after a command name that is followed by a letter,
       which LaTeX needs to end the name: "\\alpha b" stays "\\alpha b", "x + y" becomes "x+y",
       "\\alpha 2" becomes "\\alpha2". A control space "\\ " is kept.
    2. Redundant braces are removed, innermost first. Exactly three kinds are redundant:
       - a group whose only content is another group: "{{a}}" -> "{a}", "{{a+b}}" -> "{a+b}";
       - a group holding a single token right after "^" or "_": "x^{2}" -> "x^2",
         "x_{\\alpha}" -> "x_\\alpha", "x^{{2}}" -> "x^2";
       - a group spanning the whole formula: "{x+y}" -> "x+y", "{{x}}" -> "x".
       Every other brace is kept, in particular those that delimit command arguments
       ("\\frac{ab}{c}", and also "\\sqrt{2}", which is not rewritten to "\\sqrt2"), multi-token
       scripts ("x^{12}"), empty groups ("x^{}") and groups that change spacing ("1{,}5", "{-}1").
    Formulas with unbalanced braces only get step 1.

    >>> normalize_latex(r"{ x^{ 2 } + \\alpha  b }")
    'x^2+\\\\alpha b'
    """
    tokens = tokenize_latex(formula)
    tree = _parse_groups(tokens)
    if tree is None:
        return _serialize(tokens)
    tree = _drop_redundant_braces(tree)
    while len(tree) == 1 and isinstance(tree[0], list):
        tree = tree[0]
    return _serialize(tree)


def latex_tokens(formula: str) -> list[str]:
    """Tokens of the normalised formula: what BLEU counts on for the latex task."""
    return tokenize_latex(normalize_latex(formula))


def _parse_groups(tokens: list[str]) -> list[Node] | None:
    """Nest tokens by braces ("{" and "}", not the escaped "\\{"); None if they do not balance."""
    stack: list[list[Node]] = [[]]
    for tok in tokens:
        if tok == "{":
            stack.append([])
        elif tok == "}":
            if len(stack) == 1:
                return None
            group = stack.pop()
            stack[-1].append(group)
        else:
            stack[-1].append(tok)
    return stack[0] if len(stack) == 1 else None


def _drop_redundant_braces(nodes: list[Node]) -> list[Node]:
    out: list[Node] = []
    for node in nodes:
        if isinstance(node, list):
            node = _drop_redundant_braces(node)
            while len(node) == 1 and isinstance(node[0], list):  # {{a}} -> {a}
                node = node[0]
            if len(node) == 1 and out and out[-1] in _SCRIPTS:  # x^{2} -> x^2
                node = node[0]
        out.append(node)
    return out


def _serialize(nodes: list[Node]) -> str:
    parts: list[str] = []
    for node in nodes:
        text = "{" + _serialize(node) + "}" if isinstance(node, list) else node
        # "\alpha" followed by "b" must stay apart or it would read as the command "\alphab".
        if parts and _COMMAND.fullmatch(parts[-1]) and text[:1].isalpha():
            parts.append(" ")
        parts.append(text)
    return "".join(parts)
