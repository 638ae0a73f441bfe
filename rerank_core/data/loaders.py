"""Read recommendation datasets from their native files, with errors that point at file, line and field."""

from __future__ import annotations

import ast
import csv
import difflib
import gzip
import html
import json
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rerank_core.data.builtin import BUILTIN_DATASETS, builtin_dataset_path, bundled_sample_path
from rerank_core.data.dataset import DataError, Dataset, Item, collecting_row_errors, report_row_error

__all__ = [
    "FORMATS",
    "MAX_FILE_BYTES",
    "MAX_TITLE_CHARS",
    "detect_format",
    "load",
    "load_amazon",
    "load_csv_pair",
    "load_dataset",
    "load_movielens_1m",
    "load_movielens_100k",
    "load_movielens_latest_small",
    "load_recbole",
]

log = logging.getLogger(__name__)

# Read at call time (not bound as a default argument) so a deployment or a test can change it.
MAX_FILE_BYTES = 200 * 1024**2
MAX_TITLE_CHARS = 1000
# Anything later is a unit mistake (milliseconds or microseconds read as seconds), not a real date.
_LATEST_TIMESTAMP = datetime(2200, 1, 1, tzinfo=UTC).timestamp()

FORMATS = ("bundled", "csv", "ml-100k", "ml-1m", "ml-latest-small", "amazon", "recbole")

# The files that identify each folder format, checked in this order by detect_format.
_SIGNATURES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("csv", ("items.csv", "interactions.csv")),
    ("ml-100k", ("u.data", "u.item")),
    ("ml-1m", ("ratings.dat", "movies.dat")),
    ("ml-latest-small", ("ratings.csv", "movies.csv")),
)
_JSON_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz")
_OTHER_DELIMITERS = (";", "\t", "|")
# ml-100k's u.genre order, used when the folder lacks u.genre.
_ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
    "War", "Western",
)


def load_dataset(path: str | Path | None = None, data_format: str | None = None) -> Dataset:
    """Load a dataset folder or file (the bundled sample when None); the format is detected unless named."""
    return load(bundled_sample_path() if path is None else Path(path), data_format)


def load(path: Path, data_format: str | None = None) -> Dataset:
    """Load a dataset folder (or a file inside it) or a built-in dataset by name (an existing path wins)."""
    path = Path(path)
    if not path.exists() and str(path) in BUILTIN_DATASETS:
        path = builtin_dataset_path(str(path))
    if not path.exists():
        raise DataError(f"{path} does not exist: give a dataset folder or a file inside one, or a built-in "
                        f"dataset's name ({', '.join(BUILTIN_DATASETS)})")
    chosen = detect_format(path) if data_format is None else data_format.strip().lower()
    loader = _LOADERS.get(chosen)
    if loader is None:
        raise DataError(f"unknown data format {data_format!r}: use one of {', '.join(FORMATS)} "
                        "or leave it empty to detect it")
    with collecting_row_errors():
        return loader(path)


def detect_format(path: Path) -> str:
    """Name the format of a dataset folder from the files it holds, so users need not say it."""
    folder = _folder(path)
    names = {entry.name for entry in folder.iterdir() if entry.is_file()}
    for data_format, required in _SIGNATURES:
        if all(name in names for name in required):
            return data_format
    if any(name.lower().endswith(_JSON_SUFFIXES) for name in names):
        return "amazon"
    if any(name.endswith(_RECBOLE_SUFFIXES) for name in names):
        _recbole_files(path)  # a lone .inter or .item names the file that is missing
        return "recbole"
    for data_format, required in _SIGNATURES:
        present = [name for name in required if name in names]
        if present:
            missing = [name for name in required if name not in names]
            raise DataError(f"found {', '.join(present)} but not {', '.join(missing)}: "
                            f"the {data_format} format needs {' and '.join(required)} in the same folder",
                            file=str(folder))
    expected = "; ".join(f"{fmt}: {' + '.join(files)}" for fmt, files in _SIGNATURES)
    raise DataError(f"cannot tell the data format: expected one of {expected}; amazon: a reviews "
                    "*.jsonl/*.json(.gz) file and a meta_* file; recbole: <name>.inter + <name>.item",
                    file=str(folder))


