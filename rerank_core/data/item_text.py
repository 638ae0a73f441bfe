"""Item text as a spec: which of an item's fields stand for it in prompts ("title+year+genres+count"), parsed and
checked against the dataset in this one place and rendered compactly, so the data's real signal (genres, year,
brand, price, popularity) can reach the model at a known cost in prompt tokens."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rerank_core.data.dataset import Item

__all__ = [
    "COUNT_PART",
    "MAX_SPEC_CHARS",
    "PART_SEPARATOR",
    "RESERVED_PARTS",
    "TEXT_FIELDS",
    "ItemText",
    "check_item_text_syntax",
    "item_text_choices",
    "item_text_spelling",
    "parse_item_text",
]

# The named texts existing adapters' manifests record, each rendered exactly as before specs existed: the item
# file's texts (an empty caption or summary falls back to the title), and "title_count": the title plus the
# item's interaction count in the training part of the split, popularity written into the prompt.
TEXT_FIELDS = ("title", "caption", "summary", "title_count")
# The training-part interaction count (Dataset.training_counts: validation and test items are never counted).
COUNT_PART = "count"
# Parts every dataset has and the named texts; a loader never names one of its own fields so (it would be
# shadowed).
RESERVED_PARTS = (*TEXT_FIELDS, COUNT_PART, "item_id")
PART_SEPARATOR = "+"
SEGMENT_SEPARATOR = " | "
# A year part is written after the title as MovieLens writes it, "Star Wars (1977)", and left out when the title
# already ends with a year (MovieLens titles do; RecBole's loader appends release_year to the title).
YEAR_PARTS = ("year", "release_year")
# Only a four-digit value is a year to write after the title (ml-100k gives its placeholder movie "unkonwn").
_YEAR = re.compile(r"\d{4}")
_TITLE_ENDS_WITH_YEAR = re.compile(r"\(\d{4}\)\s*$")
# Specs are typed in forms and flags: long enough for every field of a dataset, short enough to show in a label.
MAX_SPEC_CHARS = 200


@dataclass(frozen=True)
class ItemText:
    """A parsed item-text spec: a named text (exactly as before specs existed) or parts joined by '+'."""

    spec: str
    parts: tuple[str, ...]

    @property
    def uses_count(self) -> bool:
        """Whether rendering needs the training-part interaction counts."""
        return COUNT_PART in self.parts or self.spec == "title_count"

    def render(self, item: Item, count: int) -> str:
        """The item's text under this spec; `count` is its training-part interaction count."""
        if self.spec in TEXT_FIELDS:
            return _named_text(item, self.spec, count)
        attributes = dict(item.attributes)
        title = item.title
        if "title" in self.parts:
            year = next((attributes[part] for part in self.parts
                         if part in YEAR_PARTS and _YEAR.fullmatch(attributes.get(part, ""))), "")
            if year and not _TITLE_ENDS_WITH_YEAR.search(title):
                title = f"{title} ({year})"
        segments = []
        for part in self.parts:
            if part == "title":
                segments.append(title)
            elif part == COUNT_PART:
                segments.append(str(count))
            elif part in ("caption", "summary"):
                segments.append(getattr(item, part))
            elif not (part in YEAR_PARTS and "title" in self.parts):  # with a title, a year goes after it or nowhere
                segments.append(attributes.get(part, ""))
        # An item lacking every asked field still needs a text: its title.
        return SEGMENT_SEPARATOR.join(segment for segment in segments if segment) or item.title


def _named_text(item: Item, name: str, count: int) -> str:
    """The four texts adapters were trained on before specs existed, byte for byte."""
    if name == "title_count":
        return f"{item.title}, {count} interactions"
    return getattr(item, name) or item.title


def check_item_text_syntax(spec: str) -> ItemText:
    """The spec's form alone (what a flag or a form can check before any data loads): non-empty parts joined by
    '+', none twice, at most MAX_SPEC_CHARS characters. Which parts exist is checked against the dataset."""
    if not isinstance(spec, str):
        raise ValueError(f"text field must be text, got {type(spec).__name__} {spec!r}")
    spec = spec.strip()
    if not spec:
        raise ValueError(f"text field is empty: use one of {', '.join(TEXT_FIELDS)} or fields joined by "
                         f"'{PART_SEPARATOR}', e.g. title+year+genres+count")
    if len(spec) > MAX_SPEC_CHARS:
        raise ValueError(f"text field is {len(spec)} characters long; at most {MAX_SPEC_CHARS}")
    if spec in TEXT_FIELDS:
        return ItemText(spec, (spec,))
    parts = tuple(part.strip() for part in spec.split(PART_SEPARATOR))
    if "" in parts:
        raise ValueError(f"text field {spec!r} has an empty part: join field names with a single "
                         f"'{PART_SEPARATOR}', e.g. title+year+genres+count")
    repeated = sorted({part for part in parts if parts.count(part) > 1})
    if repeated:
        raise ValueError(f"text field {spec!r} names {', '.join(map(repr, repeated))} twice: name each part once")
    return ItemText(PART_SEPARATOR.join(parts), parts)


def item_text_spelling(spec: str) -> str:
    """The spec in its one spelling ("title + count" → "title+count"), or a ValueError saying what is wrong."""
    return check_item_text_syntax(spec).spec


@functools.lru_cache(maxsize=256)
def parse_item_text(spec: str, fields: tuple[str, ...]) -> ItemText:
    """The spec checked against a dataset's own fields: an unknown part is named, with every part there is."""
    parsed = check_item_text_syntax(spec)
    if parsed.spec in TEXT_FIELDS:
        return parsed
    known = {"title", "caption", "summary", COUNT_PART, *fields}
    unknown = [part for part in parsed.parts if part not in known]
    if unknown:
        own = ", ".join(fields) if fields else "none"
        raise ValueError(f"text field {spec.strip()!r}: unknown part {unknown[0]!r}. Parts: title, caption, "
                         f"summary, {COUNT_PART} (training-part interactions) and this dataset's fields ({own}), "
                         f"joined by '{PART_SEPARATOR}'; or a named text: {', '.join(TEXT_FIELDS)}")
    return parsed


def item_text_choices(fields: Iterable[str]) -> list[str]:
    """What a picker offers: the named texts, the dataset's own fields, and title with all of them and the count."""
    own = list(fields)
    combined = PART_SEPARATOR.join(["title", *own, COUNT_PART])
    offer_combined = own and len(combined) <= MAX_SPEC_CHARS  # a wide table's every column is no spec to offer
    return [*TEXT_FIELDS, *own, f"title{PART_SEPARATOR}{COUNT_PART}", *([combined] if offer_combined else [])]
