"""Every supported format loads from small real-shaped files, and every bad input names file, line, field."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import pytest

from rerank_core.data import loaders, reading
from rerank_core.data.dataset import DataError, DataErrors
from rerank_core.data.loaders import load_dataset


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding))
    return path


def write_jsonl(path: Path, records: list[dict]) -> Path:
    text = "".join(json.dumps(record) + "\n" for record in records)
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(text.encode()))
        return path
    return write(path, text)


ITEMS = "item_id,title,caption,summary\ni1,Alpha,An alpha film,First.\ni2,Beta,,\ni3,Gamma,,\ni4,Delta,,\n"


def csv_pair(folder: Path, interactions: str, items: str = ITEMS) -> Path:
    write(folder / "items.csv", items)
    write(folder / "interactions.csv", interactions)
    return folder


def error_for(folder: Path, data_format: str | None = None) -> DataError:
    with pytest.raises(DataError) as caught:
        loaders.load(folder, data_format)
    return caught.value


# --- formats that load -------------------------------------------------------------------------


def test_csv_pair_sorts_by_time_keeping_ties_and_repeats_in_file_order(tmp_path: Path) -> None:
    folder = csv_pair(tmp_path, "user_id,item_id,timestamp\n"
                                "u1,i3,300\nu1,i1,100\nu2,i2,50\nu1,i2,200\nu1,i4,200\n"
                                "u2,i1,60\nu2,i1,60\nu2,i3,70\n")
    dataset = loaders.load(folder, None)
    assert loaders.detect_format(folder) == "csv"
    assert dataset.users == ["u1", "u2"]
    assert dataset.sequences["u1"] == ["i1", "i2", "i4", "i3"]  # i2 and i4 tie at 200: file order
    assert dataset.sequences["u2"] == ["i2", "i1", "i1", "i3"]  # a repeated interaction is kept
    assert dataset.items["i1"].caption == "An alpha film"
    assert dataset.items["i1"].summary == "First."
    assert dataset.text("i2", "caption") == "Beta"  # empty caption falls back to the title
    assert Path(dataset.source).name == "interactions.csv"


def test_bundled_name_reads_the_csv_pair_without_optional_columns(tmp_path: Path) -> None:
    folder = csv_pair(tmp_path, "user_id,item_id,timestamp\r\nu1,i1,1\r\nu1,i2,2\r\nu1,i3,3\r\n",
                      items="\ufeffItem_ID,Title\r\ni1,One\r\ni2,\"Two, quoted\"\r\ni3,Three\r\n")
    dataset = loaders.load(folder / "items.csv", "bundled")
    assert dataset.sequences == {"u1": ["i1", "i2", "i3"]}
    assert dataset.items["i2"].title == "Two, quoted"


def test_movielens_100k_decodes_latin1_and_genres(tmp_path: Path) -> None:
    flags = ["0"] * 19
    flags[5] = flags[8] = "1"  # Comedy, Drama
    write(tmp_path / "u.item", "1|Café au Lait (1994)|01-Jan-1994||http://x|" + "|".join(flags) + "\n"
          "2|Toy Story (1995)|01-Jan-1995||http://y|" + "|".join(["0"] * 19) + "\n", encoding="latin-1")
    write(tmp_path / "u.data", "7\t2\t5\t881250949\n7\t1\t3\t881250900\n7\t2\t4\t881250999\n9\t1\t4\t1\n")
    dataset = loaders.load(tmp_path, None)
    assert loaders.detect_format(tmp_path) == "ml-100k"
    assert dataset.items["1"].title == "Café au Lait (1994)"
    assert dataset.items["1"].caption == "Comedy, Drama film"
    assert dataset.items["2"].caption == ""
    assert dataset.sequences == {"7": ["1", "2", "2"]}
    assert dataset.short_users == ["9"]  # fewer than 3 interactions: set aside, not an error


def test_movielens_100k_reads_genre_names_from_u_genre(tmp_path: Path) -> None:
    write(tmp_path / "u.genre", "unknown|0\nNoir|1\nWestern|2\n\n")
    write(tmp_path / "u.item", "1|A|d||u|0|1|1\n2|B|d||u|1|0|0\n3|C|d||u|0|0|1\n")
    write(tmp_path / "u.data", "1\t1\t5\t10\n1\t2\t5\t20\n1\t3\t5\t30\n")
    dataset = loaders.load(tmp_path, "ml-100k")
    assert [dataset.items[key].caption for key in "123"] == ["Noir, Western film", "", "Western film"]


def test_movielens_1m_reads_double_colon_latin1_files(tmp_path: Path) -> None:
    write(tmp_path / "movies.dat", "1::Amélie (2001)::Comedy|Romance\n2::Heat (1995)::Action\n"
          "3::Up (2009)::Animation\n", encoding="latin-1")
    write(tmp_path / "ratings.dat", "5::2::4::978300760\n5::1::5::978300700\n5::3::5::978300800\n")
    dataset = loaders.load(tmp_path, None)
    assert loaders.detect_format(tmp_path) == "ml-1m"
    assert dataset.sequences["5"] == ["1", "2", "3"]
    assert dataset.items["1"].title == "Amélie (2001)"
    assert dataset.items["1"].caption == "Comedy, Romance film"


def test_movielens_latest_small_keeps_quoted_commas(tmp_path: Path) -> None:
    write(tmp_path / "movies.csv", 'movieId,title,genres\n1,"American President, The (1995)",Comedy|Drama\n'
          "2,Heat (1995),(no genres listed)\n3,Señor (2000),Drama\n")
    write(tmp_path / "ratings.csv", "userId,movieId,rating,timestamp\n1,3,4.0,30\n1,1,4.0,10\n1,2,3.5,20\n")
    dataset = loaders.load(tmp_path, None)
    assert loaders.detect_format(tmp_path) == "ml-latest-small"
    assert dataset.sequences["1"] == ["1", "2", "3"]
    assert dataset.items["1"].title == "American President, The (1995)"
    assert dataset.items["1"].caption == "Comedy, Drama film"
    assert dataset.items["2"].caption == ""
    assert dataset.items["3"].title == "Señor (2000)"


def test_amazon_2014_gzip_with_python_literal_meta(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "reviews_Beauty_5.json.gz", [
        {"reviewerID": "A1", "asin": "B2", "unixReviewTime": 1400000200, "overall": 5.0},
        {"reviewerID": "A1", "asin": "B1", "unixReviewTime": 1400000100},
        {"reviewerID": "A1", "asin": "B3", "unixReviewTime": 1400000300},
    ])
    meta = ("{'asin': 'B1', 'title': 'Rose Soap &amp; Oil', 'categories': [['Beauty', 'Bath']]}\n"
            "{'asin': 'B2', 'title': 'Lip Balm', 'price': 3.5}\n"
            "{'asin': 'B3', 'title': \"Kid's Shampoo\"}\n{'asin': 'B9', 'title': 'Never reviewed'}\n")
    (tmp_path / "meta_Beauty.json.gz").write_bytes(gzip.compress(meta.encode()))
    dataset = loaders.load(tmp_path, None)
    assert loaders.detect_format(tmp_path) == "amazon"
    assert dataset.sequences == {"A1": ["B1", "B2", "B3"]}
    assert dataset.items["B1"].title == "Rose Soap & Oil"
    assert dataset.items["B1"].caption == "Beauty > Bath"
    assert dataset.items["B3"].title == "Kid's Shampoo"
    assert "B9" not in dataset.items  # only reviewed items join the table
    assert dataset.name == "reviews_Beauty_5"


def test_amazon_2018_json_lines(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "Games_5.json", [
        {"reviewerID": "R", "asin": f"G{n}", "unixReviewTime": 1500000000 - n} for n in range(3)])
    write_jsonl(tmp_path / "meta_Games.json", [
        {"asin": f"G{n}", "title": f"Game {n}", "category": ["Video Games", "PC"]} for n in range(3)])
    dataset = loaders.load(tmp_path / "Games_5.json", None)
    assert dataset.sequences["R"] == ["G2", "G1", "G0"]
    assert dataset.items["G0"].caption == "Video Games > PC"


def test_amazon_2023_converts_milliseconds_and_uses_parent_asin(tmp_path: Path) -> None:
    # 1.7e12 read as seconds would be past 2200 and rejected: loading proves the ms -> s conversion.
    write_jsonl(tmp_path / "All_Beauty.jsonl", [
        {"user_id": "U", "asin": "c1", "parent_asin": "P1", "timestamp": 1700000002000},
        {"user_id": "U", "asin": "c2", "parent_asin": "P2", "timestamp": 1700000001000},
        {"user_id": "U", "asin": "c3", "parent_asin": "P3", "timestamp": 1700000003000},
    ])
    write_jsonl(tmp_path / "meta_All_Beauty.jsonl", [
        {"parent_asin": f"P{n}", "title": f"Cream {n}", "main_category": "All Beauty", "categories": []}
        for n in (1, 2, 3)])
    dataset = loaders.load(tmp_path, "amazon")
    assert dataset.sequences == {"U": ["P2", "P1", "P3"]}
    assert dataset.items["P1"].caption == "All Beauty"


def test_amazon_picks_the_meta_file_named_after_the_reviews(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "Toys.jsonl", [
        {"user_id": "U", "parent_asin": f"T{n}", "timestamp": 1_600_000_000_000 + n} for n in range(3)])
    write_jsonl(tmp_path / "meta_Toys.jsonl",
                [{"parent_asin": f"T{n}", "title": f"Toy {n}"} for n in range(3)])
    write_jsonl(tmp_path / "meta_Books.jsonl", [{"parent_asin": "X", "title": "Book"}])
    write_jsonl(tmp_path / "meta_Toys_and_Games.jsonl", [{"parent_asin": "T0", "title": "Other"}])
    write_jsonl(tmp_path / "Toys_and_Games.jsonl",
                [{"user_id": "U", "parent_asin": "T0", "timestamp": 1}] * 3)
    assert loaders.load(tmp_path / "Toys.jsonl", None).items["T0"].title == "Toy 0"
    # Both meta_Toys and meta_Toys_and_Games match by name: the longer, more specific one wins.
    assert loaders.load(tmp_path / "Toys_and_Games.jsonl", None).items["T0"].title == "Other"
    assert "one Amazon reviews file" in str(error_for(tmp_path))  # the folder holds two reviews files


def test_amazon_drops_untitled_items_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_jsonl(tmp_path / "r.jsonl", [
        {"reviewerID": "A", "asin": f"B{n}", "unixReviewTime": 100 + n} for n in range(4)])
    write_jsonl(tmp_path / "meta.jsonl", [{"asin": "B0", "title": "One"}, {"asin": "B1", "title": "Two"},
                                          {"asin": "B2", "title": "Three"}, {"asin": "B3", "title": ""}])
    with caplog.at_level(logging.WARNING, logger="rerank_core.data.amazon"):
        dataset = loaders.load(tmp_path, None)
    assert dataset.sequences == {"A": ["B0", "B1", "B2"]}
    assert "dropped 1 review" in caplog.text


def test_long_titles_are_cut_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    long_title = "x" * 1500
    folder = csv_pair(tmp_path, "user_id,item_id,timestamp\nu,i1,1\nu,i2,2\nu,i3,3\n",
                      items=f"item_id,title\ni1,{long_title}\ni2,B\ni3,C\n")
    with caplog.at_level(logging.WARNING, logger="rerank_core.data.reading"):
        dataset = loaders.load(folder, None)
    assert dataset.items["i1"].title == "x" * reading.MAX_TITLE_CHARS
    assert "cut 1 title" in caplog.text and "line 2" in caplog.text


def test_identical_duplicate_items_are_accepted(tmp_path: Path) -> None:
    folder = csv_pair(tmp_path, "user_id,item_id,timestamp\nu,i1,1\nu,i2,2\nu,i1,3\n",
                      items="item_id,title\ni1,A\ni2,B\ni1,A\n")
    assert loaders.load(folder, None).sequences["u"] == ["i1", "i2", "i1"]


def test_load_dataset_passes_path_and_format_through(tmp_path: Path) -> None:
    folder = csv_pair(tmp_path, "user_id,item_id,timestamp\nu,i1,1\nu,i2,2\nu,i3,3\n")
    assert load_dataset(str(folder), "csv").sequences == {"u": ["i1", "i2", "i3"]}


# --- bad inputs --------------------------------------------------------------------------------


def test_empty_file(tmp_path: Path) -> None:
    folder = csv_pair(tmp_path, "user_id,item_id,timestamp\nu,i1,1\n", items="\n  \n")
    error = error_for(folder)
    assert Path(error.file).name == "items.csv"
    assert "empty" in str(error) and "item_id,title" in str(error)


def test_header_without_rows(tmp_path: Path) -> None:
    error = error_for(csv_pair(tmp_path, "user_id,item_id,timestamp\n"))
    assert Path(error.file).name == "interactions.csv" and "no interactions" in str(error)


def test_semicolon_delimiter_is_named(tmp_path: Path) -> None:
    error = error_for(csv_pair(tmp_path, "user_id;item_id;timestamp\nu;i1;1\n"))
    assert Path(error.file).name == "interactions.csv" and error.line == 1
    assert "one column" in str(error) and "';'" in str(error)


def test_renamed_column_names_expected_and_found(tmp_path: Path) -> None:
    error = error_for(csv_pair(tmp_path, "user_id,item_id,time\nu,i1,1\n"))
    assert (Path(error.file).name, error.line, error.field) == ("interactions.csv", 1, "timestamp")
    message = str(error)
    assert "expected user_id, item_id, timestamp" in message and "found user_id, item_id, time" in message
    assert "rename 'time' to 'timestamp'" in message


def test_missing_title_column(tmp_path: Path) -> None:
    error = error_for(csv_pair(tmp_path, "user_id,item_id,timestamp\n", items="item_id,name\ni1,A\n"))
    assert (Path(error.file).name, error.field) == ("items.csv", "title")


@pytest.mark.parametrize(("value", "words"), [
    ("yesterday", "not a number"),
    ("nan", "not a number"),
    ("-5", "negative"),
    ("1700000000000", "2200"),
])
def test_bad_timestamps(tmp_path: Path, value: str, words: str) -> None:
    error = error_for(csv_pair(tmp_path, f"user_id,item_id,timestamp\nu,i1,1\nu,i2,{value}\n"))
    assert (Path(error.file).name, error.line, error.field) == ("interactions.csv", 3, "timestamp")
    assert words in str(error)


def test_milliseconds_past_2200_after_conversion(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "r.jsonl", [{"user_id": "U", "parent_asin": "P", "timestamp": 9e15}])
    write_jsonl(tmp_path / "meta.jsonl", [{"parent_asin": "P", "title": "T"}])
    error = error_for(tmp_path)
    assert (Path(error.file).name, error.line, error.field) == ("r.jsonl", 1, "timestamp")
    assert "2200" in str(error) and "milliseconds" in str(error)


def test_duplicate_item_with_another_title_names_both_lines(tmp_path: Path) -> None:
    error = error_for(csv_pair(tmp_path, "user_id,item_id,timestamp\n",
                               items="item_id,title\ni1,A\ni2,B\ni1,Other\n"))
    assert (Path(error.file).name, error.line, error.field) == ("items.csv", 4, "item_id")
    assert "line 2" in str(error) and "'A'" in str(error) and "'Other'" in str(error)


def test_invalid_utf8_names_the_line(tmp_path: Path) -> None:
    write(tmp_path / "interactions.csv", "user_id,item_id,timestamp\n")
    (tmp_path / "items.csv").write_bytes(b"item_id,title\ni1,Fine\ni2,Caf\xe9\n")
    error = error_for(tmp_path)
    assert (Path(error.file).name, error.line) == ("items.csv", 3)
    assert "0xE9" in str(error) and "UTF-8" in str(error)


def test_unquoted_comma_gives_too_many_fields(tmp_path: Path) -> None:
    error = error_for(csv_pair(tmp_path, "user_id,item_id,timestamp\n",
                               items="item_id,title\ni1,Heat, The\n"))
    assert (Path(error.file).name, error.line) == ("items.csv", 2) and "quote" in str(error)


def test_short_row_names_the_missing_field(tmp_path: Path) -> None:
    error = error_for(csv_pair(tmp_path, "user_id,item_id,timestamp\nu,i1\n"))
    assert (error.line, error.field) == (2, "timestamp")


def test_empty_user_id(tmp_path: Path) -> None:
    error = error_for(csv_pair(tmp_path, "user_id,item_id,timestamp\n,i1,5\n"))
    assert (Path(error.file).name, error.line, error.field) == ("interactions.csv", 2, "user_id")


def test_empty_title(tmp_path: Path) -> None:
    error = error_for(csv_pair(tmp_path, "user_id,item_id,timestamp\n", items="item_id,title\ni1,  \n"))
    assert (error.line, error.field) == (2, "title")


def test_unknown_items_are_reported_by_the_dataset(tmp_path: Path) -> None:
    error = error_for(csv_pair(tmp_path, "user_id,item_id,timestamp\nu,i1,1\nu,zz,2\nu,i2,3\n"))
    assert Path(error.file).name == "interactions.csv" and "zz" in str(error)


def test_file_over_the_size_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reading, "MAX_FILE_BYTES", 30)
    error = error_for(csv_pair(tmp_path, "user_id,item_id,timestamp\nu,i1,1\n"))
    assert Path(error.file).name == "items.csv" and "limit" in str(error) and "MAX_FILE_BYTES" in str(error)


def test_gzip_over_the_limit_once_decompressed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_jsonl(tmp_path / "r.jsonl.gz", [{"user_id": "U", "parent_asin": "P", "timestamp": 1}] * 200)
    write_jsonl(tmp_path / "meta.jsonl", [{"parent_asin": "P", "title": "T"}])
    monkeypatch.setattr(reading, "MAX_FILE_BYTES", 2000)
    assert (tmp_path / "r.jsonl.gz").stat().st_size < 2000
    error = error_for(tmp_path)
    assert Path(error.file).name == "r.jsonl.gz" and "limit" in str(error)


def test_movielens_wrong_separator(tmp_path: Path) -> None:
    write(tmp_path / "u.item", "1|A|d||u\n")
    write(tmp_path / "u.data", "1,1,5,881250949\n")
    error = error_for(tmp_path)
    assert (Path(error.file).name, error.line, error.field) == ("u.data", 1, "item id")
    assert "','" in str(error)


def test_amazon_bad_json_line(tmp_path: Path) -> None:
    write(tmp_path / "r.jsonl", '{"user_id": "U", "parent_asin": "P", "timestamp": 1}\n{"user_id": \n')
    write_jsonl(tmp_path / "meta.jsonl", [{"parent_asin": "P", "title": "T"}])
    error = error_for(tmp_path)
    assert (Path(error.file).name, error.line) == ("r.jsonl", 2) and "JSON" in str(error)


def test_amazon_review_missing_a_field(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "r.jsonl", [{"reviewerID": "A", "asin": "B", "unixReviewTime": 1},
                                       {"reviewerID": "A", "unixReviewTime": 2}])
    write_jsonl(tmp_path / "meta.jsonl", [{"asin": "B", "title": "T"}])
    error = error_for(tmp_path)
    assert (error.line, error.field) == (2, "asin")


def test_amazon_unrecognised_record(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "r.jsonl", [{"who": "A"}])
    write_jsonl(tmp_path / "meta.jsonl", [{"asin": "B", "title": "T"}])
    error = error_for(tmp_path)
    assert (error.line, error.field) == (1, "reviewerID") and "user_id/parent_asin/timestamp" in str(error)


def test_amazon_meta_from_another_category(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "r.jsonl", [{"reviewerID": "A", "asin": "B", "unixReviewTime": 1}])
    write_jsonl(tmp_path / "meta.jsonl", [{"asin": "Z", "title": "T"}])
    error = error_for(tmp_path)
    assert Path(error.file).name == "meta.jsonl" and "same category" in str(error)


def test_amazon_without_meta(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "r.jsonl", [{"reviewerID": "A", "asin": "B", "unixReviewTime": 1}])
    assert "no meta file" in str(error_for(tmp_path))


def test_unknown_format_name(tmp_path: Path) -> None:
    assert "ml-100k" in str(error_for(tmp_path, "parquet"))


def test_missing_path(tmp_path: Path) -> None:
    assert "does not exist" in str(error_for(tmp_path / "nowhere"))


def test_undetectable_folder(tmp_path: Path) -> None:
    write(tmp_path / "notes.txt", "hello")
    assert "cannot tell the data format" in str(error_for(tmp_path))


def test_half_a_format(tmp_path: Path) -> None:
    write(tmp_path / "u.data", "1\t1\t5\t1\n")
    error = error_for(tmp_path)
    assert "u.item" in str(error) and "ml-100k" in str(error)


def test_named_format_with_missing_files(tmp_path: Path) -> None:
    write(tmp_path / "items.csv", ITEMS)
    assert "missing ratings.dat, movies.dat" in str(error_for(tmp_path, "ml-1m"))


def test_several_bad_rows_are_reported_together_with_file_line_and_field(tmp_path: Path) -> None:
    rows = "".join(f"u{row},i1,{'soon' if row % 2 else row}\n" for row in range(1, 9))
    error = error_for(csv_pair(tmp_path, "user_id,item_id,timestamp\n" + rows,
                               items="item_id,title\ni1,A\ni2,  \n"))
    assert isinstance(error, DataErrors)
    found = [(Path(item.file).name, item.line, item.field) for item in error.errors]
    # items.csv is read first; every odd user's timestamp is text.
    assert found == [("items.csv", 3, "title"), *(("interactions.csv", line, "timestamp")
                                                  for line in (2, 4, 6, 8))]
    assert (Path(error.file).name, error.line, error.field) == found[0]
    assert str(error).startswith("5 bad rows:") and str(error).count("\n- ") == 5


def test_bad_rows_stop_at_twenty(tmp_path: Path) -> None:
    rows = "".join(f"u{row},i1,never\n" for row in range(100))
    error = error_for(csv_pair(tmp_path, "user_id,item_id,timestamp\n" + rows))
    assert isinstance(error, DataErrors) and len(error.errors) == 20
    assert [item.line for item in error.errors] == list(range(2, 22))
    assert "stopped at the 20th" in str(error)