def load_csv_pair(path: Path) -> Dataset:
    """Generic (and bundled) format: items.csv item_id,title[,caption,summary] + interactions.csv."""
    folder = _folder(path)
    items_path, interactions_path = _require_files(folder, "items.csv", "interactions.csv")
    table = _ItemTable(items_path)
    for line, row in _csv_rows(items_path, ("item_id", "title"), ("caption", "summary"),
                               describe="a header item_id,title,caption,summary and one row per item"):
        table.add(row["item_id"], row["title"], line, caption=row.get("caption", ""),
                  summary=row.get("summary", ""))
    events = _Events(interactions_path)
    for line, row in _csv_rows(interactions_path, ("user_id", "item_id", "timestamp"), (),
                               describe="a header user_id,item_id,timestamp and one row per interaction"):
        events.add(row["user_id"], row["item_id"], row["timestamp"], line,
                   fields=("user_id", "item_id", "timestamp"))
    return _dataset(folder.name, table, events)


def load_movielens_100k(path: Path) -> Dataset:
    """MovieLens 100K: tab-separated u.data and pipe-separated Latin-1 u.item with genre flags."""
    folder = _folder(path)
    data_path, item_path = _require_files(folder, "u.data", "u.item")
    genre_path = folder / "u.genre"
    genres = list(_ML100K_GENRES)
    if genre_path.is_file():
        genres = [fields[0] for _, fields in _split_lines(genre_path, "|", ("genre", "index"), "latin-1")]
    table = _ItemTable(item_path)
    for line, fields in _split_lines(item_path, "|", ("movie id", "movie title"), "latin-1"):
        flags = fields[5:5 + len(genres)]
        names = [genre for genre, flag in zip(genres, flags, strict=False) if flag.strip() == "1"]
        table.add(fields[0], fields[1], line, caption=_genre_caption(names))
    events = _Events(data_path)
    for line, fields in _split_lines(data_path, "\t", ("user id", "item id", "rating", "timestamp"),
                                     "latin-1"):
        events.add(fields[0], fields[1], fields[3], line, fields=("user id", "item id", "timestamp"))
    return _dataset(folder.name, table, events)


def load_movielens_1m(path: Path) -> Dataset:
    """MovieLens 1M: '::'-separated Latin-1 ratings.dat and movies.dat (genres joined by '|')."""
    folder = _folder(path)
    ratings_path, movies_path = _require_files(folder, "ratings.dat", "movies.dat")
    table = _ItemTable(movies_path)
    for line, fields in _split_lines(movies_path, "::", ("MovieID", "Title", "Genres"), "latin-1"):
        table.add(fields[0], fields[1], line, caption=_genre_caption(fields[2].split("|")))
    events = _Events(ratings_path)
    for line, fields in _split_lines(ratings_path, "::", ("UserID", "MovieID", "Rating", "Timestamp"),
                                     "latin-1"):
        events.add(fields[0], fields[1], fields[3], line, fields=("UserID", "MovieID", "Timestamp"))
    return _dataset(folder.name, table, events)


def load_movielens_latest_small(path: Path) -> Dataset:
    """MovieLens latest-small: UTF-8 ratings.csv and movies.csv (quoted titles may hold commas)."""
    folder = _folder(path)
    ratings_path, movies_path = _require_files(folder, "ratings.csv", "movies.csv")
    table = _ItemTable(movies_path)
    for line, row in _csv_rows(movies_path, ("movieId", "title"), ("genres",),
                               describe="a header movieId,title,genres and one row per movie"):
        table.add(row["movieId"], row["title"], line,
                  caption=_genre_caption(row.get("genres", "").split("|")))
    events = _Events(ratings_path)
    for line, row in _csv_rows(ratings_path, ("userId", "movieId", "timestamp"), (),
                               describe="a header userId,movieId,rating,timestamp and one row per rating"):
        events.add(row["userId"], row["movieId"], row["timestamp"], line,
                   fields=("userId", "movieId", "timestamp"))
    return _dataset(folder.name, table, events)


@dataclass(frozen=True)
class _ReviewSchema:
    """Where one Amazon release keeps the user, item and time of a review."""

    release: str
    user: str
    item: str
    time: str
    seconds_per_unit: float


_REVIEW_SCHEMAS = (
    _ReviewSchema("2014/2018", "reviewerID", "asin", "unixReviewTime", 1.0),
    _ReviewSchema("2023", "user_id", "parent_asin", "timestamp", 0.001),
)


