"""Every bad input on every surface is refused with a message naming the file, line or field and a fix.

Table-driven: data files, candidates and prompts, model and tokenizer folders, adapter folders and names,
CLI options, and the app's fields and uploads. Each refusal also leaves what was saved before untouched.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from app_helpers import custom_code_model, make_adapter, make_context
from conftest import build_tiny_llama, make_toy_dataset, save_tiny_model, write_csv_dataset

from rerank_app.context import SessionError
from rerank_app.jobs import TrainRequest
from rerank_app.pickers import make_settings
from rerank_core.adapters import AdapterError, check_adapter, list_adapters, publish_adapter, validate_adapter_name
from rerank_core.candidates import CandidateConfig, CandidateSampler
from rerank_core.cli import main as cli
from rerank_core.data import reading
from rerank_core.data.dataset import DataError
from rerank_core.data.loaders import load_dataset
from rerank_core.inspector import Inspector, InspectSettings
from rerank_core.models import ModelError, load_model, load_tokenizer
from rerank_core.prompts import PromptError, build_prompt, get_preset, letters_for
from rerank_core.verbalizer import resolve_letters

# -- helpers ------------------------------------------------------------------------------------


def snapshot(root: Path) -> dict[str, str]:
    """Every file under root with a hash of its bytes: 'nothing saved before is changed' made checkable."""
    if not root.exists():
        return {}
    return {str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(root.rglob("*")) if path.is_file()}


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """`python -m rerank_core ...` in process: argparse's own refusals exit 2 too."""
    try:
        code = cli.main(argv)
    except SystemExit as stopped:
        code = stopped.code
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def model_folder(smol_tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(smol_tokenizer, tmp_path_factory.mktemp("bad-input-model"))


@pytest.fixture(scope="module")
def loaded(model_folder: Path):
    return load_model(model_folder, dtype="fp32")


@pytest.fixture(scope="module")
def data_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_csv_dataset(make_toy_dataset(), tmp_path_factory.mktemp("bad-input-data"))


# -- data files ---------------------------------------------------------------------------------

ITEMS = "item_id,title\n" + "".join(f"i{n},Title {n}\n" for n in range(1, 11))
EVENTS = "user_id,item_id,timestamp\n" + "".join(f"u1,i{n},{1_600_000_000 + n}\n" for n in range(1, 6))


@dataclass(frozen=True)
class DataCase:
    """One broken dataset: its two files, and where and what the refusal must say."""

    name: str
    items: str | bytes
    interactions: str | bytes
    file: str
    line: int | None
    field: str | None
    says: tuple[str, ...]  # the problem and the fix, as the user reads them


DATA_CASES = [
    DataCase("empty items file", "", EVENTS, "items.csv", None, None,
             ("the file is empty", "it needs a header item_id,title")),
    DataCase("empty interactions file", ITEMS, "", "interactions.csv", None, None,
             ("the file is empty", "a header user_id,item_id,timestamp")),
    DataCase("blank lines only", ITEMS, "\n\n  \n", "interactions.csv", None, None, ("the file is empty",)),
    DataCase("header without rows", ITEMS, "user_id,item_id,timestamp\n", "interactions.csv", None, None,
             ("no interactions", "has no rows")),
    DataCase("semicolon delimiter", ITEMS.replace(",", ";"), EVENTS, "items.csv", 1, None,
             ("seems to use ';' as delimiter", "save it comma-separated")),
    DataCase("tab delimiter", ITEMS, EVENTS.replace(",", "\t"), "interactions.csv", 1, None,
             ("seems to use '\\t' as delimiter", "save it comma-separated")),
    DataCase("missing column", ITEMS, "user_id,item_id\nu1,i1\n", "interactions.csv", 1, "timestamp",
             ("missing column 'timestamp'", "expected user_id, item_id, timestamp")),
    DataCase("renamed column", ITEMS, EVENTS.replace("user_id", "userid", 1), "interactions.csv", 1, "user_id",
             ("missing column 'user_id'", "rename 'userid' to 'user_id'")),
    DataCase("renamed title column", ITEMS.replace("title", "name", 1), EVENTS, "items.csv", 1, "title",
             ("missing column 'title'", "found item_id, name")),
    DataCase("non-numeric timestamp", ITEMS, EVENTS + "u1,i6,yesterday\n", "interactions.csv", 7, "timestamp",
             ("timestamp 'yesterday' is not a number", "expected unix time in seconds")),
    DataCase("timestamp in milliseconds", ITEMS, EVENTS + "u1,i6,1700000000000\n", "interactions.csv", 7,
             "timestamp", ("after the year 2200", "milliseconds? divide by 1000")),
    DataCase("negative timestamp", ITEMS, EVENTS + "u1,i6,-5\n", "interactions.csv", 7, "timestamp",
             ("is negative", "expected unix time")),
    DataCase("infinite timestamp", ITEMS, EVENTS + "u1,i6,inf\n", "interactions.csv", 7, "timestamp",
             ("is not a number",)),
    DataCase("duplicate item id, other title", ITEMS + "i3,Another Title\n", EVENTS, "items.csv", 12, "item_id",
             ("'i3' is on line 4", "and on line 12", "keep one row per item")),
    DataCase("interaction with an unknown item", ITEMS, EVENTS + "u1,zz9,1700000000\n", "interactions.csv", 7,
             "item_id", ("'zz9'", "not in items.csv", "add them to items.csv or remove their interactions")),
    DataCase("Latin-1 bytes", ITEMS.encode() + "i11,Caf\xe9 Society\n".encode("latin-1"), EVENTS, "items.csv",
             12, None, ("byte 0xE9", "not valid UTF-8", "save the file as UTF-8")),
    DataCase("invalid UTF-8 bytes", ITEMS, EVENTS.encode() + b"u1,i\xff\xfe6,1700000000\n", "interactions.csv",
             7, None, ("byte 0xFF", "save the file as UTF-8")),
    DataCase("unquoted comma", ITEMS + "i11,Hello, World\n", EVENTS, "items.csv", 12, None,
             ("3 fields but the header has 2", "quote values that contain commas")),
    DataCase("short row", ITEMS, EVENTS + "u1,i6\n", "interactions.csv", 7, "timestamp",
             ("lacks 'timestamp'", "every row needs user_id, item_id, timestamp")),
    DataCase("empty title", ITEMS + "i11,   \n", EVENTS, "items.csv", 12, "title",
             ("'i11' has an empty title", "every item needs one")),
    DataCase("empty user id", ITEMS, EVENTS + ",i6,1700000000\n", "interactions.csv", 7, "user_id",
             ("the user_id is empty",)),
    DataCase("no user left after filtering", ITEMS, "user_id,item_id,timestamp\nu1,i1,1\nu1,i2,2\nu2,i3,3\n",
             "interactions.csv", None, None,
             ("no user has the 3 interactions leave-one-out needs", "2 user(s) have fewer", "add interactions")),
]


def write_pair(folder: Path, items: str | bytes, interactions: str | bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in (("items.csv", items), ("interactions.csv", interactions)):
        (folder / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return folder


@pytest.mark.parametrize("case", DATA_CASES, ids=[case.name for case in DATA_CASES])
def test_bad_data_file_names_file_line_field_and_fix(case: DataCase, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    folder = write_pair(tmp_path / "data", case.items, case.interactions)
    before = snapshot(folder)
    with pytest.raises(DataError) as caught:
        load_dataset(folder)
    error = caught.value
    assert Path(error.file).name == case.file
    assert (error.line, error.field) == (case.line, case.field), str(error)
    for words in case.says:
        assert words in str(error)
    # The CLI prints the same message (file, line and all) and exits 2 before loading any model.
    code, err = run_cli(["show", "--data", str(folder), "--user", "u1", "--tokenizer", str(tmp_path)], capsys)
    assert code == 2 and f"error: file {folder / case.file}" in err and case.says[0] in err
    if case.line is not None:
        assert f"line {case.line}" in err
    assert snapshot(folder) == before


@pytest.mark.parametrize(("files", "data_format", "says"), [
    ({"u.data": "1,10,5,881250949\n", "u.item": "10|Toy Story (1995)|01-Jan-1995||url|0\n"}, "ml-100k",
     ("u.data", "line 1", "separated by '\\t'", "seems to use ','")),
    ({"ratings.dat": "1::10::5\n", "movies.dat": "10::Toy Story (1995)::Animation\n"}, "ml-1m",
     ("ratings.dat", "line 1", "field 'Timestamp'")),
    ({"Beauty.jsonl": '{"user_id": "U", "parent_asin": "P", "timestamp": 1}\n{not json\n',
      "meta_Beauty.jsonl": '{"parent_asin": "P", "title": "Lipstick"}\n'}, None,
     ("Beauty.jsonl", "line 2", "one JSON object per line")),
    ({"items.csv": ITEMS}, "csv", ("missing interactions.csv", "needs items.csv and interactions.csv")),
    ({"readme.txt": "hello"}, None, ("cannot tell the data format", "items.csv + interactions.csv")),
], ids=["ml-100k wrong separator", "ml-1m short line", "amazon bad json line", "half a csv pair", "unknown folder"])
def test_other_formats_name_the_file_and_line(tmp_path: Path, files: dict[str, str], data_format: str | None,
                                              says: tuple[str, ...]) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    with pytest.raises(DataError) as caught:
        load_dataset(tmp_path, data_format)
    for words in says:
        assert words in str(caught.value)


def test_unknown_data_format_and_missing_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"unknown data format 'parquet': use one of bundled, csv"):
        load_dataset(tmp_path, "parquet")
    # A value from the app's API may be any JSON value (the fuzz test once sent a float): the same refusal.
    with pytest.raises(DataError, match=r"unknown data format -3.7e\+16: use one of bundled, csv"):
        load_dataset(tmp_path, -3.7e16)
    with pytest.raises(DataError, match="does not exist: give a dataset folder or a file inside one"):
        load_dataset(tmp_path / "nowhere")


def test_a_10000_character_title_is_cut_with_a_warning_naming_file_and_line(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, smol_tokenizer) -> None:
    long_title = "Very " * 2000
    folder = write_pair(tmp_path, ITEMS.replace("Title 3\n", long_title.strip() + "\n"), EVENTS)
    with caplog.at_level(logging.WARNING, logger="rerank_core.data.reading"):
        dataset = load_dataset(folder)
    assert len(dataset.items["i3"].title) == reading.MAX_TITLE_CHARS
    assert "items.csv: cut 1 title(s) longer than 1000 characters (first on line 4)" in caplog.text
    # The llamarec preset cuts each title to its token limit; the prompt stays short.
    prompt = build_prompt(smol_tokenizer, get_preset("llamarec"), [dataset.text("i3")], [dataset.text("i3"), "B"])
    assert prompt.token_count < 200


def test_users_with_too_few_interactions_are_set_aside_and_named(tmp_path: Path, model_folder: Path,
                                                                 caplog: pytest.LogCaptureFixture,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    folder = write_pair(tmp_path, ITEMS, EVENTS + "solo,i1,1600000000\npair,i1,1\npair,i2,2\n")
    dataset = load_dataset(folder)
    assert dataset.users == ["u1"] and dataset.short_users == ["pair", "solo"]
    with pytest.raises(KeyError, match=r"'solo' is not in dataset .*fewer than 3 interactions.*pick one"):
        dataset.split_user("solo")
    code, err = run_cli(["show", "--data", str(folder), "--tokenizer", str(model_folder), "--user", "solo",
                         "--candidates", "5"], capsys)
    assert code == 2
    assert "2 user(s) with fewer than 3 interactions are left out of the split: pair, solo" in caplog.text
    assert "'solo' is not in dataset" in err and "fewer than 3 interactions" in err and "e.g. u1" in err


# -- candidates and prompts ---------------------------------------------------------------------

def test_more_than_52_candidates_is_refused_everywhere(toy_dataset, data_folder: Path, model_folder: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match=r"from 1 to 52 .one letter A-Z a-z each., got 53"):
        CandidateConfig(count=53)
    with pytest.raises(PromptError, match="more than the 52 letters A-Z, a-z; use at most 52"):
        letters_for(53)
    for value in ("53", "0", "-1", "many"):
        code, err = run_cli(["show", "--data", str(data_folder), "--model", str(model_folder), "--user", "u01",
                             "--candidates", value], capsys)
        assert code == 2 and "argument --candidates" in err, err
    assert "use a whole number from 1 to 52" in run_cli(
        ["audit", "--tokenizer", str(model_folder), "--candidates", "60"], capsys)[1]


def test_more_candidates_than_the_catalogue_can_give(tmp_path: Path, model_folder: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    # Ten items; user u1 touched five of them.
    dataset = load_dataset(write_pair(tmp_path, ITEMS, EVENTS))
    with pytest.raises(ValueError, match=r"count 20 is larger than the 10 items of dataset .*: lower the count"):
        CandidateSampler(dataset, CandidateConfig(count=20))
    sampler = CandidateSampler(dataset, CandidateConfig(count=8))
    with pytest.raises(ValueError, match=r"user 'u1': 5 touched items leave 5 of the 10 items as candidates, but 7 "
                                         r"are needed for 8 candidates: lower the candidate count to at most 6"):
        sampler.for_split(dataset.split_user("u1"))
    code, err = run_cli(["show", "--data", str(tmp_path), "--model", str(model_folder), "--user", "u1",
                         "--candidates", "8"], capsys)
    assert code == 2 and "lower the candidate count to at most 6" in err


def test_a_history_longer_than_the_models_context_is_cut_and_reported(smol_tokenizer, model_folder: Path) -> None:
    dataset = make_toy_dataset(users=3, items=200, length=120)
    loaded = load_model(model_folder, dtype="fp32")
    loaded.model.config.max_position_embeddings = 300  # a short-context model
    inspector = Inspector(dataset, loaded)
    settings = InspectSettings(max_prompt_tokens=1536, candidates=CandidateConfig(count=5))
    result = inspector.inspect("u00", settings)
    assert len(result.prepared.token_ids) <= 300 and result.scores.prompt_tokens <= 300
    payload = result.to_json(dataset)
    assert payload["dropped_history"] > 50
    kept = [row["in_prompt"] for row in payload["history"]]
    assert kept.count(False) == payload["dropped_history"] and kept[-1] and not kept[0]  # oldest dropped first
    # A context too short for even the candidates says what to change.
    loaded.model.config.max_position_embeddings = 40
    with pytest.raises(PromptError, match=r"even with no history.*raise the limit or use fewer candidates"):
        inspector.prepare("u00", settings)


def test_cli_reports_history_cut_to_fit(data_folder: Path, model_folder: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["show", "--data", str(data_folder), "--model", str(model_folder), "--user", "u01",
                     "--candidates", "5", "--max-prompt-tokens", "150"])
    out = capsys.readouterr().out
    assert code == 0 and "dropped to fit" in out and ", 0 dropped" not in out


@pytest.fixture(scope="module")
def plain_tokenizer_folder(smol_tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2's tokenizer saved without its chat template, as base (non-instruct) models ship."""
    tokenizer = copy.deepcopy(smol_tokenizer)
    tokenizer.chat_template = None
    folder = tmp_path_factory.mktemp("no-template")
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("preset", ["seed", "seed_after"])
def test_chat_preset_on_a_tokenizer_without_chat_template_suggests_llamarec(
        plain_tokenizer_folder: Path, preset: str, capsys: pytest.CaptureFixture[str]) -> None:
    tokenizer = load_tokenizer(plain_tokenizer_folder)
    assert not tokenizer.chat_template
    advice = r"has none; use the 'llamarec' \(or 'llamarec_after'\) text preset, or give the tokenizer a chat template"
    with pytest.raises(PromptError, match=f"preset '{preset}' renders with the chat template, but this tokenizer "
                                          + advice):
        build_prompt(tokenizer, get_preset(preset), ["a"], ["b", "c"])
    with pytest.raises(PromptError, match=advice):
        resolve_letters(tokenizer, get_preset(preset), letters_for(4))
    code, err = run_cli(["audit", "--tokenizer", str(plain_tokenizer_folder), "--preset", preset], capsys)
    assert code == 2 and "'llamarec'" in err
    # The suggested preset works on the same tokenizer.
    assert build_prompt(tokenizer, get_preset("llamarec"), ["a"], ["b", "c"]).rendered.startswith("### Instruction")
    assert run_cli(["audit", "--tokenizer", str(plain_tokenizer_folder), "--preset", "llamarec"], capsys)[0] == 0


# -- model and tokenizer folders ----------------------------------------------------------------

def _model_without(model_folder: Path, target: Path, *drop: str) -> Path:
    shutil.copytree(model_folder, target)
    for name in drop:
        (target / name).unlink()
    return target


def _pickled_only(model_folder: Path, target: Path) -> Path:
    folder = _model_without(model_folder, target, "model.safetensors")
    torch.save({"weights": torch.zeros(2)}, folder / "pytorch_model.bin")
    return folder


MODEL_CASES = [
    ("missing folder", lambda source, target: target, ("does not exist", "pass a local Hugging Face model folder")),
    ("a file, not a folder", lambda source, target: (target.write_text("x"), target)[1],
     ("is not a folder", "pass the folder that holds config.json")),
    ("no config.json", lambda source, target: _model_without(source, target, "config.json"),
     ("has no config.json", "pass a Hugging Face model folder")),
    ("no weights", lambda source, target: _model_without(source, target, "model.safetensors"),
     ("has no *.safetensors weights",)),
    ("pickled weights only", _pickled_only,
     ("It has pytorch_model.bin: pickled weights are never loaded", "convert them to safetensors first")),
    ("custom code without the flag", custom_code_model,
     ("custom code", "pass --trust-remote-code only if you trust it")),
]


@pytest.mark.parametrize(("name", "build", "says"), MODEL_CASES, ids=[case[0] for case in MODEL_CASES])
def test_bad_model_folder_is_refused_with_the_fix(name: str, build, says: tuple[str, ...], model_folder: Path,
                                                  data_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    def never_unpickle(*args, **kwargs):
        raise AssertionError("torch.load was called: pickled weights must never be loaded")

    monkeypatch.setattr(torch, "load", never_unpickle)
    folder = build(model_folder, tmp_path / "model")
    with pytest.raises(ModelError) as caught:
        load_model(folder, dtype="fp32")
    for words in says:
        assert words in str(caught.value)
    code, err = run_cli(["show", "--data", str(data_folder), "--model", str(folder), "--user", "u01"], capsys)
    assert code == 2 and says[0] in err
    assert not (folder / "RAN").exists() if folder.is_dir() else True


def test_tokenizer_folder_without_tokenizer_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes.txt").write_text("nothing here")
    with pytest.raises(ModelError, match=r"needs tokenizer.json or tokenizer_config.json, or a SentencePiece"):
        load_tokenizer(tmp_path)
    code, err = run_cli(["audit", "--tokenizer", str(tmp_path)], capsys)
    assert code == 2 and "tokenizer.json" in err


# -- adapters -----------------------------------------------------------------------------------

BAD_ADAPTER_NAMES = ["..", "../evil", "a/b", "/tmp/evil", "a\\b", "a..b", "a\nb", "a\x00b", "tab\tname", "",
                     " lead", ".hidden", "-dash", "x" * 65, "naïve"]
# On the command line an empty --adapter means the base model, so it is not among these.
CLI_ADAPTER_NAMES = ("../evil", "a/b", "a\nb", "-dash", ".hidden")


@pytest.mark.parametrize("name", BAD_ADAPTER_NAMES, ids=[repr(name)[:24] for name in BAD_ADAPTER_NAMES])
def test_bad_adapter_names_are_refused_on_every_surface(name: str, loaded, tmp_path: Path, data_folder: Path,
                                                        model_folder: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "adapters"
    make_adapter(loaded, root, "kept")
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "adapter_model.safetensors").write_bytes(b"new")
    before, outside = snapshot(root), snapshot(tmp_path)
    says = "is not allowed: use 1-64 letters, digits"
    for attempt in (lambda: validate_adapter_name(name), lambda: check_adapter(loaded, name, root),
                    lambda: publish_adapter(staging, name, root, overwrite=True),
                    lambda: TrainRequest(name, str(model_folder), str(data_folder)).argv(
                        tmp_path / "config", tmp_path / "events", tmp_path / "cancel", root)):
        with pytest.raises(AdapterError, match=says):
            attempt()
    if name in CLI_ADAPTER_NAMES:  # one model load each: a few stand for the rest
        code, err = run_cli(["show", "--data", str(data_folder), "--model", str(model_folder), "--user", "u01",
                             f"--adapter={name}", "--adapters-dir", str(root)], capsys)
        assert code == 2 and says in err
    assert snapshot(root) == before and snapshot(tmp_path) == outside
    assert [info.name for info in list_adapters(root)] == ["kept"]


def _corrupt(folder: Path, damage: str) -> None:
    weights, config = folder / "adapter_model.safetensors", folder / "adapter_config.json"
    if damage == "garbage weights":
        weights.write_bytes(b"\x00garbage" * 10)
    elif damage == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:200])
    elif damage == "empty weights":
        weights.write_bytes(b"")
    elif damage == "broken config":
        config.write_text("{not json")
    elif damage == "config not an object":
        config.write_text("[1, 2]")
    else:  # valid JSON that PEFT cannot use
        values = json.loads(config.read_text())
        values.update({"config without peft_type": {"peft_type": None}, "unknown peft type": {"peft_type": "NOPE"},
                       "rank not a number": {"r": "abc"}}[damage])
        config.write_text(json.dumps({key: value for key, value in values.items() if value is not None}))


# The first five are caught before PEFT is asked (check_adapter); the rest when PEFT loads the folder.
DAMAGES = ["garbage weights", "truncated weights", "empty weights", "broken config", "config not an object",
           "config without peft_type", "unknown peft type", "rank not a number"]


@pytest.mark.parametrize("damage", DAMAGES)
def test_corrupted_adapter_is_refused_and_left_for_the_user(damage: str, loaded, tmp_path: Path, data_folder: Path,
                                                            model_folder: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "adapters"
    _corrupt(make_adapter(loaded, root, "broken"), damage)
    before = snapshot(root)
    if DAMAGES.index(damage) < 5:
        with pytest.raises(AdapterError, match=r"adapter 'broken' .*(unreadable|not a JSON object).*delete the "
                                               r"folder and train it again"):
            check_adapter(loaded, "broken", root)
    inspector = Inspector(load_dataset(data_folder), loaded, adapters_root=str(root))
    with pytest.raises(AdapterError, match="delete the folder and train it again"):
        inspector.inspect("u01", InspectSettings(candidates=CandidateConfig(count=5)), "broken")
    code, err = run_cli(["show", "--data", str(data_folder), "--model", str(model_folder), "--user", "u01",
                         "--adapter", "broken", "--adapters-dir", str(root), "--candidates", "5"], capsys)
    assert code == 2 and "adapter 'broken'" in err and "train it again" in err
    assert snapshot(root) == before
    # The base model still scores after the refusal.
    assert inspector.inspect("u01", InspectSettings(candidates=CandidateConfig(count=5))).rank is not None


def test_eval_says_when_an_adapter_is_scored_on_another_item_text(loaded, tmp_path: Path, data_folder: Path,
                                                                  model_folder: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    make_adapter(loaded, tmp_path / "adapters", "counted", text_field="title_count")
    common = ["eval", "--data", str(data_folder), "--model", str(model_folder), "--users", "3", "--candidates", "5",
              "--adapter", "counted", "--adapters-dir", str(tmp_path / "adapters"), "--dtype", "fp32"]
    code, err = run_cli([*common, "--output-dir", str(tmp_path / "plain")], capsys)
    assert code == 0
    assert "note: adapter 'counted' was trained with item text 'title_count', scored here with 'title'" in err
    code, err = run_cli([*common, "--output-dir", str(tmp_path / "counted"), "--text-field", "title_count"], capsys)
    assert code == 0 and "note:" not in err


def test_adapter_for_another_base_is_refused_naming_both(loaded, smol_tokenizer, tmp_path: Path) -> None:
    root = tmp_path / "adapters"
    folder = make_adapter(loaded, root, "foreign")
    manifest = json.loads((folder / "rerank_manifest.json").read_text())
    manifest["base_model"] = {"name": "Other-7B", "fingerprint": "0123456789abcdef"}
    (folder / "rerank_manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(AdapterError, match=rf"trained on base model 'Other-7B' \(fingerprint 0123456789abcdef\), but "
                                           rf"the loaded base is '{loaded.name}' \(fingerprint {loaded.fingerprint}\); "
                                           "load that base model or pick an adapter trained on this one"):
        check_adapter(loaded, "foreign", root)
    # A plain PEFT adapter (no manifest) made for a wider model: caught by its shapes.
    from peft import LoraConfig, get_peft_model

    wider = get_peft_model(build_tiny_llama(smol_tokenizer, hidden=64),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    wider.save_pretrained(root / "wider")
    with pytest.raises(AdapterError, match=r"adapter 'wider' weight .* does not fit .*q_proj \(32→32\)"):
        check_adapter(loaded, "wider", root)


def test_pickled_adapter_weights_are_never_listed_or_loaded(loaded, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "adapters"
    folder = make_adapter(loaded, root, "pickled")
    (folder / "adapter_model.safetensors").unlink()
    torch.save({}, folder / "adapter_model.bin")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called on adapter weights"))
    assert list_adapters(root) == []
    with pytest.raises(AdapterError, match=r"no adapter named 'pickled'.*available: none"):
        check_adapter(loaded, "pickled", root)


# -- CLI options --------------------------------------------------------------------------------

CLI_CASES = [
    ("unknown user", ["show", "--user", "nobody"], ("user 'nobody' is not in dataset", "pick one of its 30 users")),
    ("candidates not a number", ["show", "--user", "u01", "--candidates", "abc"],
     ("argument --candidates", "'abc' is not a whole number")),
    ("candidates zero", ["show", "--user", "u01", "--candidates", "0"], ("argument --candidates", "from 1 to 52")),
    ("max prompt tokens zero", ["show", "--user", "u01", "--max-prompt-tokens", "0"],
     ("argument --max-prompt-tokens", "of at least 1")),
    ("batch size zero", ["eval", "--batch-size", "0"], ("argument --batch-size", "of at least 1")),
    ("negative users", ["eval", "--users", "-3"], ("argument --users", "of at least 0")),
    ("data path missing", ["show", "--user", "u01", "--data", "/nonexistent/data"],
     ("/nonexistent/data does not exist", "give a dataset folder")),
    ("data format unknown", ["show", "--user", "u01", "--data-format", "parquet"],
     ("argument --data-format", "invalid choice: 'parquet'")),
    ("dtype unknown", ["show", "--user", "u01", "--dtype", "int3"], ("--dtype 'int3' is not one of auto",)),
    ("device unknown", ["show", "--user", "u01", "--device", "tpu"],
     ("--device 'tpu' cannot be used here", "use auto, cpu or cuda[:N]")),
    ("model path missing", ["show", "--user", "u01", "--model", "/nonexistent/model"],
     ("model folder /nonexistent/model does not exist",)),
    ("adapter missing", ["show", "--user", "u01", "--adapter", "missing"],
     ("no adapter named 'missing'", "available: kept")),
    ("eval adapter missing", ["eval", "--users", "3", "--adapter", "missing"], ("no adapter named 'missing'",)),
    ("preset unknown", ["show", "--user", "u01", "--preset", "bogus"], ("argument --preset", "invalid choice")),
    ("split unknown", ["show", "--user", "u01", "--split", "train"], ("argument --split", "invalid choice")),
    ("user missing", ["show"], ("the following arguments are required: --user",)),
    ("command unknown", ["serve"], ("invalid choice: 'serve'",)),
]


@pytest.fixture(scope="module")
def cli_world(loaded, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An adapters folder with one adapter and an eval output folder holding an earlier run's files."""
    root = tmp_path_factory.mktemp("cli-world")
    make_adapter(loaded, root / "adapters", "kept")
    out = root / "eval_out"
    out.mkdir()
    (out / "per_user.csv").write_text("user_id,rank\nu01,3\n")
    (out / "summary.json").write_text('{"earlier": true}')
    return {"adapters": root / "adapters", "out": out}


@pytest.mark.parametrize(("name", "argv", "says"), CLI_CASES, ids=[case[0] for case in CLI_CASES])
def test_bad_cli_option_exits_2_naming_it(name: str, argv: list[str], says: tuple[str, ...], cli_world,
                                          data_folder: Path, model_folder: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--data", str(data_folder), "--model", str(model_folder), "--adapters-dir", str(cli_world["adapters"])]
    extra = ["--output-dir", str(cli_world["out"])] if argv[0] == "eval" else []
    full = [argv[0], *common, *extra, *argv[1:]] if len(argv) > 1 or argv[0] == "show" else argv
    before = {key: snapshot(path) for key, path in cli_world.items()}
    code, err = run_cli(full, capsys)
    assert code == 2, err
    for words in says:
        assert words in err
    assert "Traceback" not in err
    assert {key: snapshot(path) for key, path in cli_world.items()} == before


@pytest.mark.parametrize(("extra", "says"), [
    (["--name", "../escape"], "adapter name '../escape' is not allowed"),
    (["--name", "ok", "--candidates", "53"], "from 1 to 52"),
    (["--name", "ok", "--preset", "bogus"], "prompt preset 'bogus' is not one of"),
    (["--name", "ok", "--lora-dropout", "1.5"], "lora_dropout must be in [0, 1)"),
    (["--name", "kept"], "adapter 'kept' already exists"),
    (["--name", "base"], "'base' names the model without an adapter"),
], ids=["name with ..", "53 candidates", "unknown preset", "dropout out of range", "name taken", "name base"])
def test_bad_train_option_fails_with_the_reason_and_leaves_adapters_alone(
        extra: list[str], says: str, cli_world, data_folder: Path, model_folder: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    from rerank_core.cli.train import EXIT_BAD_SETTINGS

    before = snapshot(cli_world["adapters"])
    code, err = run_cli(["train", "--model", str(model_folder), "--data", str(data_folder), "--dtype", "fp32",
                         "--adapters-dir", str(cli_world["adapters"]), "--no-progress", "--max-samples", "4",
                         *extra], capsys)
    assert code == EXIT_BAD_SETTINGS == 2 and says in err  # refused before anything loads, like every command
    assert snapshot(cli_world["adapters"]) == before
    assert [path.name for path in cli_world["adapters"].iterdir()] == ["kept"]


def test_eval_output_dir_that_cannot_be_created_fails_before_scoring(tmp_path: Path, data_folder: Path,
                                                                     model_folder: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, err = run_cli(["eval", "--data", str(data_folder), "--model", str(model_folder), "--users", "3",
                         "--output-dir", str(blocker / "out")], capsys)
    assert code == 2 and f"--output-dir {blocker / 'out'} cannot be created" in err
    assert "choose a writable folder" in err and "scoring" not in err
    assert blocker.read_text() == "not a folder"


def test_eval_replaces_its_files_whole_and_a_failed_write_keeps_the_old_one(
        cli_world, data_folder: Path, model_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    shutil.copytree(cli_world["out"], out)
    argv = ["eval", "--data", str(data_folder), "--model", str(model_folder), "--users", "4", "--candidates", "5",
            "--output-dir", str(out)]
    real_rename = __import__("os").rename
    before = {path.name: path.read_text() for path in out.iterdir()}

    def full_disk(source, target):
        if Path(target) == out and ".staging-" in Path(source).name:  # the new folder cannot move in
            raise OSError(28, "No space left on device")
        return real_rename(source, target)

    monkeypatch.setattr("os.rename", full_disk)
    code, err = run_cli(argv, capsys)
    assert code == 2 and "No space left on device" in err
    assert {path.name: path.read_text() for path in out.iterdir()} == before  # the old pair, both whole
    assert '{"earlier": true}' in before.values()
    assert sorted(path.name for path in tmp_path.iterdir() if path.name.startswith(".")) == []  # no staging left
    monkeypatch.setattr("os.rename", real_rename)
    assert run_cli(argv, capsys)[0] == 0
    summary = json.loads((out / "summary.json").read_text())
    rows = [line.split(",") for line in (out / "per_user.csv").read_text().splitlines()[1:]]
    runs = {row[1] for row in rows}  # the base and the baselines eval scores beside it, each on every user
    assert summary["users"] == 4 and "base" in runs and len(rows) == 4 * len(runs)
    assert len({row[0] for row in rows}) == 4
    assert sorted(path.name for path in out.iterdir()) == ["per_user.csv", "summary.json"]


# -- app fields and uploads ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def app_context(smol_tokenizer, tmp_path_factory: pytest.TempPathFactory):
    context = make_context(tmp_path_factory.mktemp("bad-input-app"), smol_tokenizer)
    make_adapter(context.models.loaded("tiny-llama"), context.config.adapters_root, "kept")
    return context


APP_FIELD_CASES = [
    ("unknown user", {"user_id": "nobody"}, SessionError, "user 'nobody' is not in dataset toy; pick one"),
    ("empty user", {"user_id": ""}, SessionError, "user '' is not in dataset toy"),
    ("path as user", {"user_id": "../../etc/passwd"}, SessionError, "is not in dataset toy"),
    ("adapter not in the list", {"system": "gone"}, AdapterError,
     "no adapter named 'gone' for model tiny-llama; available: kept"),
    ("adapter name as a path", {"system": "../../adapters/kept"}, AdapterError, "no adapter named"),
    ("unknown dataset", {"dataset": "/etc"}, SessionError, "no dataset named '/etc'; choose one of toy"),
    ("unknown model", {"model": "/models/evil"}, SessionError, "no model named '/models/evil'; choose one of"),
    ("too many candidates", {"count": 99}, ValueError, "from 1 to 52"),
    ("unknown preset", {"preset": "bogus"}, PromptError, "prompt preset 'bogus' is not one of"),
    ("unknown split", {"split": "train"}, ValueError, "split 'train' is not one of test, validation"),
]


@pytest.mark.parametrize(("name", "change", "error", "says"), APP_FIELD_CASES,
                         ids=[case[0] for case in APP_FIELD_CASES])
def test_bad_app_field_is_refused_and_the_app_keeps_serving(name: str, change: dict, error: type, says: str,
                                                            app_context) -> None:
    request = {"dataset": "toy", "model": "tiny-llama", "system": "base", "user_id": "u01"}
    settings = {"count": 5}
    for key in ("count", "preset", "split"):
        if key in change:
            settings[key] = change.pop(key)
    before = snapshot(app_context.config.adapters_root)
    with pytest.raises(error, match=says.replace("(", r"\(").replace(")", r"\)")):
        app_context.inspections.inspect(**{**request, **change}, settings=make_settings(**settings))
    assert snapshot(app_context.config.adapters_root) == before
    assert app_context.inspections.inspect(**request, settings=make_settings(count=5)).rank is not None


def test_upload_over_the_size_limit_is_refused_and_leaves_nothing(app_context, tmp_path: Path) -> None:
    limit = app_context.config.max_upload_bytes
    big = tmp_path / "interactions.csv"
    big.write_text("user_id,item_id,timestamp\n" + "u1,i1,1600000000\n" * (limit // 17 + 10))
    small = tmp_path / "items.csv"
    small.write_text(ITEMS)
    before = snapshot(app_context.config.upload_root)
    names = list(app_context.datasets.names)
    with pytest.raises(DataError, match=r"file interactions.csv: the file is .* MiB, over the 0.0625 MiB upload "
                                        "limit: upload a subset"):
        app_context.datasets.add_upload([small, big], "too-big")
    assert snapshot(app_context.config.upload_root) == before and app_context.datasets.names == names


def test_upload_names_are_sanitised_into_the_upload_area(app_context, tmp_path: Path) -> None:
    sources = tmp_path / "src"
    write_pair(sources, ITEMS, EVENTS)
    outside = snapshot(app_context.config.upload_root.parent)
    entry = app_context.datasets.add_upload([sources / "items.csv", sources / "interactions.csv"],
                                            "../../etc/evil\n<b>")
    upload_root = app_context.config.upload_root.resolve()
    assert entry.path.resolve().parent == upload_root
    assert entry.name == "evil_b" and entry.name in app_context.datasets.names  # the last part, cleaned
    assert sorted(path.name for path in entry.path.iterdir()) == ["interactions.csv", "items.csv"]
    created = set(snapshot(app_context.config.upload_root.parent)) - set(outside)
    assert all(path.startswith("uploads/") for path in created), created
    # A second upload under the same name never replaces the first.
    again = app_context.datasets.add_upload([sources / "items.csv", sources / "interactions.csv"], "evil_b")
    assert again.name == "evil_b-2" and (entry.path / "items.csv").is_file()


def test_bad_upload_content_names_the_file_as_the_user_knows_it(app_context, tmp_path: Path) -> None:
    folder = write_pair(tmp_path / "src", ITEMS, EVENTS + "u1,i6,yesterday\n")
    before = snapshot(app_context.config.upload_root)
    with pytest.raises(DataError) as caught:
        app_context.datasets.add_upload([folder / "items.csv", folder / "interactions.csv"], "bad")
    message = str(caught.value)
    assert "interactions.csv, line 7, field 'timestamp'" in message and "not a number" in message
    assert str(app_context.config.upload_root) not in message  # no server paths in what the client sees
    assert snapshot(app_context.config.upload_root) == before
    with pytest.raises(DataError, match="no file was uploaded"):
        app_context.datasets.add_upload([], "nothing")


def test_bad_fine_tune_form_values_are_refused_before_anything_starts(app_context) -> None:
    cases = [
        ({"lora_r": -1}, "lora_r must be a whole number from 1 to 4096, got -1"),
        ({"learning_rate": 0}, r"learning_rate must be in \(0, 1\], got 0"),
        ({"lora_dropout": 1.5}, r"lora_dropout must be in \[0, 1\)"),
        ({"preset": "bogus"}, "prompt preset 'bogus' is not one of"),
        ({"output_dir": "/tmp/x"}, "unknown training setting"),
    ]
    runs_before = snapshot(app_context.config.runs_root)
    for overrides, says in cases:
        with pytest.raises(ValueError, match=says):
            app_context.finetune.start("ok-name", "toy", "tiny-llama", "quick", overrides)
    for name in ("../evil", "a/b", "x\ny"):
        with pytest.raises(AdapterError, match="is not allowed"):
            app_context.finetune.start(name, "toy", "tiny-llama", "quick", {"max_samples": 4})
    with pytest.raises(AdapterError, match="adapter 'kept' already exists"):
        app_context.finetune.start("kept", "toy", "tiny-llama", "quick", {"max_samples": 4})
    assert snapshot(app_context.config.runs_root) == runs_before
    assert not app_context.finetune.jobs.status().active



def test_uploads_past_the_dataset_cap_are_refused_and_leave_nothing(app_context, tmp_path: Path, monkeypatch) -> None:
    from rerank_app import context as app_module

    sources = tmp_path / "src"
    write_pair(sources, ITEMS, EVENTS)
    files = [sources / "items.csv", sources / "interactions.csv"]
    monkeypatch.setattr(app_module, "MAX_DATASET_ENTRIES", len(app_context.datasets.names) + 1)
    app_context.datasets.add_upload(files, "last-one")  # the cap's last place
    before = snapshot(app_context.config.upload_root)
    with pytest.raises(DataError, match="datasets already: restart it to upload more"):
        app_context.datasets.add_upload(files, "one-too-many")
    assert snapshot(app_context.config.upload_root) == before
