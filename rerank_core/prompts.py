"""Prompt presets, candidate letters, and the two renderings (inference and training) of one prompt."""

from __future__ import annotations

import functools
import json
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from rerank_core.answer_slot import AnswerSlot, locate_answer
from rerank_core.limits import check_limit

__all__ = [
    "LETTERS",
    "PRESETS",
    "Prompt",
    "PromptError",
    "PromptPreset",
    "answer_slot",
    "build_prompt",
    "custom_preset",
    "encode_conversation",
    "encode_rendered",
    "get_preset",
    "letter_range",
    "letters_for",
    "parse_template_kwargs",
    "render_chat",
    "render_generation_prompt",
    "render_inference",
    "render_training",
    "with_template_kwargs",
]

LETTERS = string.ascii_uppercase + string.ascii_lowercase


class PromptError(ValueError):
    """A prompt that cannot be built as asked, with the fix in the message."""


def letters_for(count: int) -> list[str]:
    """The candidate labels A-Z then a-z; 52 is the most a single-letter verbalizer can name."""
    if count < 1:
        raise PromptError(f"number of candidates must be at least 1, got {count}")
    if count > len(LETTERS):
        raise PromptError(
            f"number of candidates {count} is more than the {len(LETTERS)} letters A-Z, a-z; "
            f"use at most {len(LETTERS)} candidates")
    return list(LETTERS[:count])


def letter_range(letters: Sequence[str]) -> str:
    """The seed's answer range: `A-T`, or `A-Z, a-c` past 26 candidates."""
    last = letters[-1]
    if len(letters) <= 26:
        return f"A-{last}"
    return f"A-Z, a-{last}"


SEED_TEMPLATE = (
    "You are a recommendation ranking assistant.\n\n"
    "Choose exactly ONE item the user is most likely to interact with next.\n\n"
    "User history:\n{history}\n\n"
    "Candidate items:\n{candidates}\n\n"
    "Answer with only one letter ({letter_range})."
)
LLAMAREC_INSTRUCTION = (
    "Given user history in chronological order, recommend an item from the candidate pool "
    "with its index letter."
)
# alpaca_short, as LlamaRec's Prompter fills it: instruction, then input, then the response header.
LLAMAREC_TEMPLATE = (
    "### Instruction:\n" + LLAMAREC_INSTRUCTION + "\n\n"
    "### Input:\nUser history: {history}; \n Candidate pool: {candidates}\n\n"
    "### Response:\n"
)


@dataclass(frozen=True)
class PromptPreset:
    """How history and candidates become text, and whether the chat template wraps it."""

    name: str
    description: str
    template: str
    history_line: str
    candidate_line: str
    separator: str = "\n"
    chat: bool = True
    max_history: int | None = None
    max_title_tokens: int | None = None
    # Keyword arguments for the chat template (e.g. {"enable_thinking": false}), as canonical JSON text.
    template_kwargs: str = ""

    @property
    def letter_after(self) -> bool:
        return self.candidate_line.index("{letter}") > self.candidate_line.index("{text}")


PRESETS: dict[str, PromptPreset] = {
    preset.name: preset
    for preset in (
        PromptPreset(
            name="seed",
            description="The research code's chat prompt: `A. title` lines, rendered with the chat template.",
            template=SEED_TEMPLATE, history_line="- {text}", candidate_line="{letter}. {text}"),
        PromptPreset(
            name="seed_after",
            description="The seed chat prompt with the letter after the text: `- title (A)`.",
            template=SEED_TEMPLATE, history_line="- {text}", candidate_line="- {text} ({letter})"),
        PromptPreset(
            name="llamarec",
            description="LlamaRec's alpaca_short text prompt, no chat template: `(A) title` joined by ' \\n '.",
            template=LLAMAREC_TEMPLATE, history_line="({index}) {text}", candidate_line="({letter}) {text}",
            separator=" \n ", chat=False, max_history=20, max_title_tokens=32),
        PromptPreset(
            name="llamarec_after",
            description="LlamaRec's text prompt with the letter after the text: `title (A)`.",
            template=LLAMAREC_TEMPLATE, history_line="({index}) {text}", candidate_line="{text} ({letter})",
            separator=" \n ", chat=False, max_history=20, max_title_tokens=32),
    )
}


