"""The reading every format shares: decoded lines with numbers, CSV rows by header, size limits, and the item
table and event list that turn rows into a Dataset with errors naming file, line and field."""

from __future__ import annotations

import csv
import difflib
import gzip
import logging
import math
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path

from rerank_core.data.dataset import DataError, Dataset, Item, report_row_error
from rerank_core.data.item_text import PART_SEPARATOR, RESERVED_PARTS

__all__ = [
    "MAX_FILE_BYTES",
    "MAX_TITLE_CHARS",
    "Events",
    "ItemTable",
    "build_dataset",
    "check_size",
    "clean_text",
    "csv_rows",
    "folder_of",
    "require_files",
    "split_lines",
    "text_lines",
    "unix_seconds",
]

log = logging.getLogger(__name__)

# Read at call time (not bound as a default argument) so a deployment or a test can change it.
MAX_FILE_BYTES = 200 * 1024**2
MAX_TITLE_CHARS = 1000
# Anything later is a unit mistake (milliseconds or microseconds read as seconds), not a real date.
_LATEST_TIMESTAMP = datetime(2200, 1, 1, tzinfo=UTC).timestamp()
_OTHER_DELIMITERS = (";", "\t", "|")


def folder_of(path: Path) -> Path:
    """The dataset folder: the path itself, or the folder of a file inside it."""
    return path if path.is_dir() else path.parent


def require_files(folder: Path, *names: str) -> list[Path]:
    """The format's files in the folder, or one error naming every missing one."""
    paths = [folder / name for name in names]
    missing = [path.name for path in paths if not path.is_file()]
    if missing:
        raise DataError(f"missing {', '.join(missing)}: this format needs {' and '.join(names)} "
                        "in the same folder", file=str(folder))
    return paths


def check_size(path: Path, size: int) -> None:
    """Refuse a file (or a decompressed stream) past MAX_FILE_BYTES before it fills the memory."""
    if size > MAX_FILE_BYTES:
        raise DataError(f"the file is larger than the {MAX_FILE_BYTES / 1024**2:g} MiB limit "
                        "(MAX_FILE_BYTES in rerank_core.data.reading): use a subset, e.g. one category or "
                        "a sample of users", file=str(path))


def text_lines(path: Path, encoding: str, describe: str) -> Iterator[tuple[int, str]]:
    """Decoded lines with 1-based numbers; bad bytes and empty files raise a DataError."""
    check_size(path, path.stat().st_size)
    compressed = path.name.lower().endswith(".gz")
    size = 0
    seen_text = False
    try:
        with gzip.open(path, "rb") if compressed else path.open("rb") as stream:
            for number, raw in enumerate(stream, 1):
                if compressed:  # so a small .gz cannot expand past the limit
                    size += len(raw)
                    check_size(path, size)
                try:
                    text = raw.decode(encoding)
                except UnicodeDecodeError as error:
                    report_row_error(DataError(
                        f"byte 0x{raw[error.start]:02X} at byte {error.start + 1} of the line is not valid "
                        f"{encoding.upper()}: save the file as UTF-8 (it may be Latin-1 or Windows-1252 now)",
                        file=str(path), line=number))
                    text = "\n"  # a blank line in its place keeps the later lines' numbers right
                if number == 1:
                    text = text.removeprefix("\ufeff")  # spreadsheet programs often add a BOM
                seen_text = seen_text or not text.isspace()
                yield number, text
    except (OSError, EOFError) as error:
        raise DataError(f"cannot read the file ({error}): is it a complete, uncorrupted copy?",
                        file=str(path)) from None
    if not seen_text:
        raise DataError(f"the file is empty: it needs {describe}", file=str(path))


def csv_rows(path: Path, required: tuple[str, ...], optional: tuple[str, ...],
              describe: str, *, others: bool = False) -> Iterator[tuple[int, dict[str, str]]]:
    """Rows of a comma-separated file with a header, keyed by the expected column names (with `others`, every
    other named column too, under its header name)."""
    reader = csv.reader(text for _, text in text_lines(path, "utf-8", describe))
    previous_end = 0
    header: list[str] | None = None
    columns: dict[str, int] = {}
    needed = 0  # fields a row must have to reach every required column
    try:
        for row in reader:
            # A quoted field may span lines: name the line where the record starts.
            line, previous_end = previous_end + 1, reader.line_num
            if not "".join(row).strip():  # blank lines and spreadsheet rows of bare commas
                continue
            if header is None:
                header = row
                columns = _match_header(header, required, optional, path, line)
                if others:
                    expected = {name.lower() for name in (*required, *optional)}
                    for index, cell in enumerate(header):
                        name = cell.strip()
                        if name and name.lower() not in expected:
                            columns.setdefault(name, index)
                needed = 1 + max(columns[name] for name in required)
                continue
            if len(row) > len(header):
                report_row_error(DataError(f"the row has {len(row)} fields but the header has {len(header)}: "
                                           "quote values that contain commas", file=str(path), line=line))
                continue
            if len(row) < needed:
                lacking = next(name for name in required if columns[name] >= len(row))
                report_row_error(DataError(f"the row has {len(row)} field(s) and lacks {lacking!r}: every row "
                                           f"needs {', '.join(required)}", file=str(path), line=line,
                                           field=lacking))
                continue
            yield line, {name: row[index].strip() for name, index in columns.items() if index < len(row)}
    except csv.Error as error:
        raise DataError(f"not readable as CSV ({error})", file=str(path), line=reader.line_num) from None