def load_amazon(path: Path) -> Dataset:
    """Amazon reviews (2014/2018 or 2023 JSON lines, optionally .gz) with titles from the meta file."""
    reviews_path, meta_path = _amazon_files(path)
    events = _Events(reviews_path)
    schema: _ReviewSchema | None = None
    for line, record in _json_records(reviews_path):
        if schema is None:
            schema = _review_schema(record, reviews_path, line)
        values = []
        for key in (schema.user, schema.item, schema.time):
            if record.get(key) in (None, ""):
                report_row_error(DataError(f"the review has no {key!r} (Amazon {schema.release} reviews need "
                                           f"{schema.user}, {schema.item} and {schema.time})",
                                           file=str(reviews_path), line=line, field=key))
                break
            values.append(record[key])
        if len(values) < 3:
            continue
        user, item, when = values
        events.add(str(user), str(item), when, line, fields=(schema.user, schema.item, schema.time),
                   seconds_per_unit=schema.seconds_per_unit)
    reviewed = events.item_ids()
    table = _ItemTable(meta_path)
    untitled = 0
    for line, record in _json_records(meta_path):
        # 2023 meta is keyed by parent_asin (the reviews' item), older releases by asin.
        key = "parent_asin" if "parent_asin" in record else "asin"
        item_id = str(record.get(key) or "")
        if item_id not in reviewed:
            continue
        title = record.get("title")
        if not isinstance(title, str) or not title.strip():
            untitled += 1
            continue
        table.add(item_id, html.unescape(title), line, caption=_amazon_caption(record))
    # Like LlamaRec's preprocessing, items without a title are dropped with their reviews.
    dropped = events.keep_only(table.items)
    if not events.count:
        raise DataError(f"none of the {len(reviewed)} reviewed items has a title in {meta_path.name}: "
                        "is the meta file from the same category and release as the reviews?",
                        file=str(meta_path), field="title")
    if dropped:
        log.warning("%s: dropped %d review(s) of %d item(s) without a title in %s (%d meta record(s) "
                    "had an empty title)", reviews_path.name, dropped, len(reviewed) - len(table.items),
                    meta_path.name, untitled)
    name = reviews_path.name.split(".")[0]
    return _dataset(name, table, events)


def _review_schema(record: dict[str, Any], path: Path, line: int) -> _ReviewSchema:
    for schema in _REVIEW_SCHEMAS:
        if schema.user in record:
            return schema
    expected = " or ".join(f"{s.user}/{s.item}/{s.time} ({s.release})" for s in _REVIEW_SCHEMAS)
    raise DataError(f"not an Amazon review: expected the fields {expected}; found "
                    f"{', '.join(sorted(record)) or 'no fields'}", file=str(path), line=line,
                    field=_REVIEW_SCHEMAS[0].user)


def _amazon_caption(record: dict[str, Any]) -> str:
    """The category path as a short caption: 2014 nests lists, 2018 says category, 2023 categories."""
    categories = record.get("categories") or record.get("category") or []
    if isinstance(categories, list) and categories and isinstance(categories[0], list):
        categories = categories[0]
    if not isinstance(categories, list):
        categories = []
    names = [html.unescape(name) for name in categories if isinstance(name, str) and name.strip()]
    if not names and isinstance(record.get("main_category"), str):
        names = [record["main_category"]]
    return " > ".join(names)


def _amazon_files(path: Path) -> tuple[Path, Path]:
    """Pair a reviews file with its meta file: the given file, or the only pair in the folder."""
    folder = _folder(path)
    json_files = sorted(entry for entry in folder.iterdir()
                        if entry.is_file() and entry.name.lower().endswith(_JSON_SUFFIXES))
    metas = [entry for entry in json_files if entry.name.lower().startswith("meta")]
    if path.is_file():
        if path.name in {meta.name for meta in metas}:
            raise DataError("this is a meta file: give the reviews file (or the folder) instead",
                            file=str(path))
        reviews = [path]
    else:
        reviews = [entry for entry in json_files if entry not in metas]
    if len(reviews) != 1:
        found = ", ".join(entry.name for entry in reviews) or "none"
        raise DataError(f"expected one Amazon reviews file (*.jsonl, *.json, optionally .gz) in the "
                        f"folder, found {found}: give the reviews file itself", file=str(folder))
    if not metas:
        raise DataError("no meta file (meta*.jsonl or meta*.json, optionally .gz) beside the reviews: "
                        "titles come from it", file=str(folder))
    if len(metas) > 1:
        # meta_Beauty.json.gz belongs to reviews_Beauty_5.json.gz / Beauty_5.json.gz / Beauty.jsonl;
        # the longest matching category wins, so All_Beauty.jsonl takes meta_All_Beauty over meta_Beauty.
        named = [meta for meta in metas if _amazon_category(meta) in reviews[0].name.lower()]
        longest = max((len(_amazon_category(meta)) for meta in named), default=0)
        metas = [meta for meta in named if len(_amazon_category(meta)) == longest] or metas
    if len(metas) != 1:
        raise DataError(f"several meta files ({', '.join(meta.name for meta in metas)}) and none is "
                        f"named after {reviews[0].name}: keep only the matching one", file=str(folder))
    return reviews[0], metas[0]


