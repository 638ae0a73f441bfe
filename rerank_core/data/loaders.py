"""Which loader reads a dataset: a path or a built-in dataset's name in, the format detected from the file names
(or named), a Dataset out; one module per format does the reading."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from rerank_core.data.amazon import JSON_SUFFIXES, load_amazon
from rerank_core.data.builtin import BUILTIN_DATASETS, builtin_dataset_path, bundled_sample_path
from rerank_core.data.csv_pairs import CSV_FILES, load_csv_pair
from rerank_core.data.dataset import DataError, Dataset, collecting_row_errors
from rerank_core.data.movielens import load_movielens_1m, load_movielens_100k, load_movielens_latest_small
from rerank_core.data.reading import folder_of
from rerank_core.data.recbole import RECBOLE_SUFFIXES, load_recbole, recbole_files

__all__ = ["FORMATS", "detect_format", "load", "load_dataset"]

FORMATS = ("bundled", "csv", "ml-100k", "ml-1m", "ml-latest-small", "amazon", "recbole")

# The files that identify each folder format, checked in this order by detect_format.
_SIGNATURES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("csv", CSV_FILES),
    ("ml-100k", ("u.data", "u.item")),
    ("ml-1m", ("ratings.dat", "movies.dat")),
    ("ml-latest-small", ("ratings.csv", "movies.csv")),
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
    # str(): a value from outside (the app's API) may be any JSON value; its refusal below names the format.
    chosen = detect_format(path) if data_format is None else str(data_format).strip().lower()
    loader = _LOADERS.get(chosen)
    if loader is None:
        raise DataError(f"unknown data format {data_format!r}: use one of {', '.join(FORMATS)} "
                        "or leave it empty to detect it")
    with collecting_row_errors():
        return loader(path)


def detect_format(path: Path) -> str:
    """Name the format of a dataset folder from the files it holds, so users need not say it."""
    folder = folder_of(path)
    names = {entry.name for entry in folder.iterdir() if entry.is_file()}
    for data_format, required in _SIGNATURES:
        if all(name in names for name in required):
            return data_format
    if any(name.lower().endswith(JSON_SUFFIXES) for name in names):
        return "amazon"
    if any(name.endswith(RECBOLE_SUFFIXES) for name in names):
        recbole_files(path)  # a lone .inter or .item names the file that is missing
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


_LOADERS: dict[str, Callable[[Path], Dataset]] = {
    "bundled": load_csv_pair,
    "csv": load_csv_pair,
    "ml-100k": load_movielens_100k,
    "ml-1m": load_movielens_1m,
    "ml-latest-small": load_movielens_latest_small,
    "amazon": load_amazon,
    "recbole": load_recbole,
}
