"""Diagnostics on tiny real Llamas whose answers can be worked out by hand."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from conftest import inference_only_system, make_toy_dataset

from rerank_core.adapters import MANIFEST_FILE
from rerank_core.candidates import CandidateConfig
from rerank_core.diagnostics import (
    OrderSpec,
    candidate_orders,
    history_influence,
    kendall_tau_b,
    letter_mass,
    letter_prior,
    position_bias,
    position_bias_over_users,
    template_consistency,
)
from rerank_core.inspector import Inspector, InspectSettings
from rerank_core.models import LoadedModel, model_fingerprint
from rerank_core.prompts import build_prompt, get_preset

COUNT = 6
SETTINGS = InspectSettings(preset=get_preset("seed"), candidates=CandidateConfig(count=COUNT, seed=3))
USERS = ["u00", "u01", "u02", "u03"]


def blind_llama(tokenizer, *, prefer_token: int | None = None, seed: int = 0) -> LoadedModel:
    """A real Llama whose layers write nothing, so the last-position logits depend on the last token only.

    With prefer_token, the final norm keeps one always-positive dimension and the output head reads
    only that dimension into prefer_token's logit: that token wins whatever the prompt says.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight[:, 0] = 1.0  # dimension 0 is positive for every token
        model.lm_head.weight.mul_(50.0)  # a peaked, not near-uniform, letter distribution
        if prefer_token is not None:
            model.model.norm.weight.zero_()
            model.model.norm.weight[0] = 1.0
            model.lm_head.weight.zero_()
            model.lm_head.weight[prefer_token, 0] = 50.0
    return LoadedModel(model=model, tokenizer=tokenizer, name="blind-llama", path="(in memory)", device="cpu",
                       dtype=torch.float32, fingerprint=model_fingerprint(model.config, tokenizer))


def letter_id(tokenizer, letter: str) -> int:
    return tokenizer.convert_tokens_to_ids(letter)


def last_token_probs(loaded: LoadedModel, last_token: int, letter_ids: list[int]) -> tuple[np.ndarray, float]:
    """What a blind model says after any prompt ending in last_token: letter softmax and letter mass."""
    with torch.no_grad():
        logits = loaded.model(input_ids=torch.tensor([[last_token]])).logits[0, -1].float()
    letters = torch.softmax(logits[letter_ids], dim=-1).numpy()
    mass = float(torch.softmax(logits, dim=-1)[sorted(set(letter_ids))].sum())
    return letters, mass


@pytest.fixture(scope="module")
def dataset():
    return make_toy_dataset()


@pytest.fixture(scope="module")
def prefers_a(smol_tokenizer, dataset) -> Inspector:
    return Inspector(dataset, blind_llama(smol_tokenizer, prefer_token=letter_id(smol_tokenizer, "A")))


@pytest.fixture(scope="module")
def blind(smol_tokenizer, dataset) -> Inspector:
    return Inspector(dataset, blind_llama(smol_tokenizer))


# -- orders and tau ---------------------------------------------------------------------------


def test_rotations_put_every_item_once_at_every_position():
    orders = candidate_orders(5)
    assert orders[0] == (0, 1, 2, 3, 4)
    assert len(orders) == 5
    for position in range(5):
        assert sorted(order[position] for order in orders) == list(range(5))


def test_permutations_are_seeded_distinct_and_start_with_the_original():
    spec = OrderSpec(mode="permutations", count=7, seed=11)
    orders = candidate_orders(6, spec)
    assert orders == candidate_orders(6, spec)
    assert orders[0] == tuple(range(6)) and len(set(orders)) == 7
    assert candidate_orders(6, OrderSpec(mode="permutations", count=7, seed=12)) != orders
    # Fewer distinct orders than asked: each once.
    assert len(candidate_orders(3, OrderSpec(mode="permutations", count=50))) == 6


def test_order_spec_rejects_unknown_modes():
    with pytest.raises(ValueError, match="rotations"):
        OrderSpec(mode="shuffle")


