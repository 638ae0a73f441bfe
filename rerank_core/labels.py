"""Training labels from token prefixes: loss only on what the model emits after the inference prompt."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rerank_core.alignment import TemplateMismatch, align
from rerank_core.prompts import PromptPreset

__all__ = ["IGNORE_INDEX", "LabeledExample", "MaskedToken", "check_answer_token", "label_example", "mask_preview"]

# The label value PyTorch's cross-entropy (and every Hugging Face causal LM) skips.
IGNORE_INDEX = -100


@dataclass(frozen=True)
class LabeledExample:
    """One training sequence: token IDs, their labels, and how many tokens the inference prompt had."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    prompt_length: int

    @property
    def loss_positions(self) -> list[int]:
        return [position for position, label in enumerate(self.labels) if label != IGNORE_INDEX]

    @property
    def loss_tokens(self) -> int:
        return len(self.loss_positions)


@dataclass(frozen=True)
class MaskedToken:
    """One token of a training sequence as the mask preview shows it."""

    position: int
    token: str
    token_id: int
    loss: bool
    in_prompt: bool


def label_example(
    tokenizer: Any,
    preset: PromptPreset,
    text: str,
    answer_letter: str,
    *,
    train_on_eos: bool = True,
    max_length: int | None = None,
) -> LabeledExample:
    """Label the tokens after the inference rendering: the letter, plus the end-of-turn tokens if asked.

    The inference rendering (prompt with generation prompt) must be a token prefix of the training
    conversation; otherwise the model would learn to answer after text it never reads, so this raises
    TemplateMismatch showing where the two differ. `max_length` cuts the sequence from the right,
    as a tokenizer's truncation would; the result may then carry no loss token at all.
    """
    alignment = align(tokenizer, preset, text, answer_letter)
    if not alignment.is_prefix:
        raise TemplateMismatch(alignment.describe(tokenizer))
    prompt_ids = alignment.prompt_ids
    completion = alignment.completion_ids
    check_answer_token(tokenizer, completion, answer_letter)
    # Without end-of-turn training the letter is the last token: later tokens would only cost time.
    trained = completion if train_on_eos else completion[:1]
    input_ids = prompt_ids + trained
    labels = (IGNORE_INDEX,) * len(prompt_ids) + trained
    if max_length is not None and len(input_ids) > max_length:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return LabeledExample(input_ids=input_ids, labels=labels, prompt_length=len(prompt_ids))


def check_answer_token(tokenizer: Any, completion: tuple[int, ...], answer_letter: str) -> None:
    """The first loss token must be the letter's own token (or a bare word start the letter follows)."""
    def text(ids: tuple[int, ...]) -> str:
        return tokenizer.decode(list(ids), skip_special_tokens=False).strip().lower()

    first = text(completion[:1])
    if first.startswith(answer_letter.lower()) or (not first and text(completion).startswith(answer_letter.lower())):
        return
    token = tokenizer.convert_ids_to_tokens(int(completion[0])) if completion else None
    raise TemplateMismatch(
        f"the first loss token after the prompt would be {token!r} ({completion[0] if completion else '-'}), not "
        f"the answer letter {answer_letter!r}: the chat template puts {tokenizer.decode(list(completion))!r} after "
        "the prompt and the letter is not where training would put the loss. Run `diagnose template` to see the "
        "renderings; pass template options (--template-kwargs) or choose another preset.")


def mask_preview(tokenizer: Any, example: LabeledExample) -> list[MaskedToken]:
    """Every token of one training sequence with its ID and whether it carries loss (the app's mask view)."""
    tokens = tokenizer.convert_ids_to_tokens(list(example.input_ids))
    return [MaskedToken(position=position, token=token, token_id=token_id,
                        loss=example.labels[position] != IGNORE_INDEX, in_prompt=position < example.prompt_length)
            for position, (token, token_id) in enumerate(zip(tokens, example.input_ids, strict=True))]