def _match_header(header: list[str], required: tuple[str, ...], optional: tuple[str, ...], path: Path,
                  line: int) -> dict[str, int]:
    """Map expected column names to positions (case-insensitively), or say what is wrong with the header."""
    found = [cell.strip() for cell in header]
    if len(found) == 1 and len(required) > 1:
        delimiter = next((mark for mark in _OTHER_DELIMITERS if mark in found[0]), None)
        hint = (f"the file seems to use {delimiter!r} as delimiter: save it comma-separated"
                if delimiter else f"expected comma-separated columns {','.join(required)}")
        raise DataError(f"the header has one column ({found[0]!r}); {hint}", file=str(path), line=line)
    positions = {cell.lower(): index for index, cell in reversed(list(enumerate(found)))}
    missing = [name for name in required if name.lower() not in positions]
    if missing:
        hints = []
        for name in missing:
            close = difflib.get_close_matches(name.lower(), list(positions), n=1, cutoff=0.6)
            if close:
                hints.append(f"rename {found[positions[close[0]]]!r} to {name!r}")
        also = f" (optional: {', '.join(optional)})" if optional else ""
        raise DataError(f"missing column {', '.join(repr(name) for name in missing)}: expected "
                        f"{', '.join(required)}{also}; found {', '.join(found)}"
                        + (f"; {'; '.join(hints)}" if hints else ""),
                        file=str(path), line=line, field=missing[0])
    return {name: positions[name.lower()] for name in (*required, *optional) if name.lower() in positions}


def split_lines(path: Path, separator: str, fields: tuple[str, ...],
                 encoding: str) -> Iterator[tuple[int, list[str]]]:
    """Lines of a headerless MovieLens file split on a fixed separator (no quoting in these formats)."""
    describe = f"one line per record: {separator.join(fields)}"
    for line, text in text_lines(path, encoding, describe):
        text = text.rstrip("\r\n")
        if not text.strip():
            continue
        values = text.split(separator)
        if len(values) < len(fields):
            others = [mark for mark in (",", ";", "\t", "|", "::") if mark != separator and mark in text]
            hint = f"; the line seems to use {others[0]!r} instead" if len(values) == 1 and others else ""
            report_row_error(DataError(f"expected {len(fields)} fields separated by {separator!r} "
                                       f"({', '.join(fields)}), found {len(values)}{hint}",
                                       file=str(path), line=line, field=fields[len(values)]))
            continue
        yield line, values


def clean_text(text: str) -> str:
    """A text on one line with single spaces."""
    # Prompts list one item per line: newlines or tabs inside a title would break that layout.
    return " ".join(text.split())


def _selectable(name: str) -> bool:
    """Whether an item-text spec can name this field: not empty, no '+', not a part every dataset has."""
    name = name.strip()
    return bool(name) and PART_SEPARATOR not in name and name not in RESERVED_PARTS


