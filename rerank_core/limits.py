"""Every numeric input's allowed range, in one place, so the core refuses what would freeze the app."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = ["LIMITS", "Limit", "LimitError", "check_limit", "limits_markdown", "whole_number"]


class LimitError(ValueError):
    """A number outside its documented range (or not a whole number); `field` names the input."""

    def __init__(self, message: str, *, field: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Limit:
    """An inclusive integer range for one input, and why it stops there."""

    label: str
    low: int
    high: int
    why: str

    def check(self, value: Any) -> int:
        """The value as an int if it is a whole number in range; otherwise a LimitError naming the input."""
        number = whole_number(self.label, value)
        if not self.low <= number <= self.high:
            raise LimitError(f"{self.label} must be from {self.low} to {self.high} ({self.why}), got {number}",
                             field=self.label)
        return number


# Costs measured on a 2-core CPU with the 135M model: about 0.1 s per scored prompt of 20 candidates
# batched, so the diagnostic caps below keep the longest run in the tens of minutes, not days.
LIMITS: dict[str, Limit] = {
    "candidates": Limit("candidate count", 1, 52, "one letter A-Z a-z each"),
    "candidate_seed": Limit("candidate seed", 0, 2**32 - 1, "a non-negative 32-bit seed"),
    "order_seed": Limit("order seed", 0, 2**32 - 1, "a non-negative 32-bit seed"),
    "bootstrap_seed": Limit("bootstrap seed", 0, 2**32 - 1, "a non-negative 32-bit seed"),
    "max_prompt_tokens": Limit("max prompt tokens", 16, 131_072, "the longest context of current models"),
    "batch_size": Limit("batch size", 1, 256, "prompts per forward pass; more only costs memory"),
    "token_budget": Limit("token budget", 64, 262_144,
                          "padded tokens per forward pass; activations grow with it, speed stops growing"),
    "compare_users": Limit("users", 1, 10_000, "a paired comparison over more users adds nothing but time"),
    "compare_systems": Limit("systems", 1, 4, "the base and up to three adapters"),
    "bootstrap_samples": Limit("bootstrap samples", 100, 100_000, "more resamples do not sharpen the CI"),
    "movers": Limit("movers", 1, 100, "users listed per direction"),
    "orders": Limit("orders", 1, 200, "orders scored per user; each costs one forward pass"),
    "diagnostic_users": Limit("users", 1, 500, "users scored by one diagnostic run"),
    "diagnostic_prompts": Limit("scored prompts (users × orders)", 1, 5_000,
                                "one position-bias run: about 10 minutes on a 2-core CPU"),
    "history_items": Limit("history items", 1, 200, "leave-one-out re-scores the prompt once per item"),
    "top_other": Limit("top non-letter tokens", 0, 50, "tokens listed beside the letters"),
    "placeholder_chars": Limit("placeholder length", 0, 50, "one short word stands for every candidate"),
    "template_kwargs_chars": Limit("template_kwargs length", 0, 2_000, "a few chat-template options as JSON"),
}


def whole_number(label: str, value: Any) -> int:
    """An int from an int, a whole float or a numeric string; empty, fractional and non-numbers are refused."""
    if isinstance(value, bool):
        raise LimitError(f"{label} must be a whole number, got {value!r}", field=label)
    if isinstance(value, int):
        return value
    if value is None or (isinstance(value, str) and not value.strip()):
        raise LimitError(f"{label} is empty: enter a whole number", field=label)
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                raise LimitError(f"{label} must be a whole number, got {text!r}", field=label) from None
    if isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            raise LimitError(f"{label} must be a whole number, got {value!r}", field=label)
        return int(value)
    try:  # numpy integers and other int-like numbers
        number = int(value)
    except (TypeError, ValueError):
        raise LimitError(f"{label} must be a whole number, got {value!r}", field=label) from None
    if number != value:
        raise LimitError(f"{label} must be a whole number, got {value!r}", field=label)
    return number


def check_limit(name: str, value: Any) -> int:
    """Check `value` against LIMITS[name]; returns it as an int."""
    return LIMITS[name].check(value)


def limits_markdown() -> str:
    """The ranges as a markdown table, for the README and the app's help."""
    lines = ["| input | key | range | why |", "|---|---|---|---|"]
    lines += [f"| {limit.label} | `{key}` | {limit.low:,}–{limit.high:,} | {limit.why} |"
              for key, limit in LIMITS.items()]
    return "\n".join(lines)
