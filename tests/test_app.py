"""The served app driven through gradio_client: score, compare, fine-tune, upload, and refusals that keep it serving."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from app_helpers import TINY_TRAINING, make_adapter, make_context
from gradio_client import Client, handle_file

import app as app_module
from rerank_app.pickers import make_settings
from rerank_app.ports import free_port
from rerank_app.server import build_app, launch
from rerank_core.inspector import BASE, Inspector
from rerank_core.models import load_model


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, smol_tokenizer):
    context = make_context(tmp_path_factory.mktemp("app"), smol_tokenizer)
    make_adapter(context.models.loaded("tiny-llama"), context.config.adapters_root, "lora-a")
    demo = build_app(context)
    port = free_port()
    launch(demo, port=port, block=False)
    client = Client(f"http://127.0.0.1:{port}/", verbose=False)
    yield context, client
    context.finetune.jobs.wait(timeout=60)
    demo.close()


def test_named_endpoints_take_names_not_paths(served) -> None:
    _, client = served
    endpoints = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert {"/inspect", "/inspect_json", "/random_user", "/compare_user", "/compare", "/start_finetune",
            "/cancel_finetune", "/finetune_status", "/training_preview", "/data_stats",
            "/upload_data"} <= set(endpoints)
    inspect_parameters = [parameter["parameter_name"] for parameter in endpoints["/inspect"]["parameters"]]
    assert inspect_parameters[:2] == ["dataset", "model"] and "user_id" in inspect_parameters


def test_inspect_scores_a_user_exactly_like_the_core(served) -> None:
    context, client = served
    summary, history, _, candidates, chart, prompt, tokens, audit, audit_note, _ = client.predict(
        user_id="u03", count=12, api_name="/inspect")
    assert summary.startswith("**User u03**") and "rank" in summary
    assert len(candidates["data"]) == 12 and [row[3] for row in candidates["data"]].count("★") == 1
    assert len(audit["data"]) == 12 and "clean" in audit_note
    assert "ri-special" in prompt and tokens.count('class="ri-tok') > 100 and chart["type"] == "plotly"
    assert len(history["data"]) == 11  # a 12-item sequence: all but the test target

    payload = client.predict(user_id="u03", count=12, api_name="/inspect_json")
    fresh = Inspector(context.datasets.get("toy").dataset, load_model(context.models.path("tiny-llama")))
    expected = fresh.inspect("u03", make_settings(count=12))
    assert [row["probability"] for row in payload["candidates"]] == pytest.approx(
        list(expected.scores.letter_probs), abs=1e-5)
    assert payload["rank"] == expected.rank and payload["rendered_prompt"] == expected.prepared.prompt.rendered


def test_bad_requests_are_refused_and_the_app_keeps_serving(served) -> None:
    _, client = served
    with pytest.raises(Exception, match="not in dataset toy"):
        client.predict(user_id="nobody", api_name="/inspect_json")
    with pytest.raises(Exception, match="no adapter named"):
        client.predict(user_id="u01", adapter="../../etc", api_name="/inspect_json")
    with pytest.raises(Exception, match="candidate count"):
        client.predict(user_id="u01", count=99, api_name="/inspect_json")
    assert client.predict(dataset="toy", api_name="/random_user") in {f"u{n:02d}" for n in range(30)}


def test_compare_on_one_user_and_on_many(served) -> None:
    _, client = served
    chart, table = client.predict(adapters=["lora-a"], user_id="u02", count=10, api_name="/compare_user")
    assert [row[0] for row in table["data"]] == [BASE, "lora-a"]
    assert [trace["name"] for trace in json.loads(chart["plot"])["data"]] == [BASE, "lora-a"]
    counts, metrics, differences, scatter, movers, _ = client.predict(
        adapters=["lora-a"], users=10, count=10, api_name="/compare")
    assert json.loads(scatter["plot"])["data"][0]["name"] == "lora-a vs base"
    assert [row[0] for row in metrics["data"]] == [BASE, "lora-a", "random", "popularity", "retriever"]
    assert len(differences["data"]) == 9 * 4 and "improved" in counts  # the adapter and 3 baselines vs base
    assert all(row[1] == "lora-a" for row in movers["data"])
    with pytest.raises(Exception, match="at most 3 adapters"):
        client.predict(adapters=["a", "b", "c", "d"], users=10, api_name="/compare")


def test_training_preview_lists_tokens_and_their_loss(served) -> None:
    _, client = served
    preview = client.predict(candidates=10, preset="seed_after", api_name="/training_preview")
    answer = preview["caption"].split("answer letter '")[1][0]
    flags = [token["loss"] for token in preview["tokens"]]
    first = flags.index(True)
    assert preview["tokens"][first]["token"] == answer and all(flags[first:]) and not any(flags[:first])


def test_fine_tune_start_refuses_a_second_run_and_cancels(served) -> None:
    context, client = served
    started = client.predict(name="api-run", **TINY_TRAINING, api_name="/start_finetune")
    assert started["state"] == "running" and started["name"] == "api-run"
    with pytest.raises(Exception, match="still running"):
        client.predict(name="api-run-2", api_name="/start_finetune")
    assert client.predict(api_name="/cancel_finetune")["state"] == "cancelling"
    deadline = time.monotonic() + 120
    status = client.predict(api_name="/finetune_status")
    while status["active"] and time.monotonic() < deadline:
        time.sleep(0.5)
        status = client.predict(api_name="/finetune_status")
    assert status["state"] == "cancelled", status
    assert "api-run" not in context.models.adapter_names("tiny-llama")
    with pytest.raises(Exception, match="not allowed"):
        client.predict(name="../outside", api_name="/start_finetune")


def test_uploads_are_validated_named_safely_and_usable(served, tmp_path: Path) -> None:
    context, client = served
    bad = tmp_path / "items.csv"
    bad.write_text("item_id;title\ni1;A\n")
    message, _, _ = client.predict([handle_file(bad)], "bad", "auto", api_name="/upload_data")
    assert message == ("**Could not load the upload:** the uploaded files: found items.csv but not "
                       "interactions.csv: the csv format needs items.csv and interactions.csv in the same folder")
    (tmp_path / "interactions.csv").write_text("user_id,item_id,timestamp\n")
    message, _, _ = client.predict([handle_file(bad), handle_file(tmp_path / "interactions.csv")], "bad", "auto",
                                   api_name="/upload_data")
    assert message.startswith("**Could not load the upload:** file items.csv, line 1:") and "';'" in message
    folder = tmp_path / "good"
    folder.mkdir()
    (folder / "items.csv").write_text("item_id,title\n" + "".join(f"i{i},Book {i}\n" for i in range(30)))
    (folder / "interactions.csv").write_text("user_id,item_id,timestamp\n" + "".join(
        f"v{u},i{(u + k) % 30},{1000 + k}\n" for u in range(6) for k in range(6)))
    message, _, _ = client.predict([handle_file(folder / "items.csv"), handle_file(folder / "interactions.csv")],
                                   "../my books", "auto", api_name="/upload_data")
    assert "Loaded **my_books**" in message
    assert (context.config.upload_root / "my_books" / "items.csv").is_file()
    payload = client.predict(user_id="v2", dataset="my_books", count=5, api_name="/inspect_json")
    assert payload["user_id"] == "v2" and len(payload["candidates"]) == 5
    summary = client.predict("my_books", api_name="/data_stats")[0]
    assert "**6** users" in summary


def test_command_line_defaults_bind_locally_and_parse_auth(monkeypatch: pytest.MonkeyPatch) -> None:
    args = app_module.parse_args([])
    assert args.host == "127.0.0.1" and args.share is False and args.port == 7860
    monkeypatch.delenv(app_module.AUTH_ENV, raising=False)
    assert app_module._auth(None) is None
    assert app_module._auth("ann:se:cret") == ("ann", "se:cret")
    monkeypatch.setenv(app_module.AUTH_ENV, "bob:pw")
    assert app_module._auth(None) == ("bob", "pw")
    with pytest.raises(SystemExit, match="user:password"):
        app_module._auth("no-password")
