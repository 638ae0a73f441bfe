"""The HTML report is one self-contained file: plotly.js inlined, no network, every section present."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import build_tiny_llama, make_toy_dataset, tiny_loaded

from rerank_core.candidates import CandidateConfig
from rerank_core.compare import compare_systems
from rerank_core.inspector import Inspector, InspectSettings
from rerank_core.prompts import get_preset
from rerank_core.report import comparison_report, inspection_report, plotly_js_path

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = InspectSettings(preset=get_preset("seed"), candidates=CandidateConfig(count=52, seed=4))
_FIGURES = re.compile(r'<script type="application/json" id="ri-figures">(.*?)</script>', re.S)


def figures(document: str) -> dict[str, tuple[list, dict]]:
    """The report's plotly.js figures: div id -> (data, layout), read back from their JSON block."""
    (block,) = _FIGURES.findall(document)
    return {div: (figure["data"], figure["layout"]) for div, figure in json.loads(block).items()}


@pytest.fixture(scope="module")
def inspector(smol_tokenizer) -> Inspector:
    dataset = make_toy_dataset(users=12, items=120)
    return Inspector(dataset, tiny_loaded(smol_tokenizer))


def test_importing_the_report_does_not_import_plotly_or_the_ui():
    code = ("import sys, rerank_core.report, rerank_core.cli.main; "
            "print(sorted(name for name in ('plotly', 'gradio', 'rerank_app') if name in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert plotly_js_path().name == "plotly.min.js"


def test_inspection_report_holds_settings_prompt_audit_and_a_chart(inspector, smol_tokenizer):
    result = inspector.inspect("u03", SETTINGS)
    document = inspection_report(result, inspector.dataset, model="tiny-llama",
                                 special_tokens=smol_tokenizer.all_special_tokens)
    plotly_js = plotly_js_path().read_text(encoding="utf-8")
    assert plotly_js in document  # inlined whole
    ours = document.replace(plotly_js, "")
    assert "<script src" not in ours and "http" not in ours  # nothing fetched from anywhere
    for heading in ("Settings", "Letter probabilities", "Candidates", "Letter audit", "Rendered prompt",
                    "History", "Top non-letter tokens"):
        assert f"<h2>{heading}</h2>" in document
    assert "⟦&lt;|im_start|&gt;⟧" in document  # special tokens visible and escaped
    assert "<td>ok</td>" in document  # an unflagged letter says so
    (data, layout), = figures(document).values()
    letters = list(result.prepared.prompt.letters)
    assert layout["xaxis"]["tickvals"] == letters and len(letters) == 52  # every letter labelled
    truth = result.prepared.candidates.target_index
    assert data[0]["marker"]["color"][truth] == "#e8590c"
    assert layout["annotations"][0]["x"] == letters[truth]  # marked however small its bar


def test_comparison_report_holds_metrics_with_cis_charts_and_movers(smol_tokenizer, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model

    from rerank_core.adapters import MANIFEST_FILE

    loaded = tiny_loaded(smol_tokenizer)
    torch.manual_seed(3)
    peft_model = get_peft_model(build_tiny_llama(smol_tokenizer), LoraConfig(
        r=2, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "tuned")
    (tmp_path / "tuned" / MANIFEST_FILE).write_text(json.dumps(
        {"preset": "seed_after", "base_model": {"name": loaded.name, "fingerprint": loaded.fingerprint}}))
    inspector = Inspector(make_toy_dataset(users=12), loaded, adapters_root=str(tmp_path))
    settings = InspectSettings(preset=get_preset("seed"), candidates=CandidateConfig(count=8, seed=1))
    per_user, summary = compare_systems(inspector, inspector.dataset.users, settings, ["base", "tuned"],
                                        bootstrap_samples=200)
    document = comparison_report(per_user, summary, settings, dataset="toy", model="tiny-llama")
    assert "Δ NDCG@10 [95% CI]" in document and "base @ seed_after (vs reference, same preset)" in document
    assert "base (preset effect)" in document and "Most improved and most worsened users" in document
    charts = figures(document)
    assert set(charts) == {"differences", "scatter"}
    names = [trace["name"] for trace in charts["differences"][0]]
    assert names == ["base @ seed_after − base", "tuned − base @ seed_after"]


def test_cli_show_html_and_eval_report(smol_tokenizer, tmp_path, capsys):
    from rerank_core.cli.main import main

    model = tmp_path / "model"
    build_tiny_llama(smol_tokenizer).save_pretrained(model, safe_serialization=True)
    smol_tokenizer.save_pretrained(model)
    data = tmp_path / "data"
    data.mkdir()
    dataset = make_toy_dataset(users=8)
    (data / "items.csv").write_text("item_id,title\n" + "".join(
        f"{item.item_id},{item.title}\n" for item in dataset.items.values()))
    (data / "interactions.csv").write_text("user_id,item_id,timestamp\n" + "".join(
        f"{user},{item},{1_600_000_000 + step}\n" for user, sequence in dataset.sequences.items()
        for step, item in enumerate(sequence)))
    common = ["--model", str(model), "--data", str(data), "--dtype", "fp32", "--candidates", "6"]
    assert main(["show", "--user", "u01", "--format", "html", "--output", str(tmp_path / "u01.html"), *common]) == 0
    assert "Letter audit" in (tmp_path / "u01.html").read_text(encoding="utf-8")
    assert main(["eval", "--users", "8", "--output-dir", str(tmp_path / "eval"), "--report",
                 str(tmp_path / "eval.html"), *common]) == 0
    capsys.readouterr()
    assert "Metrics with paired 95% CIs" in (tmp_path / "eval.html").read_text(encoding="utf-8")
