"""Amazon reviews (2014/2018 and 2023 releases, JSON lines, optionally gzipped) with titles from the meta file,
and its category, brand and price as the items' fields for item-text specs."""

from __future__ import annotations

import ast
import html
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rerank_core.data.dataset import DataError, Dataset, report_row_error
from rerank_core.data.reading import Events, ItemTable, build_dataset, folder_of, text_lines

__all__ = ["JSON_SUFFIXES", "load_amazon"]

log = logging.getLogger(__name__)

JSON_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz")


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
    events = Events(reviews_path)
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
    table = ItemTable(meta_path)
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
        caption = _amazon_caption(record)
        table.add(item_id, html.unescape(title), line, caption=caption,
                  attributes={"category": caption, "brand": _amazon_brand(record), "price": _amazon_price(record)})
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
    return build_dataset(name, table, events)


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


def _amazon_brand(record: dict[str, Any]) -> str:
    """2014/2018 meta say brand; 2023 meta put it in details["Brand"] or name the store."""
    details = record.get("details")
    for value in (record.get("brand"), details.get("Brand") if isinstance(details, dict) else None,
                  record.get("store")):
        if isinstance(value, str) and value.strip():
            return html.unescape(value)
    return ""


def _amazon_price(record: dict[str, Any]) -> str:
    """'$12.99' from a number (2014, 2023) or text such as '$1,299.00' (2018); ranges, blanks and the page
    fragments some 2018 records hold instead are left out."""
    value = record.get("price")
    if isinstance(value, bool) or value is None:
        return ""
    try:
        price = float(value.replace("$", "").replace(",", "").strip()) if isinstance(value, str) else float(value)
    except (TypeError, ValueError):
        return ""
    return f"${price:.2f}" if math.isfinite(price) and price >= 0 else ""


def _amazon_files(path: Path) -> tuple[Path, Path]:
    """Pair a reviews file with its meta file: the given file, or the only pair in the folder."""
    folder = folder_of(path)
    json_files = sorted(entry for entry in folder.iterdir()
                        if entry.is_file() and entry.name.lower().endswith(JSON_SUFFIXES))
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


def _json_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """One object per line; 2014 Amazon meta files hold Python dict literals instead of JSON."""
    for line, text in text_lines(path, "utf-8", "one JSON object per line"):
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
