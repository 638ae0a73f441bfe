"""Text made visible: whitespace and special tokens a reader would otherwise miss."""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["visible_text"]

_WHITESPACE = {"\n": "↵\n", "\t": "⇥", "\r": "␍"}


def visible_text(text: str, special_tokens: Iterable[str] = ()) -> str:
    """Mark newlines, tabs, trailing spaces and special tokens so two prompts that differ only there differ."""
    specials = sorted({token for token in special_tokens if token}, key=len, reverse=True)
    out: list[str] = []
    position = 0
    while position < len(text):
        special = next((token for token in specials if text.startswith(token, position)), None)
        if special is not None:
            out.append(f"⟦{special}⟧")
            position += len(special)
            continue
        char = text[position]
        if char == " " and (position + 1 == len(text) or text[position + 1] in "\n\r"):
            out.append("·")  # a space at a line end changes tokenization but is invisible
        else:
            out.append(_WHITESPACE.get(char, char))
        position += 1
    return "".join(out)