class ItemTable:
    """Items from one file; remembers each item's line so a conflicting duplicate can name both."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.items: dict[str, Item] = {}
        self._lines: dict[str, int] = {}
        self._cut_lines: list[int] = []

    def add(self, item_id: str, title: str, line: int, *, caption: str = "", summary: str = "",
            attributes: Mapping[str, str] | None = None) -> None:
        """One item row; an empty id or title, or a conflicting repeat, is reported with its line.

        `attributes`: the row's other fields (genres, year, brand, ...) for item-text specs; empty values and
        names a spec could not select (empty, with '+', or a reserved part such as title or count) are left out.
        """
        item_id = item_id.strip()
        if not item_id:
            report_row_error(DataError("the item id is empty", file=str(self.path), line=line, field="item_id"))
            return
        title = clean_text(title)
        if not title:
            report_row_error(DataError(f"item {item_id!r} has an empty title: every item needs one",
                                       file=str(self.path), line=line, field="title"))
            return
        if len(title) > MAX_TITLE_CHARS:
            self._cut_lines.append(line)
            title = title[:MAX_TITLE_CHARS]
        existing = self.items.get(item_id)
        if existing is not None:
            if existing.title != title:
                report_row_error(DataError(
                    f"item id {item_id!r} is on line {self._lines[item_id]} with title {existing.title!r} and "
                    f"on line {line} with title {title!r}: keep one row per item",
                    file=str(self.path), line=line, field="item_id"))
            return  # an exact repeat carries no new information
        kept = tuple((name.strip(), clean_text(value)) for name, value in (attributes or {}).items()
                     if _selectable(name) and clean_text(value))
        self.items[item_id] = Item(item_id, title, clean_text(caption), clean_text(summary), kept)
        self._lines[item_id] = line

    def finish(self) -> dict[str, Item]:
        """The items read, once the file is done: cut titles logged, an empty table refused."""
        if self._cut_lines:
            log.warning("%s: cut %d title(s) longer than %d characters (first on line %d)",
                        self.path.name, len(self._cut_lines), MAX_TITLE_CHARS, self._cut_lines[0])
        if not self.items:
            raise DataError("no items: the items file has no rows", file=str(self.path))
        return self.items


class Events:
    """Interactions per user in file order, with validated timestamps converted to seconds."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._by_user: dict[str, list[tuple[float, str]]] = {}
        # Each item's first line, so an item missing from the items file can be found in this one.
        self._first_line: dict[str, int] = {}
        self._item_field = "item_id"

    def add(self, user: str, item: str, when: object, line: int, *, fields: tuple[str, str, str],
            seconds_per_unit: float = 1.0) -> None:
        """One interaction; an empty id or a bad timestamp is reported with its line and field."""
        if not user or not item:
            name = fields[0] if not user else fields[1]
            report_row_error(DataError(f"the {name} is empty", file=str(self.path), line=line, field=name))
            return
        try:
            seconds = unix_seconds(when, seconds_per_unit, self.path, line, fields[2])
        except DataError as error:
            report_row_error(error)
            return
        self._by_user.setdefault(user, []).append((seconds, item))
        self._first_line.setdefault(item, line)
        self._item_field = fields[1]

    @property
    def count(self) -> int:
        """How many interactions are kept."""
        return sum(len(events) for events in self._by_user.values())

    def item_ids(self) -> set[str]:
        """Every item some user interacted with."""
        return {item for events in self._by_user.values() for _, item in events}

    def keep_only(self, items: dict[str, Item]) -> int:
        """Drop interactions with items outside the table; return how many were dropped."""
        before = self.count
        kept = {user: [event for event in events if event[1] in items]
                for user, events in self._by_user.items()}
        self._by_user = {user: events for user, events in kept.items() if events}
        self._first_line = {item: line for item, line in self._first_line.items() if item in items}
        return before - self.count

    def check_items(self, items: dict[str, Item], items_path: Path) -> None:
        """Every interacted item must be in the items file; name the first line that breaks this."""
        unknown = sorted((line, item) for item, line in self._first_line.items() if item not in items)
        if unknown:
            shown = ", ".join(repr(item) for _, item in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
            raise DataError(f"{len(unknown)} interacted item id(s) are not in {items_path.name}: {shown}; add "
                            f"them to {items_path.name} or remove their interactions",
                            file=str(self.path), line=unknown[0][0], field=self._item_field)

    def sequences(self) -> dict[str, list[str]]:
        """Each user's items in time order (file order among equal times); no interactions is an error."""
        if not self._by_user:
            raise DataError("no interactions: the file has no rows", file=str(self.path))
        # sorted() is stable: interactions with equal timestamps keep their file order.
        return {user: [item for _, item in sorted(events, key=lambda event: event[0])]
                for user, events in self._by_user.items()}


def unix_seconds(value: object, seconds_per_unit: float, path: Path, line: int, field: str) -> float:
    """A timestamp as unix seconds, rejecting text, negatives and dates past 2200 (a unit mistake)."""
    try:
        seconds = float(value) * seconds_per_unit  # type: ignore[arg-type]  # bad types are caught
    except (TypeError, ValueError):
        seconds = math.nan
    # NaN fails both comparisons, infinity the second: one test keeps the common path fast.
    if 0 <= seconds < _LATEST_TIMESTAMP and not isinstance(value, bool):
        return seconds
    unit = "seconds" if seconds_per_unit == 1.0 else "milliseconds"
    if not math.isfinite(seconds) or isinstance(value, bool):
        raise DataError(f"timestamp {value!r} is not a number: expected unix time in {unit}",
                        file=str(path), line=line, field=field)
    if seconds < 0:
        raise DataError(f"timestamp {value!r} is negative: expected unix time in {unit}",
                        file=str(path), line=line, field=field)
    hint = " (milliseconds? divide by 1000)" if unit == "seconds" else ""
    raise DataError(f"timestamp {value!r} is after the year 2200 as unix {unit}{hint}",
                    file=str(path), line=line, field=field)


def build_dataset(name: str, table: ItemTable, events: Events) -> Dataset:
    """The Dataset of a finished item table and event list, after checking every interacted item has a row."""
    items = table.finish()
    events.check_items(items, table.path)
    return Dataset(name=name, items=items, sequences=events.sequences(), source=str(events.path))