def custom_preset(
    template: str,
    *,
    chat: bool = True,
    history_line: str = "- {text}",
    candidate_line: str = "{letter}. {text}",
    separator: str = "\n",
    name: str = "custom",
) -> PromptPreset:
    """A user template with {history}, {candidates} and optionally {letter_range} placeholders."""
    for placeholder in ("{history}", "{candidates}"):
        if placeholder not in template:
            raise PromptError(f"prompt template is missing the placeholder {placeholder}")
    for field_name, line, needed in (("candidate_line", candidate_line, ("{letter}", "{text}")),
                                     ("history_line", history_line, ("{text}",))):
        for placeholder in needed:
            if placeholder not in line:
                raise PromptError(f"{field_name} {line!r} is missing the placeholder {placeholder}")
    try:
        template.format(history="", candidates="", letter_range="")
    except (KeyError, IndexError, ValueError) as error:
        raise PromptError(
            f"prompt template has an unknown placeholder or stray brace ({error}); "
            "use {history}, {candidates}, {letter_range}, and double braces for literal ones") from error
    return PromptPreset(name=name, description="User template.", template=template,
                        history_line=history_line, candidate_line=candidate_line,
                        separator=separator, chat=chat)


def parse_template_kwargs(value: str | Mapping[str, Any] | None) -> str:
    """Canonical JSON of chat-template options ('' for none); a clear error for anything but a JSON object."""
    if value is None:
        return ""
    if isinstance(value, str):
        check_limit("template_kwargs_chars", len(value))
        if not value.strip():
            return ""
        try:
            value = json.loads(value)
        except (ValueError, RecursionError) as error:  # RecursionError: arrays nested 1,000 deep
            raise PromptError(
                f"template_kwargs is not valid JSON ({error}); give a JSON object such as "
                '{"enable_thinking": false}') from None
    if not isinstance(value, Mapping):
        raise PromptError(
            f"template_kwargs must be a JSON object of option names and values, such as "
            f'{{"enable_thinking": false}}, not {type(value).__name__} {json.dumps(value)[:60]}')
    reserved = sorted(set(value) & {"messages", "add_generation_prompt", "tokenize", "conversation"})
    if reserved:
        raise PromptError(f"template_kwargs may not set {', '.join(reserved)}: the renderer sets them itself")
    return json.dumps(dict(value), sort_keys=True, separators=(",", ":")) if value else ""


def with_template_kwargs(preset: PromptPreset, template_kwargs: str | Mapping[str, Any] | None) -> PromptPreset:
    """The preset rendered with these chat-template options."""
    return replace(preset, template_kwargs=parse_template_kwargs(template_kwargs))


def get_preset(name: str) -> PromptPreset:
    """The one place a preset name becomes a PromptPreset; the entry points (CLI, app, manifests, training config)
    call it once, and everything below takes the PromptPreset."""
    if isinstance(name, PromptPreset):
        raise TypeError("get_preset takes a preset name, not a PromptPreset; pass the PromptPreset on as it is")
    try:
        return PRESETS[name]
    except (KeyError, TypeError):  # TypeError: an unhashable value from a JSON request
        raise PromptError(f"prompt preset {name!r} is not one of {', '.join(PRESETS)}") from None


@dataclass(frozen=True)
class Prompt:
    """One built prompt: the text, its inference rendering and that rendering's token IDs, and what was cut to fit."""

    preset: str
    text: str
    rendered: str
    letters: tuple[str, ...]
    history_texts: tuple[str, ...]
    dropped_history: int
    token_ids: tuple[int, ...]  # encode_rendered(rendered): counted to fit the budget, kept for scoring

    @property
    def token_count(self) -> int:
        return len(self.token_ids)


def _require_chat_template(tokenizer: Any, preset: PromptPreset) -> None:
    if preset.chat and not getattr(tokenizer, "chat_template", None):
        raise PromptError(
            f"preset {preset.name!r} renders with the chat template, but this tokenizer has none; "
            "use the 'llamarec' (or 'llamarec_after') text preset, or give the tokenizer a chat template")


