"""What a reader needs to see: every letter labelled, the truth marked, tokens and flags spelled out."""

from __future__ import annotations

from conftest import make_toy_dataset, tiny_loaded

from rerank_app import views
from rerank_core.candidates import CandidateConfig
from rerank_core.diagnostics import tables, template_consistency
from rerank_core.inspector import Inspector, InspectSettings
from rerank_core.prompts import get_preset


def test_52_letters_are_all_labelled_and_the_truth_is_marked(smol_tokenizer) -> None:
    dataset = make_toy_dataset(users=4, items=120, length=30)
    inspector = Inspector(dataset, tiny_loaded(smol_tokenizer))
    result = inspector.inspect("u01", InspectSettings(preset=get_preset("llamarec"),
                                                      candidates=CandidateConfig(count=52)))
    layout = views.inspect_view(result, dataset, smol_tokenizer, model_name="tiny").chart["layout"]
    letters = list(result.prepared.prompt.letters)
    assert layout["xaxis"]["tickvals"] == letters and len(letters) == 52
    truth = letters[result.prepared.candidates.target_index]
    assert [(note["x"], note["text"].startswith("truth")) for note in layout["annotations"]
            if note["x"] == truth] == [(truth, True)]
    # llamarec keeps at most 20 history items: the note says that limit, not the token budget.
    _, note = views._history_table(result, dataset)
    assert "preset 'llamarec' shows at most 20 history items" in note


def test_instruction_letters_are_not_highlighted_as_labels(smol_tokenizer) -> None:
    inspector = Inspector(make_toy_dataset(users=4), tokenizer=smol_tokenizer)
    prepared = inspector.prepare("u01", InspectSettings(candidates=CandidateConfig(count=20)))
    assert "(A-T)" in prepared.prompt.rendered  # the seed instruction names the letter range
    letter_ids = [token.token_id for token in prepared.letter_tokens]
    page = views.token_html(smol_tokenizer, prepared.token_ids, letter_ids=letter_ids)
    # The legend, then one label per candidate: not the A and T of "(A-T)" too.
    assert page.count("ri-tok ri-letter") == 1 + 20


def test_template_tables_spell_newlines_and_unflagged_letters(smol_tokenizer) -> None:
    report = template_consistency(smol_tokenizer, get_preset("seed"))
    tokens = tables.template_tokens_frame(report)
    shown = " ".join(str(value) for value in tokens["training token"])
    assert "↵" in shown and "Ċ" not in shown
    assert set(tables.template_letters_frame(report)["flags"]) == {"ok"}


def test_empty_compare_tables_have_their_real_headers() -> None:
    empty = views.empty_compare_tables()
    assert list(empty["differences"].columns)[:4] == ["system", "population", "metric", "base"]
    assert "Recall@1" in empty["metrics"].columns and "user_id" in empty["movers"].columns
