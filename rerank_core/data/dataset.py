"""The dataset: items with texts, time-ordered interactions per user, and the leave-one-out split."""

from __future__ import annotations

import functools
import hashlib
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

from rerank_core.data.item_text import TEXT_FIELDS, ItemText, parse_item_text

__all__ = [
    "MAX_ROW_ERRORS",
    "TEXT_FIELDS",
    "DataError",
    "DataErrors",
    "Dataset",
    "Item",
    "UserSplit",
    "collecting_row_errors",
    "report_row_error",
]



class DataError(ValueError):
    """A data file that cannot be used; the message names the file, line and field."""

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 field: str | None = None) -> None:
        where = ", ".join(part for part in (
            file and f"file {file}", line is not None and f"line {line}", field and f"field {field!r}")
            if part)
        super().__init__(f"{where}: {message}" if where else message)
        self.file = file
        self.line = line
        self.field = field


class DataErrors(DataError):
    """Several bad rows reported at once; file, line and field are the first row's, `errors` holds each."""

    def __init__(self, errors: Sequence[DataError], *, stopped_early: bool) -> None:
        stop = f"; reading stopped at the {MAX_ROW_ERRORS}th" if stopped_early else ""
        ValueError.__init__(self, f"{len(errors)} bad rows{stop}:\n" + "\n".join(f"- {error}" for error in errors))
        self.errors = list(errors)
        self.file, self.line, self.field = errors[0].file, errors[0].line, errors[0].field


# Bad rows a load reports at once: enough to fix a file in one pass, short enough to read.
MAX_ROW_ERRORS = 20
_row_errors: ContextVar[list[DataError] | None] = ContextVar("row_errors", default=None)


def report_row_error(error: DataError) -> None:
    """A bad row: recorded (the caller skips the row and reads on) while collecting, else raised at once."""
    errors = _row_errors.get()
    if errors is None:
        raise error
    errors.append(error)
    if len(errors) >= MAX_ROW_ERRORS:
        raise DataErrors(errors, stopped_early=True)


@contextmanager
def collecting_row_errors() -> Iterator[None]:
    """Read past bad rows and raise them together (up to MAX_ROW_ERRORS) when the block ends.

    An error raised after bad rows were skipped (no items left, unknown items) is usually their
    consequence, so the rows are what gets reported.
    """
    errors: list[DataError] = []
    token = _row_errors.set(errors)
    try:
        yield
    except DataErrors:
        raise
    except DataError as error:
        if not errors:
            raise
        raise (errors[0] if len(errors) == 1 else DataErrors(errors, stopped_early=False)) from error
    finally:
        _row_errors.reset(token)
    if errors:
        raise errors[0] if len(errors) == 1 else DataErrors(errors, stopped_early=False)


@dataclass(frozen=True)
class Item:
    """One catalogue item; caption and summary are the seed's alternative text modes, `attributes` the data's
    other fields (genres, year, brand, price, ...) as (name, text) pairs in file order, for item-text specs."""

    item_id: str
    title: str
    caption: str = ""
    summary: str = ""
    attributes: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class UserSplit:
    """What a model sees for one user and split: the history before the target, and the target."""

    user_id: str
    split: str
    history: tuple[str, ...]
    target: str


@dataclass
class Dataset:
    """Items and per-user sequences (oldest first); built by the loaders, validated on creation."""

    name: str
    items: dict[str, Item]
    sequences: dict[str, list[str]]
    source: str = ""
    short_users: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        missing = sorted({item for seq in self.sequences.values() for item in seq} - set(self.items))
        if missing:
            shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
            raise DataError(
                f"{len(missing)} interacted item id(s) are not in the items table: {shown}; add them to the "
                "items file or remove their interactions", file=self.source or None, field="item_id")
        # Leave-one-out needs train >= 1, validation and test: at least 3 interactions.
        self.short_users = sorted(user for user, seq in self.sequences.items() if len(seq) < 3)
        for user in self.short_users:
            del self.sequences[user]
        if not self.sequences:
            raise DataError(f"no user has the 3 interactions leave-one-out needs ({len(self.short_users)} "
                            "user(s) have fewer): add interactions or use a dataset with longer histories",
                            file=self.source or None)

    @property
    def users(self) -> list[str]:
        return sorted(self.sequences, key=_natural_key)

    def fingerprint(self) -> str:
        """A short hash of the content, recorded in adapter manifests."""
        digest = hashlib.sha256()
        for item_id in sorted(self.items):
            item = self.items[item_id]
            # Written only when an item has fields beyond its texts: a dataset without them keeps its fingerprint.
            extra = "".join(f"\t{name}={value}" for name, value in item.attributes)
            digest.update(f"{item_id}\t{item.title}\t{item.caption}\t{item.summary}{extra}\n".encode())
        for user in sorted(self.sequences):
            digest.update(f"{user}\t{' '.join(self.sequences[user])}\n".encode())
        return digest.hexdigest()[:16]

    @functools.cached_property
    def item_fields(self) -> tuple[str, ...]:
        """The items' fields beyond their texts, in the order the items first have them: what item-text specs
        may name besides title, caption, summary and count."""
        names: dict[str, None] = {}
        for item in self.items.values():
            names.update(dict.fromkeys(name for name, _ in item.attributes))
        return tuple(names)

    def item_text(self, text_field: str) -> ItemText:
        """An item-text spec checked against this dataset; a ValueError names an unknown part and lists the fields."""
        return parse_item_text(text_field, self.item_fields)

    def text(self, item_id: str, text_field: str = "title") -> str:
        """The text that stands for an item in prompts, under a named text or a spec (data.item_text)."""
        spec = self.item_text(text_field)
        count = self.training_counts.get(item_id, 0) if spec.uses_count else 0
        return spec.render(self.items[item_id], count)

    @functools.cached_property
    def training_counts(self) -> Counter[str]:
        """Interactions per item in the training part of the split: popularity that never sees a held-out item."""
        return Counter(item for user in self.sequences for item in self.training_sequence(user))

    def split_user(self, user_id: str, split: str = "test") -> UserSplit:
        """Leave-one-out: last item is test, second to last validation, the rest training."""
        if user_id not in self.sequences:
            hint = " (it has fewer than 3 interactions)" if user_id in self.short_users else ""
            raise KeyError(f"user {user_id!r} is not in dataset {self.name}{hint}; pick one of its "
                           f"{len(self.sequences)} users, e.g. {', '.join(self.users[:3])}")
        sequence = self.sequences[user_id]
        if split == "test":
            return UserSplit(user_id, split, tuple(sequence[:-1]), sequence[-1])
        if split == "validation":
            return UserSplit(user_id, split, tuple(sequence[:-2]), sequence[-2])
        raise ValueError(f"split {split!r} is not one of test, validation")

    def training_sequence(self, user_id: str) -> list[str]:
        """The part of a user's sequence training may use (everything before validation)."""
        return self.sequences[user_id][:-2]

    def touched(self, user_id: str) -> set[str]:
        """Every item the user ever interacted with: never a negative candidate."""
        return set(self.sequences[user_id])


def _natural_key(text: str) -> tuple[int, int | str]:
    return (0, int(text)) if text.isdigit() else (1, text)