def render_chat(tokenizer: Any, preset: PromptPreset, messages: list[dict[str, str]],
                add_generation_prompt: bool) -> str:
    """apply_chat_template with the preset's options; a template that raises names the options and its message."""
    _require_chat_template(tokenizer, preset)
    options = preset.template_kwargs
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             **(json.loads(options) if options else {}))
    except Exception as error:  # Jinja's TemplateError, raise_exception(), or a TypeError inside the template
        given = f" with template_kwargs {options}" if options else ""
        raise PromptError(f"the chat template failed to render{given}: {type(error).__name__}: {error}") from error


def render_generation_prompt(tokenizer: Any, preset: PromptPreset, text: str) -> str:
    """The chat template's own rendering with the generation prompt, before any answer slot is applied."""
    if not preset.chat:
        return text
    return render_chat(tokenizer, preset, [{"role": "user", "content": text}], True)


def render_inference(tokenizer: Any, preset: PromptPreset, text: str) -> str:
    """What the model reads before answering: the generation prompt moved to where training puts the letter."""
    if not preset.chat:
        return text
    return answer_slot(tokenizer, preset).apply(render_generation_prompt(tokenizer, preset, text))


def render_training(tokenizer: Any, preset: PromptPreset, text: str, answer_letter: str) -> str:
    """The full training conversation: the chat with the assistant's letter, or text + letter + EOS."""
    if not preset.chat:
        return text + answer_letter + (tokenizer.eos_token or "")
    return render_chat(tokenizer, preset, [{"role": "user", "content": text},
                                            {"role": "assistant", "content": answer_letter}], False)


def encode_conversation(tokenizer: Any, preset: PromptPreset, rendered: str) -> list[int]:
    """Token IDs of a rendering as one string; a chat rendering carries its own special tokens, a text one gets BOS."""
    return list(tokenizer(rendered, add_special_tokens=not preset.chat)["input_ids"])


def encode_rendered(tokenizer: Any, preset: PromptPreset, rendered: str) -> list[int]:
    """Token IDs of an inference rendering: an inserted answer prefix keeps its training-conversation IDs."""
    if not preset.chat:
        return encode_conversation(tokenizer, preset, rendered)
    return answer_slot(tokenizer, preset).encode(
        lambda part: encode_conversation(tokenizer, preset, part), rendered)


# A neutral user turn and three letters: the slot depends on the template, not on the prompt's items.
_PROBE_TEXT = "Candidate items:\nA. first\nB. second\nAnswer with only one letter."
_PROBE_LETTERS = ("A", "B", "Z")


def answer_slot(tokenizer: Any, preset: PromptPreset) -> AnswerSlot:
    """Where this tokenizer's chat template puts the answer letter, relative to its generation prompt."""
    if not preset.chat:  # a text preset never reaches the chat template
        return AnswerSlot(template_kwargs=preset.template_kwargs, template_kwargs_ignored=bool(preset.template_kwargs))
    _require_chat_template(tokenizer, preset)
    return _cached_slot(tokenizer, str(tokenizer.chat_template), len(tokenizer), preset)


@functools.lru_cache(maxsize=64)
def _cached_slot(tokenizer: Any, chat_template: str, vocabulary: int, preset: PromptPreset) -> AnswerSlot:
    """Cached per tokenizer, template text, vocabulary size and preset: a test may swap the template."""
    user = [{"role": "user", "content": _PROBE_TEXT}]
    generation = render_chat(tokenizer, preset, user, True)
    plain = render_chat(tokenizer, preset, user, False)
    suffix = len(generation) - len(plain) if generation.startswith(plain) else 0
    trainings = [render_chat(tokenizer, preset, [*user, {"role": "assistant", "content": letter}], False)
                 for letter in _PROBE_LETTERS]

    def encode(text: str) -> list[int]:
        return encode_conversation(tokenizer, preset, text)

    def decode(ids: Sequence[int]) -> str:
        return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    slot = locate_answer(encode, decode, generation, suffix, trainings, _PROBE_LETTERS) or AnswerSlot()
    if preset.template_kwargs:
        without = replace(preset, template_kwargs="")
        ignored = (generation == render_chat(tokenizer, without, user, True)
                   and trainings[0] == render_chat(tokenizer, without, [*user, {"role": "assistant", "content": "A"}],
                                                    False))
        slot = replace(slot, template_kwargs=preset.template_kwargs, template_kwargs_ignored=ignored)
    return slot