def test_kendall_tau_b_hand_cases():
    assert kendall_tau_b([1, 2, 3], [10, 20, 30]) == 1.0
    assert kendall_tau_b([1, 2, 3], [3, 2, 1]) == -1.0
    # One item on top, the rest tied, a different top: only the two tops' pair counts, and it disagrees.
    n = 5
    first, second = [1, 0, 0, 0, 0], [0, 1, 0, 0, 0]
    assert kendall_tau_b(first, second) == pytest.approx(-1 / (n - 1))
    assert math.isnan(kendall_tau_b([1, 1, 1], [1, 2, 3]))


# -- position bias ----------------------------------------------------------------------------


def test_a_preferring_model_puts_all_mass_on_a_whatever_the_items(prefers_a):
    result = position_bias(prefers_a, "u00", SETTINGS)
    assert len(result.orders) == COUNT
    assert result.position_probs[:, 0] == pytest.approx(np.ones(COUNT))
    assert result.letter_means == pytest.approx([1.0] + [0.0] * (COUNT - 1))
    assert (result.top1_positions == 0).all()
    # Each item stands at A exactly once: its probability averaged over rotations is exactly 1/N.
    assert result.debiased == pytest.approx(np.full(COUNT, 1 / COUNT))
    # Every pair of rotations has different top items and ties elsewhere: tau-b = -1/(N-1).
    assert result.stability == pytest.approx(-1 / (COUNT - 1))
    # The truth is rank 1 only in the rotation that puts it at A; ties rank it last otherwise.
    assert result.truth_rank_counts.tolist() == [1] + [0] * (COUNT - 2) + [COUNT - 1]
    assert result.rank_debiased == COUNT
    assert result.item_position_probs[:, 0] == pytest.approx(np.ones(COUNT))


def test_a_preferring_model_over_users(prefers_a):
    summary = position_bias_over_users(prefers_a, USERS, SETTINGS)
    assert summary.mass_by_letter == pytest.approx([1.0] + [0.0] * (COUNT - 1))
    assert summary.top1_a_rate == 1.0
    assert summary.uniform == pytest.approx(1 / COUNT)
    metrics = summary.metrics()
    # Over all rotations the truth is top-1 once in N: Recall@1 averages to exactly 1/N.
    assert metrics["over_orders"]["Recall@1"] == pytest.approx(1 / COUNT)
    assert metrics["debiased"]["Recall@1"] == 0.0
    payload = json.loads(json.dumps(summary.to_json()))
    assert payload["top1_a_rate"] == 1.0 and len(payload["per_user"]) == len(USERS)


def test_a_single_order_has_no_stability_and_stays_valid_json(prefers_a):
    summary = position_bias_over_users(prefers_a, USERS[:2], SETTINGS, spec=OrderSpec("permutations", count=1))
    assert math.isnan(summary.users[0].stability) and math.isnan(summary.mean_stability)
    payload = json.loads(json.dumps(summary.to_json(), allow_nan=False))
    assert payload["mean_stability"] is None and payload["per_user"][0]["stability"] is None
    json.dumps(summary.users[0].to_json(), allow_nan=False)


def test_blind_model_letter_means_equal_the_last_token_distribution(blind, smol_tokenizer):
    """A model that reads only the last token gives each letter the same probability in every order."""
    result = position_bias(blind, "u01", SETTINGS)
    prepared = blind.prepare("u01", SETTINGS)
    expected, _ = last_token_probs(blind.loaded, prepared.token_ids[-1],
                                   [token.token_id for token in prepared.letter_tokens])
    for row in result.position_probs:
        assert row == pytest.approx(expected, abs=1e-5)
    assert result.letter_means == pytest.approx(expected, abs=1e-5)
    assert result.debiased == pytest.approx(np.full(COUNT, 1 / COUNT), abs=1e-6)


