"""Template consistency without a model: is the inference prompt a token prefix of the training conversation,
and which token does the answer letter become."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rerank_core.alignment import align
from rerank_core.answer_slot import AnswerSlot
from rerank_core.prompts import (
    PromptPreset,
    answer_slot,
    letters_for,
    render_chat,
    render_generation_prompt,
    render_inference,
    render_training,
)
from rerank_core.verbalizer import LetterToken, probe_text, resolve_letters

# Tokens shown on each side of a template divergence: enough to see the block that differs.
_WINDOW = 6


__all__ = ["TemplateConsistency", "TemplateProblem", "template_consistency"]

@dataclass(frozen=True)
class TemplateProblem:
    """One thing wrong (error) or worth knowing (warning) about how a preset renders, in plain words."""

    severity: str
    kind: str
    message: str


@dataclass(frozen=True)
class TemplateConsistency:
    """Inference vs training rendering of one prompt: prefix, divergence, loss tokens, the answer token."""

    preset: str
    chat: bool
    letter: str
    prompt_ids: tuple[int, ...]
    full_ids: tuple[int, ...]
    diverge_at: int | None
    generation_prompt: str | None  # what add_generation_prompt appends (chat presets only)
    inference_window: tuple[tuple[int, int, str], ...]  # (index, token id, token) around the divergence
    training_window: tuple[tuple[int, int, str], ...]
    loss_tokens: tuple[tuple[int, int, str], ...]  # the tokens after the prompt: training keeps loss on them
    answer_token: tuple[int, int, str] | None  # the token the answer letter becomes in training
    letter_tokens: tuple[LetterToken, ...]  # every letter, seed strategy, audited against as-trained
    problems: tuple[TemplateProblem, ...]
    # What the scored prompt adds to or cuts from the generation prompt to end where the letter starts.
    answer_slot: AnswerSlot = field(default_factory=AnswerSlot)

    @property
    def is_prefix(self) -> bool:
        return self.diverge_at is None

    @property
    def ok(self) -> bool:
        return not any(problem.severity == "error" for problem in self.problems)

    @property
    def explanation(self) -> str:
        """A status line, then every problem in plain words."""
        if self.answer_token is not None:
            head = (f"preset {self.preset!r}: the inference prompt ({len(self.prompt_ids)} tokens) is a "
                    f"token prefix of the training conversation; training keeps loss on "
                    f"{len(self.loss_tokens)} token(s) after it, the first being {self.answer_token[2]!r} "
                    f"({self.answer_token[1]}) for the answer letter {self.letter!r}.")
        else:
            head = (f"preset {self.preset!r}: the inference prompt is NOT a token prefix of the training "
                    f"conversation (first difference at token {self.diverge_at}).")
        return "\n".join([head, *(f"{problem.severity}: {problem.message}" for problem in self.problems)])

    def to_json(self) -> dict[str, Any]:
        def tokens(rows: Sequence[tuple[int, int, str]]) -> list[dict[str, Any]]:
            return [{"index": index, "token_id": token_id, "token": token} for index, token_id, token in rows]

        return {
            "preset": self.preset, "chat": self.chat, "letter": self.letter, "ok": self.ok,
            "is_prefix": self.is_prefix, "prompt_tokens": len(self.prompt_ids),
            "full_tokens": len(self.full_ids), "diverge_at": self.diverge_at,
            "generation_prompt": self.generation_prompt, "inference_window": tokens(self.inference_window),
            "training_window": tokens(self.training_window),
            "loss_tokens": tokens(self.loss_tokens),
            "answer_token": None if self.answer_token is None else tokens([self.answer_token])[0],
            "letters": [token.to_json() for token in self.letter_tokens],
            "problems": [{"severity": problem.severity, "kind": problem.kind, "message": problem.message}
                         for problem in self.problems],
            "answer_slot": self.answer_slot.to_json(),
            "explanation": self.explanation,
        }


def _token_rows(tokenizer: Any, ids: Sequence[int], start: int,
                stop: int) -> tuple[tuple[int, int, str], ...]:
    return tuple((index, int(ids[index]), str(tokenizer.convert_ids_to_tokens(int(ids[index]))))
                 for index in range(max(0, start), min(len(ids), stop)))


def _generation_prompt(tokenizer: Any, preset: PromptPreset, text: str) -> str | None:
    """What add_generation_prompt appends after the user turn; None for text presets."""
    if not preset.chat:
        return None
    inference = render_generation_prompt(tokenizer, preset, text)
    plain = render_chat(tokenizer, preset, [{"role": "user", "content": text}], False)
    return inference[len(plain):] if inference.startswith(plain) else None


def _mismatch_problem(tokenizer: Any, preset: PromptPreset, text: str, letter: str, diverge_at: int,
                      prompt_ids: Sequence[int], full_ids: Sequence[int]) -> TemplateProblem:
    """Say why the inference prompt is not a token prefix of the training conversation."""
    inference = render_inference(tokenizer, preset, text)
    training = render_training(tokenizer, preset, text, letter)
    if len(full_ids) == len(prompt_ids) and tuple(full_ids) == tuple(prompt_ids):
        return TemplateProblem("error", "no_answer_token", (
            "the training conversation ends where the inference prompt ends: no token follows the prompt, "
            "so there is no answer letter to train or score. The template probably drops the assistant "
            "message."))
    common = os.path.commonprefix([inference, training])  # noqa: RUF071 (strings, not paths)
    if common == inference:
        merged = (tokenizer.convert_ids_to_tokens(int(full_ids[diverge_at]))
                  if diverge_at < len(full_ids) else "")
        return TemplateProblem("error", "letter_merges", (
            f"the training text starts with the inference text, but the tokens differ from token "
            f"{diverge_at}: "
            f"the answer letter {letter!r} merges with the end of the prompt into token {merged!r}. At "
            "inference the prompt's last token is a different one, so the letter token the model learns "
            "never stands where it is scored. End the prompt with a token the letter cannot join (e.g. a "
            "newline) or choose another preset."))
    extra = inference[len(common):]
    continued = training[len(common):len(common) + max(len(extra), 12)]
    where = f"after {common[-30:]!r}"
    generation = _generation_prompt(tokenizer, preset, text)
    if generation and extra and extra in generation:
        block = (f"the chat template's generation prompt ({generation!r}) adds {extra!r}, which the training "
                 "conversation never contains")
    else:
        block = f"the inference rendering has {extra!r} where the training conversation has {continued!r}"
    return TemplateProblem("error", "not_prefix", (
        f"the inference prompt is not a token prefix of the training conversation (first difference at token "
        f"{diverge_at}, {where}): {block}. A model fine-tuned on these conversations learns to answer "
        f"right after {common[-20:]!r}, but at inference it reads {extra!r} first, so the letter "
        "probabilities are read after text training never showed. Make the generation prompt match the "
        "assistant turn's opening (or render training the same way), or choose a text preset."))


def template_consistency(tokenizer: Any, preset: PromptPreset, *, text: str | None = None,
                         letter: str = "A", count: int = 20) -> TemplateConsistency:
    """Check a tokenizer and preset without any model: the same renderings training and scoring use."""
    prompt_text = text if text is not None else probe_text(tokenizer, preset, count)
    alignment = align(tokenizer, preset, prompt_text, letter)
    prompt_ids, full_ids = alignment.prompt_ids, alignment.full_ids
    problems: list[TemplateProblem] = []
    loss_tokens: tuple[tuple[int, int, str], ...] = ()
    answer = None
    if alignment.is_prefix:
        centre = len(prompt_ids)
        loss_tokens = _token_rows(tokenizer, full_ids, len(prompt_ids), len(full_ids))
        answer = loss_tokens[0]
        decoded = tokenizer.decode([answer[1]])
        if decoded.strip() != letter:
            spelled = [tokenizer.decode([row[1]]) for row in loss_tokens]
            at = next((index for index, piece in enumerate(spelled) if piece.strip() == letter), None)
            before = "".join(spelled[:at]) if at is not None else None
            problems.append(TemplateProblem("error", "answer_not_letter", (
                f"the first token training teaches after the prompt is {answer[2]!r} (decodes to "
                f"{decoded!r}), not the letter {letter!r}"
                + (f": the training conversation puts {before!r} between the prompt and the letter, so the "
                   "position scored at inference is trained to emit that, not a letter. Put that text into "
                   "the generation prompt, or strip it from the assistant turn." if before
                   else ": the letter is tokenized together with other text; choose another preset."))))
        elif answer[2] != letter:
            problems.append(TemplateProblem("warning", "letter_with_space", (
                f"the answer letter {letter!r} becomes token {answer[2]!r} (decodes to {decoded!r}): the "
                "template puts a space or word start before the letter, so the bare-letter token that "
                "`convert_tokens_to_ids` finds is not the one training teaches.")))
    else:
        centre = alignment.diverge_at
        problems.append(_mismatch_problem(tokenizer, preset, prompt_text, letter, alignment.diverge_at,
                                          prompt_ids, full_ids))
    slot = answer_slot(tokenizer, preset)
    # The template's own quirks come first: they explain the prompt's end before any letter problem.
    problems[:0] = [TemplateProblem("warning", flag, note) for flag, note in zip(slot.flags, slot.notes(), strict=True)]
    letters = tuple(resolve_letters(tokenizer, preset, letters_for(count), "seed", text=prompt_text))
    not_prefix = [token.letter for token in letters if "template_not_prefix" in token.flags]
    if alignment.is_prefix and not_prefix:
        problems.append(TemplateProblem("error", "letters_not_prefix", (
            f"letters {', '.join(not_prefix)} are not token prefixes of their training conversation: "
            "these letters merge with the prompt's end when appended; the model cannot be trained or scored "
            "on them.")))
    differs = [token.letter for token in letters if "differs_from_as_trained" in token.flags]
    answer_is_letter = not any(problem.kind == "answer_not_letter" for problem in problems)
    if differs and answer_is_letter:
        problems.append(TemplateProblem("warning", "seed_differs", (
            f"for letters {', '.join(differs)} the seed strategy's token is not the token training "
            "teaches: scoring with the 'seed' strategy reads other logits than a fine-tune raises; use "
            "'as_trained'.")))
    shared = [token.letter for token in letters if "shared_id" in token.flags]
    if shared:
        problems.append(TemplateProblem("error", "shared_token", (
            f"letters {', '.join(shared)} map to one token ID: their candidates get identical scores and "
            "cannot be told apart. Use fewer candidates or another tokenizer.")))
    return TemplateConsistency(
        preset=preset.name, chat=preset.chat, letter=letter, prompt_ids=prompt_ids, full_ids=full_ids,
        diverge_at=alignment.diverge_at, generation_prompt=_generation_prompt(tokenizer, preset, prompt_text),
        inference_window=_token_rows(tokenizer, prompt_ids, centre - _WINDOW, centre + _WINDOW),
        training_window=_token_rows(tokenizer, full_ids, centre - _WINDOW, centre + _WINDOW),
        loss_tokens=loss_tokens, answer_token=answer, letter_tokens=letters, problems=tuple(problems),
        answer_slot=slot)
