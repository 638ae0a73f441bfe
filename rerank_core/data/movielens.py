"""The three MovieLens releases in their native files (100K, 1M, latest-small): genres become the caption, and
genres and release year are kept as the items' fields for item-text specs."""

from __future__ import annotations

import re
from pathlib import Path

from rerank_core.data.dataset import Dataset
from rerank_core.data.reading import (
    Events,
    ItemTable,
    build_dataset,
    csv_rows,
    folder_of,
    require_files,
    split_lines,
)

__all__ = ["load_movielens_1m", "load_movielens_100k", "load_movielens_latest_small"]

# ml-100k's u.genre order, used when the folder lacks u.genre.
_ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
    "War", "Western",
)


def load_movielens_100k(path: Path) -> Dataset:
    """MovieLens 100K: tab-separated u.data and pipe-separated Latin-1 u.item with genre flags."""
    folder = folder_of(path)
    data_path, item_path = require_files(folder, "u.data", "u.item")
    genre_path = folder / "u.genre"
    genres = list(_ML100K_GENRES)
    if genre_path.is_file():
        genres = [fields[0] for _, fields in split_lines(genre_path, "|", ("genre", "index"), "latin-1")]
    table = ItemTable(item_path)
    for line, fields in split_lines(item_path, "|", ("movie id", "movie title"), "latin-1"):
        flags = fields[5:5 + len(genres)]
        names = [genre for genre, flag in zip(genres, flags, strict=False) if flag.strip() == "1"]
        # The release date is written "01-Jan-1995"; a few movies have none.
        date = fields[2].strip() if len(fields) > 2 else ""
        year = date[-4:] if len(date) >= 4 and date[-4:].isdigit() else ""
        table.add(fields[0], fields[1], line, caption=_genre_caption(names),
                  attributes={"year": year, "genres": _genre_list(names)})
    events = Events(data_path)
    for line, fields in split_lines(data_path, "\t", ("user id", "item id", "rating", "timestamp"),
                                     "latin-1"):
        events.add(fields[0], fields[1], fields[3], line, fields=("user id", "item id", "timestamp"))
    return build_dataset(folder.name, table, events)


def load_movielens_1m(path: Path) -> Dataset:
    """MovieLens 1M: '::'-separated Latin-1 ratings.dat and movies.dat (genres joined by '|')."""
    folder = folder_of(path)
    ratings_path, movies_path = require_files(folder, "ratings.dat", "movies.dat")
    table = ItemTable(movies_path)
    for line, fields in split_lines(movies_path, "::", ("MovieID", "Title", "Genres"), "latin-1"):
        table.add(fields[0], fields[1], line, caption=_genre_caption(fields[2].split("|")),
                  attributes=_title_fields(fields[1], fields[2].split("|")))
    events = Events(ratings_path)
    for line, fields in split_lines(ratings_path, "::", ("UserID", "MovieID", "Rating", "Timestamp"),
                                     "latin-1"):
        events.add(fields[0], fields[1], fields[3], line, fields=("UserID", "MovieID", "Timestamp"))
    return build_dataset(folder.name, table, events)


def load_movielens_latest_small(path: Path) -> Dataset:
    """MovieLens latest-small: UTF-8 ratings.csv and movies.csv (quoted titles may hold commas)."""
    folder = folder_of(path)
    ratings_path, movies_path = require_files(folder, "ratings.csv", "movies.csv")
    table = ItemTable(movies_path)
    for line, row in csv_rows(movies_path, ("movieId", "title"), ("genres",),
                               describe="a header movieId,title,genres and one row per movie"):
        genres = row.get("genres", "").split("|")
        table.add(row["movieId"], row["title"], line, caption=_genre_caption(genres),
                  attributes=_title_fields(row["title"], genres))
    events = Events(ratings_path)
    for line, row in csv_rows(ratings_path, ("userId", "movieId", "timestamp"), (),
                               describe="a header userId,movieId,rating,timestamp and one row per rating"):
        events.add(row["userId"], row["movieId"], row["timestamp"], line,
                   fields=("userId", "movieId", "timestamp"))
    return build_dataset(folder.name, table, events)


# ML-1M and latest-small write the year only in the title: "Toy Story (1995)".
_TITLE_YEAR = re.compile(r"\((\d{4})\)\s*$")


def _genre_list(genres: list[str]) -> str:
    """'Comedy, Drama' from MovieLens genres; placeholders like '(no genres listed)' add nothing."""
    return ", ".join(genre.strip() for genre in genres
                     if genre.strip() and genre.strip().lower() not in ("unknown", "(no genres listed)"))


def _genre_caption(genres: list[str]) -> str:
    """'Comedy, Drama film': the caption MovieLens items have always had."""
    names = _genre_list(genres)
    return f"{names} film" if names else ""


def _title_fields(title: str, genres: list[str]) -> dict[str, str]:
    """The year from the end of a MovieLens title, and the genres: the fields item-text specs can add."""
    year = _TITLE_YEAR.search(title)
    return {"year": year.group(1) if year else "", "genres": _genre_list(genres)}