def test_rotations_reorder_the_prompt_and_map_back_to_items(tiny_smol, dataset):
    """On a model that reads the items, each order's scores map back to the right items."""
    inspector = Inspector(dataset, tiny_smol)
    result = position_bias(inspector, "u02", SETTINGS)
    shown = inspector.inspect("u02", SETTINGS)
    assert result.position_probs[0] == pytest.approx(shown.scores.letter_probs)
    for row, order in enumerate(result.orders):
        for position, item in enumerate(order):
            assert result.item_probs[row, item] == result.position_probs[row, position]
    assert result.letter_means.sum() == pytest.approx(1.0)
    assert result.debiased.sum() == pytest.approx(1.0)
    assert result.truth_rank_counts.sum() == COUNT
    # One batch per user gives the same numbers as one prompt at a time.
    inspector.cache = type(inspector.cache)()
    single = position_bias(inspector, "u02", SETTINGS, batch_size=1)
    assert single.position_probs == pytest.approx(result.position_probs, abs=1e-5)
    # The last rotation's prompt lists the candidates starting from the original last one.
    texts = [dataset.text(item) for item in shown.prepared.candidates.item_ids]
    rotated = [texts[index] for index in result.orders[-1]]
    variant = inspector.variant(shown.prepared, SETTINGS, order=result.orders[-1])
    assert f"A. {rotated[0]}\nB. {rotated[1]}" in variant.prompt.text
    target = shown.prepared.candidates.target_index
    assert variant.candidates.item_ids[variant.candidates.target_index] == shown.prepared.candidates.item_ids[target]


# -- letter prior -----------------------------------------------------------------------------


def test_letter_prior_of_a_preferring_model_is_all_a(prefers_a):
    prior = letter_prior(prefers_a, USERS, SETTINGS, mode="blank")
    assert prior.mean == pytest.approx([1.0] + [0.0] * (COUNT - 1))
    assert prior.top_letter_share[0] == 1.0
    assert prior.normalized_entropy == pytest.approx(0.0, abs=1e-6)


def test_letter_prior_hides_the_candidate_texts(blind, dataset):
    prior = letter_prior(blind, USERS[:1], SETTINGS, mode="placeholder", placeholder="something")
    prepared = blind.prepare(USERS[0], SETTINGS)
    expected, _ = last_token_probs(blind.loaded, prepared.token_ids[-1],
                                   [token.token_id for token in prepared.letter_tokens])
    assert prior.mean == pytest.approx(expected, abs=1e-5)
    variant = blind.variant(prepared, SETTINGS, candidate_texts=["something"] * COUNT)
    assert "A. something\nB. something" in variant.prompt.text
    assert not any(dataset.text(item) in variant.prompt.text for item in prepared.candidates.item_ids)
    with pytest.raises(ValueError, match="placeholder"):
        letter_prior(blind, USERS, SETTINGS, mode="nothing")


# -- history influence ------------------------------------------------------------------------


def test_a_model_blind_to_history_shows_zero_influence(blind):
    result = history_influence(blind, "u03", SETTINGS)
    assert len(result.history_ids) == 11  # 12 interactions, the last is the test target
    assert result.positions == tuple(range(1, 12))
    assert np.abs(result.truth_delta).max() == pytest.approx(0.0, abs=1e-6)
    assert result.total_variation.max() == pytest.approx(0.0, abs=1e-6)
    assert not result.top1_changed.any()
    assert result.most_influential() == []


def test_history_influence_on_a_reading_model(tiny_smol, dataset):
    inspector = Inspector(dataset, tiny_smol)
    result = history_influence(inspector, "u03", SETTINGS)
    shown = inspector.inspect("u03", SETTINGS)
    assert result.full_probs == pytest.approx(shown.scores.letter_probs)
    assert result.total_variation.max() > 0  # a random Llama reads its whole prompt
    top = result.most_influential(3)
    assert len(top) == 3
    assert abs(result.truth_delta[top[0]]) == pytest.approx(np.abs(result.truth_delta).max())
    payload = json.loads(json.dumps(result.to_json()))
    assert sum(row["influential"] for row in payload["history"]) == 3


