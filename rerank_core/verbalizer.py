"""Letter → token ID resolution by three strategies, and an audit that flags every suspicious letter."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from rerank_core.alignment import align
from rerank_core.prompts import PromptPreset, answer_slot, build_prompt

__all__ = ["STRATEGIES", "LetterToken", "VerbalizerError", "probe_text", "resolve_letters"]

STRATEGIES = ("as_trained", "seed", "encode")

# Flags, short strings so the CLI's JSON and the app's table can show them as they are.
UNKNOWN = "unknown_token"
MULTI_TOKEN = "multi_token"
SHARED_ID = "shared_id"
DIFFERS = "differs_from_as_trained"
NOT_PREFIX = "template_not_prefix"


class VerbalizerError(ValueError):
    """A verbalizer strategy that cannot name a token for a letter."""


@dataclass(frozen=True)
class LetterToken:
    """One letter's token under a strategy, the step that found it, and what training would emit."""

    letter: str
    token: str
    token_id: int
    strategy: str
    step: str
    as_trained_id: int | None
    as_trained_token: str | None
    flags: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        row = asdict(self)
        row["flags"] = list(self.flags)
        return row


def probe_text(tokenizer: Any, preset: PromptPreset, count: int) -> str:
    """A neutral prompt of the preset's shape: the as-trained token depends only on the prompt's end."""
    built = build_prompt(tokenizer, preset, ["history item"], [f"item {i + 1}" for i in range(count)])
    return built.text


def _is_unknown(tokenizer: Any, token_id: int | None) -> bool:
    return token_id is None or (tokenizer.unk_token_id is not None and token_id == tokenizer.unk_token_id)


def _seed_fallback(tokenizer: Any, letter: str) -> tuple[int, str]:
    """The research code's three steps: bare letter token, letter with a space, first encoded token."""
    token_id = tokenizer.convert_tokens_to_ids(letter)
    if not _is_unknown(tokenizer, token_id):
        return token_id, f"convert_tokens_to_ids({letter!r})"
    token_id = tokenizer.convert_tokens_to_ids(" " + letter)
    if not _is_unknown(tokenizer, token_id):
        return token_id, f"convert_tokens_to_ids({' ' + letter!r})"
    return _first_encoded(tokenizer, letter), f"encode({letter!r})[0]"


def _first_encoded(tokenizer: Any, letter: str) -> int:
    ids = tokenizer.encode(letter, add_special_tokens=False)
    if not ids:
        raise VerbalizerError(f"the tokenizer encodes letter {letter!r} to no token at all")
    return ids[0]


def resolve_letters(
    tokenizer: Any,
    preset: PromptPreset,
    letters: Sequence[str],
    strategy: str = "as_trained",
    *,
    text: str | None = None,
) -> list[LetterToken]:
    """Resolve every letter once per (tokenizer, preset, count) and audit it against the as-trained token.

    `text` is the prompt whose rendering decides the as-trained tokens; a neutral probe of the
    preset's shape is used when it is not given.
    """
    if strategy not in STRATEGIES:
        raise VerbalizerError(f"verbalizer strategy {strategy!r} is not one of {', '.join(STRATEGIES)}")
    prompt_text = text if text is not None else probe_text(tokenizer, preset, len(letters))
    slot = answer_slot(tokenizer, preset)
    trained_step = ("token after the rendered prompt" if not slot.moves_prompt
                    else "token where training puts the letter (prompt moved: see the answer slot)")

    rows: list[dict[str, Any]] = []
    for letter in letters:
        alignment = align(tokenizer, preset, prompt_text, letter)
        flags: list[str] = []
        as_trained_id = None
        if alignment.is_prefix and alignment.completion_ids:
            as_trained_id = alignment.completion_ids[0]
        else:
            flags.append(NOT_PREFIX)
        if strategy == "as_trained":
            if as_trained_id is None:
                raise VerbalizerError(
                    f"letter {letter!r} has no as-trained token: " + alignment.describe(tokenizer)
                    + " Use the 'seed' or 'encode' strategy to inspect anyway.")
            token_id, step = as_trained_id, trained_step
        elif strategy == "seed":
            token_id, step = _seed_fallback(tokenizer, letter)
        else:
            token_id, step = _first_encoded(tokenizer, letter), f"encode({letter!r})[0]"
        if _is_unknown(tokenizer, token_id):
            flags.append(UNKNOWN)
        if len(tokenizer.encode(letter, add_special_tokens=False)) > 1:
            flags.append(MULTI_TOKEN)
        if as_trained_id is not None and token_id != as_trained_id:
            flags.append(DIFFERS)
        flags.extend(slot.flags)
        rows.append({
            "letter": letter, "token_id": int(token_id), "step": step, "as_trained_id": as_trained_id,
            "flags": flags})

    shared = Counter(row["token_id"] for row in rows)
    result = []
    for row in rows:
        if shared[row["token_id"]] > 1:
            row["flags"].append(SHARED_ID)
        as_trained_id = row["as_trained_id"]
        result.append(LetterToken(
            letter=row["letter"],
            token=tokenizer.convert_ids_to_tokens(row["token_id"]),
            token_id=row["token_id"],
            strategy=strategy,
            step=row["step"],
            as_trained_id=as_trained_id,
            as_trained_token=None if as_trained_id is None else tokenizer.convert_ids_to_tokens(as_trained_id),
            flags=tuple(row["flags"]),
        ))
    return result
