"""The generic format (also the bundled sample's): items.csv and interactions.csv, as a spreadsheet saves them."""

from __future__ import annotations

from pathlib import Path

from rerank_core.data.dataset import Dataset
from rerank_core.data.reading import Events, ItemTable, build_dataset, csv_rows, folder_of, require_files

__all__ = ["CSV_FILES", "load_csv_pair"]

CSV_FILES = ("items.csv", "interactions.csv")


def load_csv_pair(path: Path) -> Dataset:
    """Generic (and bundled) format: items.csv item_id,title[,caption,summary] + interactions.csv; any other
    column of items.csv (genres, year, brand, ...) is kept as an item field for item-text specs."""
    folder = folder_of(path)
    items_path, interactions_path = require_files(folder, *CSV_FILES)
    table = ItemTable(items_path)
    texts = ("item_id", "title", "caption", "summary")
    for line, row in csv_rows(items_path, texts[:2], texts[2:], others=True,
                               describe="a header item_id,title,caption,summary and one row per item"):
        table.add(row["item_id"], row["title"], line, caption=row.get("caption", ""),
                  summary=row.get("summary", ""),
                  attributes={name: value for name, value in row.items() if name not in texts})
    events = Events(interactions_path)
    for line, row in csv_rows(interactions_path, ("user_id", "item_id", "timestamp"), (),
                               describe="a header user_id,item_id,timestamp and one row per interaction"):
        events.add(row["user_id"], row["item_id"], row["timestamp"], line,
                   fields=("user_id", "item_id", "timestamp"))
    return build_dataset(folder.name, table, events)