def test_history_influence_needs_a_shown_history(blind, dataset, smol_tokenizer):
    prepared = blind.prepare("u00", SETTINGS)
    bare = build_prompt(smol_tokenizer, get_preset("seed"), [], prepared.candidate_texts)
    tight = InspectSettings(preset=get_preset("seed"), candidates=SETTINGS.candidates,
                            max_prompt_tokens=bare.token_count)
    with pytest.raises(ValueError, match="shows no history item"):
        history_influence(blind, "u00", tight)


# -- template consistency ---------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["seed", "seed_after", "llamarec", "llamarec_after"])
def test_smollm2_templates_are_consistent(smol_tokenizer, preset):
    report = template_consistency(smol_tokenizer, get_preset(preset))
    assert report.ok and report.is_prefix and not report.problems
    assert report.answer_token[2] == "A"
    assert report.loss_tokens[0] == report.answer_token
    assert smol_tokenizer.decode([row[1] for row in report.loss_tokens]).startswith("A")
    assert "token prefix" in report.explanation
    json.dumps(report.to_json())


def test_inference_only_system_turn_is_a_mismatch(smol_tokenizer):
    broken = copy.deepcopy(smol_tokenizer)
    broken.chat_template = inference_only_system(smol_tokenizer.chat_template)
    report = template_consistency(broken, get_preset("seed"))
    assert not report.ok and not report.is_prefix
    assert report.problems[0].kind == "not_prefix"
    assert "Answer at once." in report.problems[0].message
    inference = {index: token for index, _, token in report.inference_window}
    training = {index: token for index, _, token in report.training_window}
    assert training[report.diverge_at] == "You" and inference[report.diverge_at] == "Answer"
    assert report.loss_tokens == () and report.answer_token is None


def test_generation_prompt_with_a_thinking_block_is_trimmed_and_explained(smol_tokenizer):
    good = template_consistency(smol_tokenizer, get_preset("seed"))
    thinking = copy.deepcopy(smol_tokenizer)
    thinking.chat_template = smol_tokenizer.chat_template.replace(
        "'<|im_start|>assistant\n'", "'<|im_start|>assistant\n<think>\n'")
    assert thinking.chat_template != smol_tokenizer.chat_template
    report = template_consistency(thinking, get_preset("seed"))
    assert report.ok and report.is_prefix
    assert report.generation_prompt == "<|im_start|>assistant\n<think>\n"
    # Scored where the finished turn puts the letter: exactly where the plain ChatML template scores.
    assert report.prompt_ids == good.prompt_ids and report.answer_token[2] == "A"
    assert [problem.kind for problem in report.problems] == ["generation_prompt_trimmed"]
    assert report.problems[0].severity == "warning" and "'<think>\\n'" in report.problems[0].message


def test_training_block_before_the_letter_joins_the_scored_prompt(smol_tokenizer):
    """A template that writes an empty thinking block into the assistant turn: the letter is scored after it."""
    thinking = copy.deepcopy(smol_tokenizer)
    thinking.chat_template = smol_tokenizer.chat_template.replace(
        "message['content'] + '<|im_end|>'",
        "(('<think>\n\n</think>\n\n' + message['content']) if message['role'] == 'assistant' "
        "else message['content']) + '<|im_end|>'")
    report = template_consistency(thinking, get_preset("seed"))
    assert report.is_prefix and report.ok
    assert [problem.kind for problem in report.problems] == ["inserted_before_answer"]
    assert "'<think>\\n\\n</think>\\n\\n'" in report.problems[0].message
    assert report.answer_token[2] == "A"
    assert [token for _, _, token in report.loss_tokens] == ["A", "<|im_end|>", "Ċ"]
    assert "warning: the chat template puts" in report.explanation


def test_llama2_text_preset_trains_the_bare_letter(llama2_tokenizer):
    report = template_consistency(llama2_tokenizer, get_preset("llamarec"))
    assert report.ok and not report.problems and report.generation_prompt is None
    assert [token for _, _, token in report.loss_tokens] == ["A", "</s>"]
    assert report.inference_window[-1][2] == "<0x0A>"


