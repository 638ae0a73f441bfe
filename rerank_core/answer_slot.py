"""Where the answer letter starts in the training conversation, measured against the generation prompt.

A chat template may put tokens between its generation prompt and the assistant's text (an empty
think block, whitespace) or open a block in the generation prompt that the finished turn never has
(`<think>\\n`). Logits read at the end of the generation prompt then predict that block, not a letter.
The slot found here says what to append to or cut from the generation prompt so the scored prompt
ends exactly where training puts the letter.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = [
    "GENERATION_PROMPT_TRIMMED",
    "INSERTED_BEFORE_ANSWER",
    "PROMPT_END_RETOKENIZED",
    "TEMPLATE_KWARGS_IGNORED",
    "AnswerSlot",
    "common_prefix",
    "locate_answer",
]

# Audit flags, short strings as the CLI's JSON and the app's table show them.
INSERTED_BEFORE_ANSWER = "inserted_before_answer"
GENERATION_PROMPT_TRIMMED = "generation_prompt_trimmed"
PROMPT_END_RETOKENIZED = "prompt_end_retokenized"
TEMPLATE_KWARGS_IGNORED = "template_kwargs_ignored"

Encode = Callable[[str], Sequence[int]]
Decode = Callable[[Sequence[int]], str]


def common_prefix(sequences: Sequence[Sequence[int]]) -> tuple[int, ...]:
    """The longest run of token IDs every sequence starts with (scoring shares it across a batch's prompts)."""
    # The lexicographic extremes bound the prefix: every sequence between them shares what they share, so two
    # comparisons in C replace a Python loop over every sequence.
    first, last = min(map(tuple, sequences)), max(map(tuple, sequences))
    length, limit = 0, min(len(first), len(last))
    while length < limit and first[length] == last[length]:
        length += 1
    return first[:length]


@dataclass(frozen=True)
class AnswerSlot:
    """What the scored prompt adds to (inserted) or cuts from (trimmed) the template's generation prompt."""

    inserted_text: str = ""
    inserted_ids: tuple[int, ...] = ()
    trimmed_text: str = ""
    trimmed_ids: tuple[int, ...] = ()
    template_kwargs: str = ""
    template_kwargs_ignored: bool = False

    @property
    def moves_prompt(self) -> bool:
        return bool(self.inserted_ids or self.trimmed_ids)

    @property
    def flags(self) -> tuple[str, ...]:
        """The audit flags every letter carries under this template."""
        flags = []
        if self.inserted_ids and self.trimmed_ids and self.inserted_text == self.trimmed_text:
            flags.append(PROMPT_END_RETOKENIZED)
        else:
            if self.inserted_ids:
                flags.append(INSERTED_BEFORE_ANSWER)
            if self.trimmed_ids:
                flags.append(GENERATION_PROMPT_TRIMMED)
        if self.template_kwargs_ignored:
            flags.append(TEMPLATE_KWARGS_IGNORED)
        return tuple(flags)

    def apply(self, generation: str) -> str:
        """The scored prompt's text: the generation prompt, trimmed and extended to where the letter starts."""
        if self.trimmed_text:
            generation = generation[:len(generation) - len(self.trimmed_text)]
        return generation + self.inserted_text

    def encode(self, encode: Encode, rendered: str) -> list[int]:
        """Token IDs of a scored prompt: the inserted span keeps the IDs it has in the training conversation.

        Tokenized alone, a span such as '\\n\\n' may merge into one token that training never has before a
        letter; the training conversation's own IDs are what the letter follows.
        """
        if self.inserted_ids and rendered.endswith(self.inserted_text):
            return [*encode(rendered[:len(rendered) - len(self.inserted_text)]), *self.inserted_ids]
        return list(encode(rendered))

    def to_json(self) -> dict[str, object]:
        return {"inserted_text": self.inserted_text, "inserted_ids": list(self.inserted_ids),
                "trimmed_text": self.trimmed_text, "trimmed_ids": list(self.trimmed_ids),
                "template_kwargs": self.template_kwargs, "flags": list(self.flags), "notes": self.notes()}

    def notes(self) -> list[str]:
        """Each flag in plain words: what the template does, what the scored prompt does about it, the fix."""
        notes = []
        if PROMPT_END_RETOKENIZED in self.flags:
            notes.append(
                f"the generation prompt ends with {self.trimmed_text!r}, which the tokenizer splits into "
                f"{list(self.trimmed_ids)} alone but into {list(self.inserted_ids)} when the letter follows, as "
                "in training; the scored prompt uses the training conversation's tokens, so the logits are read "
                "where the letter is emitted.")
        if INSERTED_BEFORE_ANSWER in self.flags:
            notes.append(
                f"the chat template puts {self.inserted_text!r} (token IDs {list(self.inserted_ids)}) between the "
                "generation prompt and the answer letter, so the first token after the generation prompt is "
                "not a letter. The scored prompt is extended with that span (the answer prefix): logits are "
                "read where the letter is emitted, and training puts no loss on the span. To drop the span "
                "instead, pass the template's own option if it has one (Qwen3: "
                "--template-kwargs '{\"enable_thinking\": false}').")
        if GENERATION_PROMPT_TRIMMED in self.flags:
            notes.append(
                f"the generation prompt ends with {self.trimmed_text!r} (token IDs {list(self.trimmed_ids)}), "
                "which the training conversation does not have before the answer letter (the template drops "
                "it from finished assistant turns). The scored prompt stops before it, where training puts the "
                "letter; reading after it would score the first token of that block, not a letter.")
        if self.template_kwargs_ignored:
            notes.append(
                f"template_kwargs {self.template_kwargs} do not change the rendering: the chat template does "
                "not read these names (Jinja ignores unknown variables). Check their spelling against the "
                "template.")
        return notes


def locate_answer(
    encode: Encode,
    decode: Decode,
    generation: str,
    generation_suffix: int,
    trainings: Sequence[str],
    letters: Sequence[str],
) -> AnswerSlot | None:
    """Compare the generation prompt with training conversations that differ only in the letter.

    The letter starts at the first token where the training conversations differ; what lies between
    that point and the generation prompt is the slot. `generation_suffix` is the length of the text the
    generation prompt appends; a difference reaching before it is no slot but a template mismatch, and
    None is returned so the alignment check reports it.
    """
    generation_ids = tuple(encode(generation))
    fulls = [tuple(encode(text)) for text in trainings]
    before_letter = common_prefix(fulls)
    for letter, full in zip(letters, fulls, strict=True):
        if not decode(full[len(before_letter):]).lstrip().startswith(letter):
            return None  # the letters do not start at one shared position
    shared = common_prefix([generation_ids, before_letter])
    trimmed_ids = generation_ids[len(shared):]
    inserted_ids = before_letter[len(shared):]
    if not trimmed_ids and not inserted_ids:
        return AnswerSlot()
    trimmed_text = ""
    if trimmed_ids:
        trimmed_text = decode(trimmed_ids)
        if (len(trimmed_text) > generation_suffix or not generation.endswith(trimmed_text)
                or tuple(encode(generation[:len(generation) - len(trimmed_text)])) != shared):
            return None
    return AnswerSlot(inserted_text=decode(inserted_ids), inserted_ids=inserted_ids,
                      trimmed_text=trimmed_text, trimmed_ids=trimmed_ids)
