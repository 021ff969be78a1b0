"""Syntax colours for .nest source over the lark grammar's own tokens, one anchor per line."""

from __future__ import annotations

from html import escape

from lark.exceptions import LarkError

from ..language.parser import _parser

PUNCT = {"LBRACE", "RBRACE", "LPAR", "RPAR", "LSQB", "RSQB", "COMMA", "SEMICOLON", "EQUAL"}


def _classes(text: str) -> list[tuple[str, str]]:
    """(css class, text) pieces covering `text`; a text the lexer rejects falls back to plain."""
    try:
        tokens = list(_parser().lex(text, dont_ignore=True))
    except LarkError:
        return [("", text)]
    pieces: list[tuple[str, str]] = []
    pos = 0
    previous = ""
    for i, tok in enumerate(tokens):
        start = tok.start_pos or 0
        if start > pos:
            pieces.append(("", text[pos:start]))
        kind = tok.type
        value = str(tok)
        if kind == "COMMENT":
            cls = "c"
        elif kind == "WS":
            cls = ""
        elif kind == "NUMBER":
            cls = "n"
        elif kind == "STRING":
            cls = "s"
        elif kind == "NAME":
            nxt = next((t for t in tokens[i + 1 :] if t.type != "WS"), None)
            if previous in ("LEVEL", "SYSTEM", "FRAGMENT", "IN"):
                cls = "lv"
            elif nxt is not None and nxt.type == "LPAR":
                cls = "f"
            else:
                cls = "v"
        elif kind in PUNCT:
            cls = "p"
        elif value.isidentifier():
            cls = "k"
        else:
            cls = "o"
        pieces.append((cls, value))
        pos = start + len(value)
        if kind != "WS":
            previous = kind
    if pos < len(text):
        pieces.append(("", text[pos:]))
    return pieces


def highlight_lines(text: str) -> list[str]:
    """HTML for each line of `text`, with spans for token classes (spans never cross a line)."""
    lines: list[str] = [""]
    for cls, piece in _classes(text):
        for j, part in enumerate(piece.split("\n")):
            if j > 0:
                lines.append("")
            if part:
                lines[-1] += f'<span class="{cls}">{escape(part)}</span>' if cls else escape(part)
    if text.endswith("\n"):
        lines.pop()
    return lines
