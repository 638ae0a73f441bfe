"""Item texts from the data's own fields: the spec parsed and checked in one place, the loaders keeping the fields,
the count never seeing held-out items, and what a spec costs in prompt tokens before a run."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import make_toy_dataset

from rerank_core.cli.main import build_parser, main
from rerank_core.data import loaders
from rerank_core.data.dataset import Dataset, Item
from rerank_core.data.item_text import MAX_SPEC_CHARS, TEXT_FIELDS, item_text_choices
from rerank_core.inspector import InspectSettings
from rerank_core.training.config import TRAINING_PRESETS, training_config
from rerank_core.training.samples import item_text_cost, size_prompt_budget


def film_dataset() -> Dataset:
    """Three films; u1 and u2 watch Star Wars in their training parts, u3 only as its test item."""
    items = {
        "sw": Item("sw", "Star Wars (1977)", caption="Action, Sci-Fi film", summary="Star Wars (1977) [Action]",
                   attributes=(("year", "1977"), ("genres", "Action, Sci-Fi"))),
        "fa": Item("fa", "Fargo", attributes=(("year", "1996"), ("genres", "Crime"), ("brand", "Gramercy"))),
        "zz": Item("zz", "Untitled"),
        "x1": Item("x1", "Filler 1"), "x2": Item("x2", "Filler 2"), "x3": Item("x3", "Filler 3"),
    }
    sequences = {"u1": ["sw", "fa", "x1", "x2"], "u2": ["x1", "sw", "x2", "x3"], "u3": ["x1", "x2", "fa", "sw"]}
    return Dataset("films", items, sequences)


# --- the spec ---------------------------------------------------------------------------------


def test_a_spec_renders_its_parts_compactly_without_repeating_the_year() -> None:
    dataset = film_dataset()
    assert dataset.item_fields == ("year", "genres", "brand")
    # Star Wars is in u1's and u2's training parts; u3's test item is not counted.
    assert dataset.text("sw", "title+year+genres+count") == "Star Wars (1977) | Action, Sci-Fi | 2"
    assert dataset.text("fa", "title+year+genres+count") == "Fargo (1996) | Crime | 1"  # the year written once
    assert dataset.text("fa", "genres+brand") == "Crime | Gramercy"
    assert dataset.text("fa", "year") == "1996"  # without the title a year is its own part
    assert dataset.text("zz", "title+genres+count") == "Untitled | 0"  # a field an item lacks is left out
    assert dataset.text("zz", "genres") == "Untitled"  # never an empty text: the title
    assert dataset.text("fa", " title + count ") == dataset.text("fa", "title+count") == "Fargo | 1"


def test_the_named_texts_keep_their_text_byte_for_byte() -> None:
    dataset = film_dataset()
    expected = {
        "title": ["Star Wars (1977)", "Fargo", "Untitled"],
        "caption": ["Action, Sci-Fi film", "Fargo", "Untitled"],  # an empty caption falls back to the title
        "summary": ["Star Wars (1977) [Action]", "Fargo", "Untitled"],
        "title_count": ["Star Wars (1977), 2 interactions", "Fargo, 1 interactions", "Untitled, 0 interactions"],
    }
    assert {name: [dataset.text(item, name) for item in ("sw", "fa", "zz")] for name in TEXT_FIELDS} == expected


@pytest.mark.parametrize(("spec", "says"), [
    ("title+plot", "unknown part 'plot'"),
    ("plot", "text field 'plot': unknown part 'plot'"),
    ("title++count", "empty part"),
    ("title+count+title", "'title' twice"),
    ("", "text field is empty"),
    ("t" * (MAX_SPEC_CHARS + 1), f"at most {MAX_SPEC_CHARS}"),
])
def test_a_bad_spec_is_one_error_naming_the_part_and_the_fields(spec: str, says: str) -> None:
    with pytest.raises(ValueError, match=says) as caught:
        film_dataset().text("sw", spec)
    if "unknown" in says:
        assert "this dataset's fields (year, genres, brand)" in str(caught.value)
        assert "title_count" in str(caught.value)


def test_a_spec_of_one_dataset_is_refused_on_another_without_that_field() -> None:
    with pytest.raises(ValueError, match=r"unknown part 'year'.*fields \(none\)"):
        make_toy_dataset().text("i000", "title+year")


def test_pickers_offer_the_named_texts_the_fields_and_all_of_them() -> None:
    assert item_text_choices(film_dataset().item_fields) == [
        *TEXT_FIELDS, "year", "genres", "brand", "title+count", "title+year+genres+brand+count"]
    assert item_text_choices(()) == [*TEXT_FIELDS, "title+count"]


def test_training_settings_take_a_spec_in_one_spelling_and_refuse_a_malformed_one() -> None:
    assert training_config(text_field=" title + genres ").text_field == "title+genres"
    with pytest.raises(ValueError, match="empty part"):
        training_config(text_field="title+")
    args = build_parser().parse_args(["show", "--user", "u1", "--text-field", "title + year+count"])
    assert args.text_field == "title+year+count"
    # Inspection settings too: an adapter's recorded item text then compares equal to the one picked.
    assert InspectSettings(text_field=" title + count").text_field == "title+count"


# --- the count never sees held-out items ---------------------------------------------------------


def test_count_never_counts_a_validation_or_test_interaction() -> None:
    dataset = Dataset("held", {key: Item(key, key.upper()) for key in "abcdv"},
                      {"u1": ["a", "b", "v", "c"], "u2": ["a", "c", "b", "v"],
                       "u3": ["b", "a", "d", "c"]})
    # Training parts: u1 a b, u2 a c, u3 b a. v and d are only ever validation or test items.
    counts = {key: dataset.text(key, "count") for key in "abcdv"}
    assert counts == {"a": "3", "b": "2", "c": "1", "d": "0", "v": "0"}
    assert dataset.text("v", "title+count") == "V | 0"


# --- the loaders keep the fields -----------------------------------------------------------------


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding))
    return path


def test_movielens_100k_keeps_genres_and_the_release_year(tmp_path: Path) -> None:
    flags = ["0"] * 19
    flags[1] = flags[15] = "1"  # Action, Sci-Fi
    write(tmp_path / "u.item", "50|Star Wars (1977)|01-Jan-1977||http://x|" + "|".join(flags) + "\n"
          "2|Heat|15-Dec-1995||http://y|" + "|".join(["0"] * 19) + "\n3|Nameless||||" + "|".join(["0"] * 19)
          + "\n", encoding="latin-1")
    write(tmp_path / "u.data", "7\t2\t5\t3\n7\t50\t3\t1\n7\t50\t4\t2\n7\t3\t4\t4\n")
    dataset = loaders.load(tmp_path, "ml-100k")
    assert dataset.items["50"].attributes == (("year", "1977"), ("genres", "Action, Sci-Fi"))
    assert dataset.items["2"].attributes == (("year", "1995"),)
    assert dataset.items["3"].attributes == ()  # no date, no genre: nothing to add
    assert dataset.items["50"].caption == "Action, Sci-Fi film"  # the caption as before
    assert dataset.text("50", "title+year+genres+count") == "Star Wars (1977) | Action, Sci-Fi | 2"  # rated twice
    assert dataset.text("2", "title+year+genres") == "Heat (1995)"


def test_movielens_1m_takes_the_year_from_the_title(tmp_path: Path) -> None:
    write(tmp_path / "movies.dat", "1::Heat (1995)::Action|Crime\n2::Up::Animation\n3::X (2001)::(no genres listed)\n",
          encoding="latin-1")
    write(tmp_path / "ratings.dat", "5::2::4::2\n5::1::5::1\n5::3::5::3\n")
    dataset = loaders.load(tmp_path, None)
    assert dataset.items["1"].attributes == (("year", "1995"), ("genres", "Action, Crime"))
    assert dataset.items["2"].attributes == (("genres", "Animation"),)
    assert dataset.items["3"].attributes == (("year", "2001"),)


def test_recbole_keeps_its_token_token_seq_and_float_fields(tmp_path: Path) -> None:
    write(tmp_path / "shop" / "shop.item",
          "item_id:token\ttitle:token_seq\tbrand:token\tcategories:token_seq\tprice:float\temb:float_seq\n"
          "B1\tRed mug\tAcme\tHome Kitchen\t3.5\t0.1 0.2\nB2\tBlue cup\t\tHome\t2\t0.3 0.4\n"
          "B3\tPlate\tAcme\tHome\t\t0.5 0.6\n")
    write(tmp_path / "shop" / "shop.inter",
          "user_id:token\titem_id:token\ttimestamp:float\nA\tB1\t1\nA\tB3\t2\nA\tB2\t3\n")
    dataset = loaders.load(tmp_path / "shop", None)
    assert dataset.item_fields == ("brand", "categories", "price")  # no title, no id, no float_seq
    assert dataset.items["B1"].attributes == (("brand", "Acme"), ("categories", "Home, Kitchen"), ("price", "3.5"))
    assert dataset.items["B2"].attributes == (("categories", "Home"), ("price", "2"))
    assert dataset.text("B1", "title+brand+price+count") == "Red mug | Acme | 3.5 | 1"
    assert dataset.items["B1"].caption == "Home, Kitchen"  # the caption as before


def test_amazon_meta_gives_category_brand_and_price(tmp_path: Path) -> None:
    reviews = [{"reviewerID": "R", "asin": f"G{n}", "unixReviewTime": 1500000000 + n} for n in range(4)]
    write(tmp_path / "Games_5.json", "".join(json.dumps(record) + "\n" for record in reviews))
    meta = [
        {"asin": "G0", "title": "Game 0", "category": ["Video Games", "PC"], "brand": "Valve", "price": "$1,299.00"},
        {"asin": "G1", "title": "Game 1", "brand": "  ", "price": "$5.99 - $19.99"},
        {"asin": "G2", "title": "Game 2", "price": 12.5, "details": {"Brand": "Sega"}, "store": "Sega Store"},
        {"asin": "G3", "title": "Game 3", "store": "Indie", "price": None},
    ]
    write(tmp_path / "meta_Games.json", "".join(json.dumps(record) + "\n" for record in meta))
    dataset = loaders.load(tmp_path, None)
    assert dataset.items["G0"].attributes == (("category", "Video Games > PC"), ("brand", "Valve"),
                                             ("price", "$1299.00"))
    assert dataset.items["G1"].attributes == ()  # a blank brand and a price range add nothing
    assert dataset.items["G2"].attributes == (("brand", "Sega"), ("price", "$12.50"))
    assert dataset.items["G3"].attributes == (("brand", "Indie"),)
    assert dataset.text("G0", "title+brand+price") == "Game 0 | Valve | $1299.00"


def test_csv_items_keep_their_other_columns(tmp_path: Path) -> None:
    write(tmp_path / "items.csv",
          "item_id,title,Genre,count,year\ni1,Alpha,Drama,9,1990\ni2,Beta,,,\ni3,Gamma,Noir,,\n")
    write(tmp_path / "interactions.csv", "user_id,item_id,timestamp\nu1,i1,1\nu1,i2,2\nu1,i3,3\n")
    dataset = loaders.load(tmp_path, None)
    # "count" is a part every dataset has: a column of that name cannot shadow it and is left out.
    assert dataset.item_fields == ("Genre", "year")
    assert dataset.text("i1", "title+year+Genre+count") == "Alpha (1990) | Drama | 1"


# --- the fingerprint --------------------------------------------------------------------------


def test_the_fingerprint_is_unchanged_without_fields_and_covers_them_when_present() -> None:
    dataset = make_toy_dataset(users=4, items=12, length=4)
    digest = hashlib.sha256()  # the fingerprint as it was before items had fields
    for item_id in sorted(dataset.items):
        item = dataset.items[item_id]
        digest.update(f"{item_id}\t{item.title}\t{item.caption}\t{item.summary}\n".encode())
    for user in sorted(dataset.sequences):
        digest.update(f"{user}\t{' '.join(dataset.sequences[user])}\n".encode())
    assert dataset.fingerprint() == digest.hexdigest()[:16]
    first = sorted(dataset.items)[0]
    with_genre = {**dataset.items, first: replace(dataset.items[first], attributes=(("genres", "Drama"),))}
    other_genre = {**dataset.items, first: replace(dataset.items[first], attributes=(("genres", "Noir"),))}
    fingerprints = {Dataset("toy", items, dict(dataset.sequences)).fingerprint() for items in (with_genre, other_genre)}
    assert len(fingerprints) == 2 and dataset.fingerprint() not in fingerprints


def test_the_bundled_sample_keeps_its_fingerprint() -> None:
    sample = loaders.load_dataset("sample")
    assert sample.item_fields == () and sample.fingerprint() == "c3612a374c559458"


# --- what a spec costs in prompt tokens ---------------------------------------------------------


def test_the_cost_is_the_median_and_longest_of_the_seeded_sample_prompts(smol_tokenizer) -> None:
    base = make_toy_dataset(users=12, items=40, length=8)
    items = {key: replace(item, attributes=(("genres", "Action, Adventure, Science Fiction"),))
             for key, item in base.items.items()}
    dataset = Dataset("genres", items, base.sequences)
    config = replace(TRAINING_PRESETS["quick"], candidates=10, history_items=3)
    title = item_text_cost(dataset, smol_tokenizer, config)
    assert title == size_prompt_budget(dataset, smol_tokenizer, config)
    assert title.median_tokens <= title.tokens and title.candidates == 10 and title.history_items == 3
    richer = item_text_cost(dataset, smol_tokenizer, replace(config, text_field="title+genres+count"))
    # 13 item lines (10 candidates, 3 history items), each longer by " | Action, Adventure, Science Fiction | N".
    assert richer.median_tokens - title.median_tokens >= 13 * 8
    assert richer.describe_cost("title+genres+count").startswith(
        f"item text 'title+genres+count': median {richer.median_tokens}, max {richer.tokens} prompt tokens")
    with pytest.raises(ValueError, match="unknown part 'year'"):
        item_text_cost(dataset, smol_tokenizer, replace(config, text_field="title+year"))


def test_train_refuses_an_unknown_field_before_the_model_loads(toy_data_folder, tmp_path, capsys) -> None:
    status = main(["train", "--model", str(tmp_path / "no-such-model"), "--data", str(toy_data_folder),
                   "--adapters-dir", str(tmp_path / "adapters"), "--name", "spec", "--no-progress",
                   "--text-field", "title+genres"])
    err = capsys.readouterr().err
    assert status == 1 and "unknown part 'genres'" in err and "no-such-model" not in err