def _amazon_category(meta: Path) -> str:
    """'meta_All_Beauty.jsonl.gz' -> 'all_beauty'."""
    stem = meta.name.lower().removesuffix(".gz").removesuffix(".jsonl").removesuffix(".json")
    return stem.removeprefix("meta").lstrip("_-")


# RecBole atomic files: tab-separated, a typed header ("user_id:token"), token_seq values split on spaces.
_RECBOLE_SUFFIXES = (".inter", ".item")
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
    caption: the genre/category column joined by commas; summary: "title (year) [genres]".
    """
    inter_path, item_path = _recbole_files(path)
    table = _ItemTable(item_path)
    columns: dict[str, str] = {}
    for line, row in _recbole_rows(item_path, ("item_id",)):
        if not columns:
            columns = _recbole_text_columns(row, item_path)
        title = row[columns["title"]]
        if not title.strip():
            report_row_error(DataError(f"item {row['item_id']!r} has an empty {columns['title']}: every item "
                                       "needs a title", file=str(item_path), line=line, field=columns["title"]))
            continue
        year = row.get(columns.get("year", ""), "").strip()
        if len(year) == 4 and year.isdigit():
            title = f"{_clean_text(title)} ({year})"
        genres = ", ".join(row.get(columns.get("genre", ""), "").split())
        table.add(row["item_id"], title, line, caption=genres,
                  summary=f"{_clean_text(title)} [{genres}]" if genres else "")
    events = _Events(inter_path)
    for line, row in _recbole_rows(inter_path, _RECBOLE_INTER_FIELDS):
        events.add(row["user_id"], row["item_id"], row["timestamp"], line, fields=_RECBOLE_INTER_FIELDS)
    return _dataset(inter_path.stem, table, events)


def _recbole_files(path: Path) -> tuple[Path, Path]:
    """<name>.inter and <name>.item: named by the given file, or the only pair (or the folder's name) in it."""
    folder = _folder(path)
    if path.is_file():
        stems = [path.stem]
    else:
        stems = sorted({entry.stem for entry in folder.iterdir()
                        if entry.is_file() and entry.suffix in _RECBOLE_SUFFIXES})
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


def _recbole_rows(path: Path, required: tuple[str, ...]) -> Iterator[tuple[int, dict[str, str]]]:
    """Rows of a tab-separated atomic file keyed by field name (the header's types stripped)."""
    names: list[str] = []
    for line, text in _text_lines(path, "utf-8", "a typed header such as user_id:token and one row per record"):
        text = text.rstrip("\r\n")
        if not text.strip():
            continue
        values = text.split("\t")
        if not names:
            names = _recbole_header(values, required, path, line)
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


def _folder(path: Path) -> Path:
    return path if path.is_dir() else path.parent


def _require_files(folder: Path, *names: str) -> list[Path]:
    paths = [folder / name for name in names]
    missing = [path.name for path in paths if not path.is_file()]
    if missing:
        raise DataError(f"missing {', '.join(missing)}: this format needs {' and '.join(names)} "
                        "in the same folder", file=str(folder))
    return paths


def _check_size(path: Path, size: int) -> None:
    if size > MAX_FILE_BYTES:
        raise DataError(f"the file is larger than the {MAX_FILE_BYTES / 1024**2:g} MiB limit "
                        "(MAX_FILE_BYTES in rerank_core.data.loaders): use a subset, e.g. one category or "
                        "a sample of users", file=str(path))


def _text_lines(path: Path, encoding: str, describe: str) -> Iterator[tuple[int, str]]:
    """Decoded lines with 1-based numbers; bad bytes and empty files raise a DataError."""
    _check_size(path, path.stat().st_size)
    compressed = path.name.lower().endswith(".gz")
    size = 0
    seen_text = False
    try:
        with gzip.open(path, "rb") if compressed else path.open("rb") as stream:
            for number, raw in enumerate(stream, 1):
                if compressed:  # so a small .gz cannot expand past the limit
                    size += len(raw)
                    _check_size(path, size)
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


def _csv_rows(path: Path, required: tuple[str, ...], optional: tuple[str, ...],
              describe: str) -> Iterator[tuple[int, dict[str, str]]]:
    """Rows of a comma-separated file with a header, keyed by the expected column names."""
    reader = csv.reader(text for _, text in _text_lines(path, "utf-8", describe))
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


def _split_lines(path: Path, separator: str, fields: tuple[str, ...],
                 encoding: str) -> Iterator[tuple[int, list[str]]]:
    """Lines of a headerless MovieLens file split on a fixed separator (no quoting in these formats)."""
    describe = f"one line per record: {separator.join(fields)}"
    for line, text in _text_lines(path, encoding, describe):
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


def _json_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """One object per line; 2014 Amazon meta files hold Python dict literals instead of JSON."""
    for line, text in _text_lines(path, "utf-8", "one JSON object per line"):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as error:
            try:
                record = ast.literal_eval(text.strip())
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                report_row_error(DataError(f"not a JSON object ({error.msg} at column {error.colno}): the "
                                           "file needs one JSON object per line", file=str(path), line=line))
                continue
        if not isinstance(record, dict):
            report_row_error(DataError(f"expected one JSON object per line, found a {type(record).__name__}",
                                       file=str(path), line=line))
            continue
        yield line, record


def _genre_caption(genres: list[str]) -> str:
    """'Comedy, Drama film' from MovieLens genres; placeholders like '(no genres listed)' add nothing."""
    names = [genre.strip() for genre in genres
             if genre.strip() and genre.strip().lower() not in ("unknown", "(no genres listed)")]
    return f"{', '.join(names)} film" if names else ""


def _clean_text(text: str) -> str:
    # Prompts list one item per line: newlines or tabs inside a title would break that layout.
    return " ".join(text.split())


class _ItemTable:
    """Items from one file; remembers each item's line so a conflicting duplicate can name both."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.items: dict[str, Item] = {}
        self._lines: dict[str, int] = {}
        self._cut_lines: list[int] = []

    def add(self, item_id: str, title: str, line: int, *, caption: str = "", summary: str = "") -> None:
        item_id = item_id.strip()
        if not item_id:
            report_row_error(DataError("the item id is empty", file=str(self.path), line=line, field="item_id"))
            return
        title = _clean_text(title)
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
        self.items[item_id] = Item(item_id, title, _clean_text(caption), _clean_text(summary))
        self._lines[item_id] = line

    def finish(self) -> dict[str, Item]:
        if self._cut_lines:
            log.warning("%s: cut %d title(s) longer than %d characters (first on line %d)",
                        self.path.name, len(self._cut_lines), MAX_TITLE_CHARS, self._cut_lines[0])
        if not self.items:
            raise DataError("no items: the items file has no rows", file=str(self.path))
        return self.items


class _Events:
    """Interactions per user in file order, with validated timestamps converted to seconds."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._by_user: dict[str, list[tuple[float, str]]] = {}
        # Each item's first line, so an item missing from the items file can be found in this one.
        self._first_line: dict[str, int] = {}
        self._item_field = "item_id"

    def add(self, user: str, item: str, when: object, line: int, *, fields: tuple[str, str, str],
            seconds_per_unit: float = 1.0) -> None:
        if not user or not item:
            name = fields[0] if not user else fields[1]
            report_row_error(DataError(f"the {name} is empty", file=str(self.path), line=line, field=name))
            return
        try:
            seconds = _seconds(when, seconds_per_unit, self.path, line, fields[2])
        except DataError as error:
            report_row_error(error)
            return
        self._by_user.setdefault(user, []).append((seconds, item))
        self._first_line.setdefault(item, line)
        self._item_field = fields[1]

    @property
    def count(self) -> int:
        return sum(len(events) for events in self._by_user.values())

    def item_ids(self) -> set[str]:
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
        if not self._by_user:
            raise DataError("no interactions: the file has no rows", file=str(self.path))
        # sorted() is stable: interactions with equal timestamps keep their file order.
        return {user: [item for _, item in sorted(events, key=lambda event: event[0])]
                for user, events in self._by_user.items()}


def _seconds(value: object, seconds_per_unit: float, path: Path, line: int, field: str) -> float:
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


def _dataset(name: str, table: _ItemTable, events: _Events) -> Dataset:
    items = table.finish()
    events.check_items(items, table.path)
    return Dataset(name=name, items=items, sequences=events.sequences(), source=str(events.path))


_LOADERS: dict[str, Callable[[Path], Dataset]] = {
    "bundled": load_csv_pair,
    "csv": load_csv_pair,
    "ml-100k": load_movielens_100k,
    "ml-1m": load_movielens_1m,
    "ml-latest-small": load_movielens_latest_small,
    "amazon": load_amazon,
    "recbole": load_recbole,
}
