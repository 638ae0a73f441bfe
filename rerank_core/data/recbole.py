"""RecBole atomic files (<name>.inter + <name>.item): how the recbole package ships real MovieLens 100K and
how RecBole's converted datasets (Amazon, Yelp, Steam, ...) come."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from rerank_core.data.dataset import DataError, Dataset, report_row_error
from rerank_core.data.reading import Events, ItemTable, build_dataset, clean_text, folder_of, text_lines

__all__ = ["RECBOLE_SUFFIXES", "load_recbole", "recbole_files"]

# RecBole atomic files: tab-separated, a typed header ("user_id:token"), token_seq values split on spaces.
RECBOLE_SUFFIXES = (".inter", ".item")
_RECBOLE_TYPES = ("token", "token_seq", "float", "float_seq")
_RECBOLE_INTER_FIELDS = ("user_id", "item_id", "timestamp")
# The item file's text columns, in order of preference, as RecBole's converted datasets name them
# (MovieLens movie_title, Amazon title, Yelp item_name, Steam app_name, ...).
_RECBOLE_TITLE_FIELDS = ("title", "movie_title", "item_name", "name", "app_name", "book_title", "product_name")
_RECBOLE_YEAR_FIELDS = ("release_year", "year")
_RECBOLE_GENRE_FIELDS = ("class", "genre", "genres", "categories", "category")


def load_recbole(path: Path) -> Dataset:
    """RecBole atomic files <name>.inter + <name>.item; title (with the year), genres as caption, both as summary.

    title: the title-like column, with a four-digit release year appended as "(1995)" as MovieLens writes it;
    caption: the genre/category column joined by commas; summary: "title (year) [genres]". Every other token,
    token_seq or float column (ml-100k: release_year, class) is kept as an item field for item-text specs,
    token_seq values joined by commas.
    """
    inter_path, item_path = recbole_files(path)
    table = ItemTable(item_path)
    columns: dict[str, str] = {}
    kinds: dict[str, str] = {}
    for line, row in _recbole_rows(item_path, ("item_id",), kinds):
        if not columns:
            columns = _recbole_text_columns(row, item_path)
        title = row[columns["title"]]
        if not title.strip():
            report_row_error(DataError(f"item {row['item_id']!r} has an empty {columns['title']}: every item "
                                       "needs a title", file=str(item_path), line=line, field=columns["title"]))
            continue
        year = row.get(columns.get("year", ""), "").strip()
        if len(year) == 4 and year.isdigit():
            title = f"{clean_text(title)} ({year})"
        genres = ", ".join(row.get(columns.get("genre", ""), "").split())
        table.add(row["item_id"], title, line, caption=genres,
                  summary=f"{clean_text(title)} [{genres}]" if genres else "",
                  attributes=_recbole_fields(row, kinds, columns["title"]))
    events = Events(inter_path)
    for line, row in _recbole_rows(inter_path, _RECBOLE_INTER_FIELDS):
        events.add(row["user_id"], row["item_id"], row["timestamp"], line, fields=_RECBOLE_INTER_FIELDS)
    return build_dataset(inter_path.stem, table, events)


def recbole_files(path: Path) -> tuple[Path, Path]:
    """<name>.inter and <name>.item: named by the given file, or the only pair (or the folder's name) in it."""
    folder = folder_of(path)
    if path.is_file():
        stems = [path.stem]
    else:
        stems = sorted({entry.stem for entry in folder.iterdir()
                        if entry.is_file() and entry.suffix in RECBOLE_SUFFIXES})
        if len(stems) > 1 and folder.name in stems:
            stems = [folder.name]  # RecBole's own layout: dataset/ml-100k/ml-100k.inter
    if len(stems) != 1:
        raise DataError(f"several RecBole datasets in one folder ({', '.join(stems)}): give one of their "
                        ".inter files, or the folder named after it", file=str(folder))
    inter_path, item_path = folder / f"{stems[0]}.inter", folder / f"{stems[0]}.item"
    missing = [candidate.name for candidate in (inter_path, item_path) if not candidate.is_file()]
    if missing:
        raise DataError(f"missing {' and '.join(missing)}: RecBole atomic files need {inter_path.name} "
                        f"(interactions) and {item_path.name} (item texts) in the same folder", file=str(folder))
    return inter_path, item_path


def _recbole_fields(row: dict[str, str], kinds: dict[str, str], title_column: str) -> dict[str, str]:
    """The row's token, token_seq and float fields besides the id and the title (float_seq, e.g. embeddings,
    is no text)."""
    return {name: ", ".join(value.split()) if kinds[name] == "token_seq" else value.strip()
            for name, value in row.items()
            if name not in ("item_id", title_column) and kinds[name] in ("token", "token_seq", "float")}


def _recbole_rows(path: Path, required: tuple[str, ...],
                  kinds: dict[str, str] | None = None) -> Iterator[tuple[int, dict[str, str]]]:
    """Rows of a tab-separated atomic file keyed by field name (the header's types stripped, put in `kinds`)."""
    names: list[str] = []
    for line, text in text_lines(path, "utf-8", "a typed header such as user_id:token and one row per record"):
        text = text.rstrip("\r\n")
        if not text.strip():
            continue
        values = text.split("\t")
        if not names:
            names = _recbole_header(values, required, path, line)
            if kinds is not None:
                kinds.update(cell.strip().split(":", 1) for cell in values)  # checked as name:type above
            continue
        if len(values) != len(names):
            short = len(values) < len(names)
            report_row_error(DataError(
                f"the row has {len(values)} tab-separated field(s) but the header has {len(names)}"
                + (f": {names[len(values)]!r} is missing" if short else ""),
                file=str(path), line=line, field=names[len(values)] if short else None))
            continue
        yield line, dict(zip(names, values, strict=True))


def _recbole_header(cells: list[str], required: tuple[str, ...], path: Path, line: int) -> list[str]:
    """Field names from a typed header, after checking every cell is name:type and the required ones exist."""
    if len(cells) == 1 and len(required) > 1:
        delimiter = next((mark for mark in (",", ";", "|", " ") if mark in cells[0].strip()), None)
        if delimiter is not None:
            raise DataError(f"the header is one cell ({cells[0].strip()!r}) that seems to use {delimiter!r} as "
                            "delimiter: RecBole atomic files are tab-separated", file=str(path), line=line)
    names = []
    for cell in cells:
        name, colon, kind = cell.strip().partition(":")
        if not colon or not name or kind not in _RECBOLE_TYPES:
            raise DataError(f"header cell {cell.strip()!r} is not a typed RecBole field name:type with type one "
                            f"of {', '.join(_RECBOLE_TYPES)} (e.g. user_id:token); cells are tab-separated",
                            file=str(path), line=line, field=name or cell.strip())
        names.append(name)
    missing = [name for name in required if name not in names]
    if missing:
        raise DataError(f"missing field {', '.join(repr(name) for name in missing)}: {path.suffix} files need "
                        f"{', '.join(f'{name}:...' for name in required)}; found {', '.join(cells)}",
                        file=str(path), line=line, field=missing[0])
    return names


def _recbole_text_columns(row: dict[str, str], path: Path) -> dict[str, str]:
    """Which item columns give the title, the year and the genres (the first found of each known name)."""
    chosen = {}
    for role, known in (("title", _RECBOLE_TITLE_FIELDS), ("year", _RECBOLE_YEAR_FIELDS),
                        ("genre", _RECBOLE_GENRE_FIELDS)):
        found = next((name for name in known if name in row), None)
        if found is not None:
            chosen[role] = found
    if "title" not in chosen:
        raise DataError(f"no title column: the item file needs one of {', '.join(_RECBOLE_TITLE_FIELDS)} "
                        f"(found {', '.join(row)})", file=str(path), line=1, field="title")
    return chosen
