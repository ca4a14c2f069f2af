"""What dedupe compares: a record's text, its exact normal form and key, its code-aware tokens.

Exact duplicates share a normal form: for an exercise, the AST dump of its code (prompt +
solution), blind to whitespace, comments, quoting and redundant parentheses but not to the
docstring's wording; for a textbook section, its text with whitespace collapsed. Parsing is
most of the stage's cost, so only exercises sharing a screen key (which AST-equal code always
shares) are parsed.

Near duplicates are judged on tokens of a regex tokeniser that keeps identifiers, operators
and literals as they are (nothing lowercased, no punctuation stripped, no numbers zeroed: in
code these carry the meaning).
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import re
import unicodedata

# Python source: whitespace and comments match outside the one capture group, so findall yields ''
# for them (dropped later, in numpy); every other match is one token, kept verbatim.
_CODE_TOKEN = re.compile(
    r"""\s+|\#[^\n]*
    |(
      (?:[rRbBuUfF]{1,2}(?=["']))?(?:"{3}[\s\S]*?"{3}|'{3}[\s\S]*?'{3}|"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
     |\d(?:[eE][-+]?\d|[\w.])*|\.\d(?:[eE][-+]?\d|[\w.])*
     |\w+
     |\*\*=?|//=?|>>=?|<<=?|->|:=|\.\.\.|[-+*/%@&|^=<>!]=
     |\S
    )""",
    re.VERBOSE,
)
# Textbook sections are prose with code: a '#' starts a markdown heading, an apostrophe is no
# string quote, so words and single punctuation marks, case kept.
_TEXT_TOKEN = re.compile(r"\w+|[^\w\s]")


def record_text(kind: str, parsed: dict) -> str:
    """The part of a record that duplicates are judged on: an exercise's code, a section's text."""
    if kind == "exercise":
        return parsed["prompt"] + "\n" + parsed["solution"]
    return parsed["text"]


def normal_form(kind: str, text: str) -> tuple[str, bool]:
    """(the exact-duplicate normal form, whether it is an AST dump).

    Code that does not parse falls back to its token stream, which is still blind to
    whitespace and comments."""
    if kind == "textbook":
        return " ".join(text.split()), True
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return "tokens:" + "\x00".join(tokenize(kind, text)), False
    _clean_docstrings(tree)
    return ast.dump(tree), True


_DEFS = (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def _clean_docstrings(node: ast.Module | ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) -> None:
    """Docstrings as inspect.cleandoc leaves them: their indentation is layout, not wording.

    Only definitions are visited (not every node): a full ast.walk would cost as much as the parse."""
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        body[0].value.value = inspect.cleandoc(body[0].value.value)
    for child in body:
        if isinstance(child, _DEFS):
            _clean_docstrings(child)


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def exact_key(kind: str, text: str) -> tuple[bytes, bool]:
    """(16-byte hash of the normal form, whether the code parsed)."""
    form, parsed = normal_form(kind, text)
    return _digest(form), parsed


# Tokens that AST-equal code may have or lack: parentheses, commas, colons, semicolons, continuations.
_LAYOUT = frozenset(["(", ")", ",", ";", ":", "\\"])
_STRING, _NUMBER = "\x01", "\x02"


def screen_key(kind: str, tokens: list[str], text: str) -> bytes:
    """A key that AST-equal code always shares, ~15x cheaper than the AST: exercises whose screen
    key is unique cannot have an exact duplicate, so only the others are parsed.

    From the tokens, drop layout tokens, turn every string literal (any quoting, prefix,
    implicit concatenation, docstring indentation) and number (0x10, 16, 1_6) into one mark,
    spell `elif` as `else if`, and NFKC-normalise identifiers as the parser does. Different
    code may share a screen key (the AST then tells); AST-equal code cannot differ in it."""
    if kind == "textbook":
        return exact_key(kind, text)[0]
    out: list[str] = []
    for t in tokens:
        if not t or t in _LAYOUT:
            continue
        head = t[0]
        if head in "\"'" or t[-1] in "\"'":  # a string literal (only they end with a quote)
            if out and out[-1] == _STRING:
                continue
            t = _STRING
        elif head.isdigit() or (head == "." and len(t) > 1):
            t = _NUMBER
        elif t == "elif":
            out.append("else")
            t = "if"
        out.append(t)
    skeleton = "\x00".join(out)
    if not skeleton.isascii():
        skeleton = unicodedata.normalize("NFKC", skeleton)
    return _digest("screen:" + skeleton)


def raw_tokens(kind: str, text: str) -> list[str]:
    """Tokens, with '' for skipped whitespace and comments; NUL separates tokens in minhash's batches."""
    if "\x00" in text:
        text = text.replace("\x00", "\ufffd")
    return (_CODE_TOKEN if kind == "exercise" else _TEXT_TOKEN).findall(text)


def tokenize(kind: str, text: str) -> list[str]:
    """Code-aware tokens: identifiers, keywords, operators and literals verbatim."""
    return [t for t in raw_tokens(kind, text) if t]