def test_llama2_chat_template_trains_a_word_start_letter(llama2_chat_tokenizer):
    """`[/INST] A </s>`: training teaches '▁A', while the seed strategy scores the bare 'A'."""
    report = template_consistency(llama2_chat_tokenizer, get_preset("seed"))
    assert report.ok and report.is_prefix
    assert report.answer_token[2] == "▁A"
    assert [problem.kind for problem in report.problems] == ["letter_with_space", "seed_differs"]
    assert all(token.as_trained_token == "▁" + token.letter for token in report.letter_tokens)


# -- letter mass ------------------------------------------------------------------------------


def _publish_boost_adapter(loaded: LoadedModel, root, name: str, token_id: int) -> None:
    """A LoRA on the output head that adds a large logit to token_id (read from the positive dimension 0)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(copy.deepcopy(loaded.model), LoraConfig(
        r=1, lora_alpha=1, target_modules=["lm_head"], lora_dropout=0.0))
    with torch.no_grad():
        layer = model.base_model.model.lm_head
        layer.lora_A["default"].weight.zero_()
        layer.lora_A["default"].weight[0, 0] = 1.0
        layer.lora_B["default"].weight.zero_()
        layer.lora_B["default"].weight[token_id, 0] = 1000.0
    folder = root / name
    model.save_pretrained(folder, save_embedding_layers=False)
    (folder / MANIFEST_FILE).write_text(json.dumps({
        "preset": "seed", "base_model": {"name": loaded.name, "fingerprint": loaded.fingerprint}}))


def test_letter_mass_base_vs_adapter(smol_tokenizer, dataset, tmp_path):
    loaded = blind_llama(smol_tokenizer, seed=1)
    _publish_boost_adapter(loaded, tmp_path, "boost-b", letter_id(smol_tokenizer, "B"))
    inspector = Inspector(dataset, loaded, adapters_root=str(tmp_path))
    prepared = inspector.prepare(USERS[0], SETTINGS)
    # Before the adapter is loaded: PEFT wraps the base model's modules in place.
    _, expected = last_token_probs(loaded, prepared.token_ids[-1],
                                   [token.token_id for token in prepared.letter_tokens])
    report = letter_mass(inspector, USERS, SETTINGS, systems=["base", "boost-b"])
    base = report.frame[report.frame["system"] == "base"]["letter_mass"]
    assert base.to_numpy() == pytest.approx(np.full(len(USERS), expected), rel=1e-4)
    assert expected < 0.5  # a random head spreads mass over the whole vocabulary
    summary = report.summary().set_index("system")
    assert summary.loc["boost-b", "mean"] == pytest.approx(1.0)
    assert summary.loc["base", "below_half"] == 1.0 and summary.loc["boost-b", "below_half"] == 0.0
    # The same adapter moves every position-bias letter to B.
    bias = position_bias(inspector, USERS[0], SETTINGS, system="boost-b")
    assert bias.letter_means[1] == pytest.approx(1.0)
    json.dumps(report.to_json())


def test_scoring_needs_a_model(smol_tokenizer, dataset):
    inspector = Inspector(dataset, tokenizer=smol_tokenizer)
    with pytest.raises(ValueError, match="needs a model"):
        position_bias(inspector, "u00", SETTINGS)


# -- views ------------------------------------------------------------------------------------


def test_position_views_show_the_bias(prefers_a, blind):
    from rerank_app import diagnostic_views as views
    from rerank_core.diagnostics import tables

    result = position_bias(prefers_a, "u00", SETTINGS)
    heatmap = views.position_heatmap(result)
    assert np.asarray(heatmap.data[0].z).shape == (COUNT, COUNT)
    assert np.asarray(heatmap.data[0].z)[:, 0] == pytest.approx(np.ones(COUNT))
    other = position_bias(blind, "u00", SETTINGS)
    chart = views.letter_bias_chart([result, other])
    assert [trace.name for trace in chart.data] == ["base", "base"]
    assert chart.data[0].y[0] == pytest.approx(1.0)
    assert sum(views.truth_rank_chart([result]).data[0].y) == COUNT
    items = tables.position_items_frame(result)
    assert len(items) == COUNT and (items["debiased"] == round(1 / COUNT, 4)).all()
    assert (items["truth"] == "★ truth").sum() == 1
    assert (items["rank_debiased"] == COUNT).all()  # all tied: each ranks last, as the metrics count it
    assert sorted(items["rank"]) == [1] + [COUNT] * (COUNT - 1)

    summary = position_bias_over_users(prefers_a, USERS[:2], SETTINGS)
    assert views.top1_share_chart([summary]).data[0].y[0] == 1.0
    row = tables.position_summary_frame([summary]).iloc[0]
    assert row["top-1 is A"] == 1.0 and row["users"] == 2 and row["orders"] == COUNT


def test_prior_history_and_mass_views(prefers_a, blind):
    from rerank_app import diagnostic_views as views
    from rerank_core.diagnostics import tables

    prior = letter_prior(prefers_a, USERS[:2], SETTINGS)
    frame = tables.letter_prior_frame([prior])
    assert frame["base"].tolist()[0] == 1.0 and frame["uniform"].iloc[0] == round(1 / COUNT, 4)
    assert views.letter_prior_chart([prior]).data[0].y[0] == pytest.approx(1.0)

    influence = history_influence(blind, "u01", SETTINGS)
    table = tables.history_influence_frame(influence)
    assert len(table) == len(influence.history_ids) and not table["influential"].any()
    chart = views.history_influence_chart(influence)
    assert [trace.name for trace in chart.data] == ["history item", "most influential"]  # no top-1 markers

    report = letter_mass(blind, USERS[:2], SETTINGS)
    assert tables.letter_mass_frame(report)["users"].tolist() == [2]
    assert len(views.letter_mass_chart(report).data) == 1


def test_template_views_mark_the_divergence(smol_tokenizer):
    from rerank_app import diagnostic_views as views
    from rerank_core.diagnostics import tables

    broken = copy.deepcopy(smol_tokenizer)
    broken.chat_template = inference_only_system(smol_tokenizer.chat_template)
    report = template_consistency(broken, get_preset("seed"))
    tokens = tables.template_tokens_frame(report)
    marked = tokens[tokens["note"] == "first difference"]
    assert marked["index"].tolist() == [report.diverge_at]
    assert marked["training token"].tolist() == ["You"] and not marked["same"].iloc[0]
    assert "BROKEN" in views.template_markdown(report)
    good = template_consistency(smol_tokenizer, get_preset("seed"))
    assert "OK, consistent" in views.template_markdown(good)
    letters = tables.template_letters_frame(good)
    assert letters["as-trained token"].tolist()[:2] == ["A", "B"]


# -- command line -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prefers_a_folder(smol_tokenizer, tmp_path_factory):
    """The A-preferring Llama saved as a model folder, for the command line."""
    folder = tmp_path_factory.mktemp("prefers-a")
    loaded = blind_llama(smol_tokenizer, prefer_token=letter_id(smol_tokenizer, "A"))
    loaded.model.save_pretrained(folder)
    smol_tokenizer.save_pretrained(folder)
    return folder


def _run_cli(capsys, *argv: str) -> tuple[int, dict]:
    from rerank_core.cli.main import main

    code = main(list(argv))
    return code, json.loads(capsys.readouterr().out)


def test_cli_position_bias_and_history(prefers_a_folder, capsys):
    common = ("--model", str(prefers_a_folder), "--dtype", "fp32", "--candidates", "5", "--format", "json")
    code, payload = _run_cli(capsys, "diagnose", "position-bias", "--users", "3", *common)
    assert code == 0
    base = payload["systems"]["base"]
    assert base["top1_a_rate"] == 1.0 and base["users"] == 3 and base["orders_per_user"] == 5
    code, payload = _run_cli(capsys, "diagnose", "position-bias", "--user", "u0002", "--orders", "permutations",
                             "--permutations", "4", *common)
    assert code == 0 and len(payload["systems"]["base"]["orders"]) == 4
    code, payload = _run_cli(capsys, "diagnose", "history", "--user", "u0002", *common)
    assert code == 0
    assert all(abs(row["truth_delta"]) < 1e-6 for row in payload["systems"]["base"]["history"])


def test_cli_prior_and_mass(prefers_a_folder, capsys):
    common = ("--model", str(prefers_a_folder), "--dtype", "fp32", "--candidates", "5", "--format", "json")
    code, payload = _run_cli(capsys, "diagnose", "letter-prior", "--users", "2", "--mode", "blank", *common)
    assert code == 0 and payload["systems"]["base"]["mean"][0] == pytest.approx(1.0)
    code, payload = _run_cli(capsys, "diagnose", "letter-mass", "--users", "2", *common)
    assert code == 0 and payload["summary"][0]["mean"] == pytest.approx(1.0)


def test_cli_template_exit_status(smol_tokenizer, tmp_path, capsys):
    from rerank_core.cli.main import main

    broken = copy.deepcopy(smol_tokenizer)
    broken.chat_template = inference_only_system(smol_tokenizer.chat_template)
    broken.save_pretrained(tmp_path)
    code, payload = _run_cli(capsys, "diagnose", "template", "--tokenizer", str(tmp_path), "--format", "json")
    assert code == 1 and payload["ok"] is False and payload["problems"][0]["kind"] == "not_prefix"
    assert main(["diagnose", "template", "--preset", "llamarec"]) == 0
    assert "token prefix of the training conversation" in capsys.readouterr().out


# -- the real model ---------------------------------------------------------------------------


@pytest.mark.slow
def test_real_model_position_bias_and_history():
    """SmolLM2-135M on the bundled sample: the identity order is exactly what Inspect shows."""
    from rerank_core.data.loaders import load_dataset
    from rerank_core.models import load_model

    dataset = load_dataset(None)
    inspector = Inspector(dataset, load_model(None))
    settings = InspectSettings(preset=get_preset("seed_after"), candidates=CandidateConfig(count=5, seed=0))
    user = min(dataset.users, key=lambda name: len(dataset.sequences[name]))  # the fewest prompts to score
    result = position_bias(inspector, user, settings)
    shown = inspector.inspect(user, settings)
    assert result.position_probs[0] == pytest.approx(shown.scores.letter_probs)
    assert result.letter_means.sum() == pytest.approx(1.0, abs=1e-4)
    assert result.debiased.sum() == pytest.approx(1.0, abs=1e-4)
    assert (result.letter_mass > 0).all() and (result.letter_mass <= 1).all()
    influence = history_influence(inspector, user, settings)
    assert influence.full_probs == pytest.approx(shown.scores.letter_probs)
    assert len(influence.history_ids) == len(shown.prepared.prompt.history_texts)


def test_rounding_noise_is_not_influence():
    """Shifts below INFLUENCE_FLOOR (batch-shape rounding on AVX2) make no item influential; one above does."""
    from rerank_core.diagnostics.history import INFLUENCE_FLOOR, HistoryInfluence

    full = np.array([0.2, 0.3, 0.5])
    noise = np.array([[5e-8, -5e-8, 0.0], [0.0, 3e-8, -3e-8], [0.0, 0.0, 0.0]])
    result = HistoryInfluence(system="base", user_id="u", preset="seed", letters=("A", "B", "C"),
                              candidate_ids=("i1", "i2", "i3"), target_index=2, positions=(1, 2, 3),
                              history_ids=("h1", "h2", "h3"), history_texts=("x", "y", "z"),
                              full_probs=full, without_probs=full[None, :] + noise)
    assert result.most_influential() == []
    moved = full[None, :] + noise
    moved[1] += np.array([0.0, 2 * INFLUENCE_FLOOR, -2 * INFLUENCE_FLOOR])
    shifted = HistoryInfluence(**{**result.__dict__, "without_probs": moved})
    assert shifted.most_influential() == [1]