def _cut_title(tokenizer: Any, text: str, max_tokens: int | None) -> str:
    if max_tokens is None:
        return text
    tokens = tokenizer.tokenize(text)
    if len(tokens) <= max_tokens:
        return text
    return tokenizer.convert_tokens_to_string(tokens[:max_tokens]).strip()


def _fill(preset: PromptPreset, history: Sequence[str], candidates: Sequence[str],
          letters: Sequence[str]) -> str:
    history_block = preset.separator.join(
        preset.history_line.format(index=index, text=text) for index, text in enumerate(history, 1))
    candidate_block = preset.separator.join(
        preset.candidate_line.format(letter=letter, text=text) for letter, text in zip(letters, candidates))
    return preset.template.format(
        history=history_block, candidates=candidate_block, letter_range=letter_range(letters))


def _covering(tokenizer: Any, preset: PromptPreset, history: Sequence[str], excess: int) -> int:
    """How many of the oldest history items hold `excess` tokens, counted line by line: an estimate, since lines
    tokenize a little differently inside the prompt and are numbered anew as items go."""
    lines = [preset.history_line.format(index=index, text=text) + preset.separator
             for index, text in enumerate(history, 1)]
    total = 0
    for items, ids in enumerate(tokenizer(lines, add_special_tokens=False)["input_ids"] if lines else [], 1):
        total += len(ids)
        if total >= excess:
            return items
    return len(history)


def build_prompt(
    tokenizer: Any,
    preset: PromptPreset,
    history_texts: Sequence[str],
    candidate_texts: Sequence[str],
    *,
    max_prompt_tokens: int | None = None,
) -> Prompt:
    """Fill the preset and drop the oldest history items until the rendering fits max_prompt_tokens."""
    letters = letters_for(len(candidate_texts))
    history = [_cut_title(tokenizer, text, preset.max_title_tokens) for text in history_texts]
    candidates = [_cut_title(tokenizer, text, preset.max_title_tokens) for text in candidate_texts]
    dropped = 0
    if preset.max_history is not None and len(history) > preset.max_history:
        dropped = len(history) - preset.max_history
        history = history[dropped:]

    def rendering(keep_from: int) -> tuple[str, str, tuple[int, ...]]:
        text = _fill(preset, history[keep_from:], candidates, letters)
        rendered = render_inference(tokenizer, preset, text)
        return text, rendered, tuple(encode_rendered(tokenizer, preset, rendered))

    text, rendered, token_ids = rendering(0)
    if max_prompt_tokens is not None and len(token_ids) > max_prompt_tokens:
        # Binary search for the fewest oldest items to drop: token count falls as items go. Its first probe is where
        # the items' own token counts say the excess ends, its second beside it: two renderings where halving took
        # five or six for MovieLens' histories (each a chat template and ~1,500 tokens to encode).
        low, high = 1, len(history)
        best = None
        middle = min(_covering(tokenizer, preset, history, len(token_ids) - max_prompt_tokens), high)
        first = True
        while low <= high:
            candidate = rendering(middle)
            fits = len(candidate[2]) <= max_prompt_tokens
            if fits:
                best, high = (middle, candidate), middle - 1
            else:
                low = middle + 1
            middle = (middle - 1 if fits else middle + 1) if first else (low + high) // 2
            first = False
        if best is None:
            raise PromptError(
                f"the prompt needs {len(rendering(len(history))[2])} tokens even with no history, more than "
                f"max_prompt_tokens={max_prompt_tokens}; raise the limit or use fewer candidates")
        keep_from, (text, rendered, token_ids) = best
        dropped += keep_from
        history = history[keep_from:]
    return Prompt(preset=preset.name, text=text, rendered=rendered, letters=tuple(letters),
                  history_texts=tuple(history), dropped_history=dropped, token_ids=token_ids)

