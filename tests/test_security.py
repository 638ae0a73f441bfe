"""Security: loopback by default, --auth enforced, no endpoint takes a server path, safetensors only, no remote code."""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path

import httpx
import psutil
import pytest
import torch
from app_helpers import custom_code_model, make_adapter, make_context
from conftest import make_toy_dataset, save_tiny_model, write_csv_dataset
from gradio_client import Client, handle_file

import app as app_module
from rerank_app.context import AppConfig, AppContext, DatasetEntry, ModelEntry
from rerank_app.pickers import make_settings
from rerank_app.ports import free_port
from rerank_app.server import build_app, launch
from rerank_core.data.dataset import Dataset, Item
from rerank_core.models import ModelError, load_model, load_tokenizer

USER, PASSWORD = "alice", "s3cret-pw"
SECRET = "TOP-SECRET-TITLE"


@pytest.fixture(scope="module")
def honeypot(smol_tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Outside every registry, yet loadable as a dataset, a model and an adapter if anything took its path."""
    folder = tmp_path_factory.mktemp("honeypot")
    items = {f"s{n}": Item(f"s{n}", f"{SECRET} {n}") for n in range(30)}
    sequences = {f"u{n:02d}": [f"s{(n + k) % 30}" for k in range(6)] for n in range(30)}
    write_csv_dataset(Dataset("secret", items, sequences), folder)
    save_tiny_model(smol_tokenizer, folder)
    (folder / "adapter_config.json").write_text("{}")
    (folder / "adapter_model.safetensors").write_bytes(b"")
    return folder


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, smol_tokenizer):
    """The app over a tiny model, launched as `python app.py --auth` would, on the default host."""
    context = make_context(tmp_path_factory.mktemp("secure-app"), smol_tokenizer)
    make_adapter(context.models.loaded("tiny-llama"), context.config.adapters_root, "lora-a")
    demo = build_app(context)
    port = free_port()
    launch(demo, port=port, auth=(USER, PASSWORD), max_upload_bytes=context.config.max_upload_bytes,
                      block=False)
    yield context, f"http://127.0.0.1:{port}", port
    demo.close()


def test_the_app_binds_loopback_unless_told_otherwise(served) -> None:
    _, _, port = served
    assert app_module.parse_args([]).host == "127.0.0.1" and app_module.parse_args([]).share is False
    assert inspect.signature(launch).parameters["host"].default == "127.0.0.1"
    listening = [connection.laddr.ip for connection in psutil.Process().net_connections("tcp")
                 if connection.laddr.port == port and connection.status == psutil.CONN_LISTEN]
    assert listening == ["127.0.0.1"]
    assert app_module.parse_args(["--host", "0.0.0.0"]).host == "0.0.0.0"  # only when asked


def test_auth_rejects_requests_without_valid_credentials(served) -> None:
    _, url, _ = served
    for path in ("/config", "/gradio_api/info", "/gradio_api/file=/etc/passwd"):
        assert httpx.get(url + path).status_code == 401
    response = httpx.post(url + "/gradio_api/call/inspect_json", json={"data": ["u01"]})
    assert response.status_code == 401 and "Not authenticated" in response.text
    with pytest.raises(Exception, match="credentials were not provided"):
        Client(url, verbose=False)
    with pytest.raises(ValueError, match="Could not login"):
        Client(url, auth=(USER, "wrong"), verbose=False)
    client = Client(url, auth=(USER, PASSWORD), verbose=False)
    assert client.predict(user_id="u01", count=5, api_name="/inspect_json")["user_id"] == "u01"


def test_auth_option_and_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    assert app_module._auth("bob:pw:with:colons") == ("bob", "pw:with:colons")
    monkeypatch.setenv(app_module.AUTH_ENV, "carol:pw")
    assert app_module._auth(None) == ("carol", "pw")
    for bad in ("nopassword", ":pw", "user:"):
        with pytest.raises(SystemExit, match="must look like user:password"):
            app_module._auth(bad)
    monkeypatch.delenv(app_module.AUTH_ENV)
    assert app_module._auth(None) is None


def _valid_value(parameter: dict):
    if parameter["parameter_has_default"]:
        return parameter["parameter_default"]
    return parameter.get("example_input")


def test_no_endpoint_accepts_a_server_path(served, honeypot: Path) -> None:
    """Walk the API description: files come only as uploads; every text field, given a path, refuses or ignores it."""
    context, url, _ = served
    client = Client(url, auth=(USER, PASSWORD), verbose=False)
    api = client.view_api(return_format="dict", print_info=False)
    assert not api["unnamed_endpoints"]
    file_parameters = []
    registries = (context.datasets.names, context.models.names, context.models.adapter_names("tiny-llama"))
    honeypot_files = sorted(path.name for path in honeypot.iterdir())
    tried = 0
    for endpoint, description in api["named_endpoints"].items():
        parameters = description["parameters"]
        for parameter in parameters:
            words = f"{parameter['parameter_name']} {parameter['label']}".lower()
            if parameter["component"] == "File" or "filepath" in str(parameter["python_type"]):
                file_parameters.append((endpoint, parameter["parameter_name"]))
                continue
            assert not any(word in parameter["parameter_name"] for word in ("path", "dir", "folder", "file")), \
                (endpoint, words)
        if endpoint in ("/upload_data", "/cancel_finetune", "/finetune_status"):
            continue
        base = {parameter["parameter_name"]: _valid_value(parameter) for parameter in parameters}
        if endpoint == "/start_finetune":
            base.update(name="fuzz-run", dataset="toy", model="tiny-llama", training_preset="quick")
        for parameter in parameters:
            python_type = str(parameter["python_type"]["type"])
            if "str" not in python_type and "Literal" not in python_type:
                continue
            value = [str(honeypot)] if python_type.startswith("list") else str(honeypot)
            tried += 1
            try:
                result = client.predict(**{**base, parameter["parameter_name"]: value}, api_name=endpoint)
            except Exception as error:  # refused: the message may echo the value, never the folder's content
                assert SECRET not in str(error), (endpoint, parameter["parameter_name"])
                continue
            assert SECRET not in json.dumps(result, default=str), (endpoint, parameter["parameter_name"])
    assert tried > 40
    assert file_parameters == [("/upload_data", "paths")]
    assert (context.datasets.names, context.models.names, context.models.adapter_names("tiny-llama")) == registries
    assert sorted(path.name for path in honeypot.iterdir()) == honeypot_files
    assert not context.finetune.jobs.status().active
    assert client.predict(user_id="u01", count=5, api_name="/inspect_json")["user_id"] == "u01"  # still serving


def _session(url: str) -> httpx.Client:
    session = httpx.Client(base_url=url)
    assert session.post("/login", data={"username": USER, "password": PASSWORD}).json() == {"success": True}
    return session


def test_uploads_take_only_uploaded_files_under_the_limit_and_sanitise_names(served, tmp_path: Path) -> None:
    context, url, _ = served
    session = _session(url)
    # A client naming a server file as if it were an upload is refused by Gradio before the handler runs.
    started = session.post("/gradio_api/call/upload_data", json={"data": [
        [{"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}}], "stolen", "auto"]}).json()
    result = session.get(f"/gradio_api/call/upload_data/{started['event_id']}").text
    assert "event: error" in result and "was not uploaded by a user" in result
    assert "stolen" not in context.datasets.names
    # Files over the limit are refused at the door.
    too_big = session.post("/gradio_api/upload", files={"files": ("items.csv", b"a" * (70 * 1024))})
    assert too_big.status_code == 413 and "maximum allowed size" in too_big.text
    # Gradio's file route serves nothing of the project or the system.
    for path in ("/etc/passwd", str(Path(app_module.__file__).resolve()), str(context.config.adapters_root)):
        assert session.get(f"/gradio_api/file={path}").status_code == 403
    # A real upload with a hostile dataset name lands in the upload area under a clean name.
    folder = write_csv_dataset(make_toy_dataset(users=5, items=30, length=5), tmp_path / "upload")
    client = Client(url, auth=(USER, PASSWORD), verbose=False)
    message, *_ = client.predict(paths=[handle_file(str(folder / "items.csv")),
                                        handle_file(str(folder / "interactions.csv"))],
                                 name="../../../etc/cron.d/x", chosen_format="auto", api_name="/upload_data")
    assert "Loaded **x**" in message
    assert (context.config.upload_root / "x" / "items.csv").is_file()


def test_weights_are_only_read_from_safetensors(model_folder_with_adapter, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real model and adapter load and score with every unpickling path booby-trapped."""
    import pickle

    def refuse(*args, **kwargs):
        raise AssertionError("weights were unpickled")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    model_folder, adapters = model_folder_with_adapter
    loaded = load_model(model_folder, dtype="fp32")
    from rerank_core.inspector import Inspector

    inspector = Inspector(make_toy_dataset(), loaded, adapters_root=str(adapters))
    assert inspector.inspect("u01", make_settings(count=5), "lora-a").rank is not None


@pytest.fixture(scope="module")
def model_folder_with_adapter(smol_tokenizer, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("safetensors-only")
    model_folder = save_tiny_model(smol_tokenizer, root / "model")
    make_adapter(load_model(model_folder, dtype="fp32"), root / "adapters", "lora-a")
    return model_folder, root / "adapters"


def _custom_code_tokenizer(source: Path, target: Path) -> Path:
    target.mkdir()
    shutil.copy(source / "tokenizer.json", target / "tokenizer.json")
    (target / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CustomTokenizer", "auto_map": {"AutoTokenizer": ["custom_tok.CustomTokenizer", None]}}))
    (target / "custom_tok.py").write_text(f"open({str(target / 'RAN')!r}, 'w').close()\n")
    return target


def test_remote_code_is_never_run_unless_the_user_passes_the_flag(model_folder_with_adapter, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    model_folder, _ = model_folder_with_adapter
    custom = custom_code_model(model_folder, tmp_path / "custom-model")
    tokenizer = _custom_code_tokenizer(model_folder, tmp_path / "custom-tokenizer")
    assert inspect.signature(load_model).parameters["trust_remote_code"].default is False
    with pytest.raises(ModelError, match="--trust-remote-code only if you trust it"):
        load_model(custom, dtype="fp32")
    with pytest.raises(ModelError, match="contains custom code"):
        load_tokenizer(tokenizer)
    # The CLI, without --trust-remote-code.
    from rerank_core.cli import main as cli

    data = write_csv_dataset(make_toy_dataset(), tmp_path / "data")
    assert cli.main(["show", "--model", str(custom), "--data", str(data), "--user", "u01"]) == 2
    assert "custom code" in capsys.readouterr().err
    assert cli.main(["train", "--model", str(custom), "--data", str(data), "--name", "x", "--no-progress",
                     "--adapters-dir", str(tmp_path / "adapters")]) == 1
    assert "--trust-remote-code only if you trust it" in capsys.readouterr().err
    # The app: a model entry pointing at the folder is refused when first used.
    config = AppConfig(adapters_root=tmp_path / "adapters", upload_root=tmp_path / "uploads",
                       runs_root=tmp_path / "runs")
    context = AppContext(config, [DatasetEntry("toy", make_toy_dataset(), data)], [ModelEntry("custom", str(custom))])
    with pytest.raises(ModelError, match="custom code"):
        context.models.loaded("custom")
    assert not (custom / "RAN").exists() and not (tokenizer / "RAN").exists()


def test_job_status_over_the_api_is_never_taken_for_a_server_file() -> None:
    """gradio_client downloads any dict with a "path" string: a finished run's adapter path must not look like one."""
    from gradio_client.utils import is_file_obj, traverse

    from rerank_app.jobs import JobStatus
    from rerank_app.tabs.finetune import status_json

    payload = status_json(JobStatus(state="done", result={"path": "/srv/adapters/x", "samples": 4}))
    taken_for_files: list[dict] = []
    traverse(payload, taken_for_files.append, is_file_obj)
    assert taken_for_files == [] and payload["result"]["adapter_path"] == "/srv/adapters/x"
