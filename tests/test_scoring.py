"""The batched last-position scorer against a plain full forward pass, and its batch-size invariance."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import build_tiny_llama, letter_ids, probabilities, shared_prefix_prompts, toy_prompts

from rerank_core.scoring import LetterScores, ScoreCache, score_token_ids


def reference_last_logits(model, ids: list[int]) -> torch.Tensor:
    """The seed's way: one prompt, full logits at every position, read the last one."""
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, -1].float()


@pytest.fixture(scope="module")
def model_and_prompts(smol_tokenizer):
    return build_tiny_llama(smol_tokenizer), toy_prompts(smol_tokenizer)


def test_last_position_logits_equal_a_full_forward_pass(smol_tokenizer, model_and_prompts) -> None:
    model, prompts = model_and_prompts
    assert len({len(ids) for ids in prompts}) == len(prompts)  # mixed lengths: real left padding
    reference = [reference_last_logits(model, ids) for ids in prompts]
    # Make one prompt's favourite token a letter, so exclusion from top_other is really exercised.
    favourite = int(reference[0].argmax())
    ids = [*letter_ids(smol_tokenizer), favourite, favourite]  # a repeated ID counts once in the mass
    scores = score_token_ids(model, smol_tokenizer, prompts, ids, batch_size=4, top_other=5)
    assert len(scores) == len(prompts)
    for ref, score, prompt in zip(reference, scores, prompts):
        expected_logits = ref[ids]
        assert torch.allclose(torch.tensor(score.letter_logits), expected_logits, atol=1e-5)
        assert torch.allclose(torch.tensor(score.letter_probs), torch.softmax(expected_logits, dim=-1), atol=1e-5)
        assert math.isclose(sum(score.letter_probs), 1.0, abs_tol=1e-5)
        full = torch.softmax(ref, dim=-1)
        assert score.letter_mass == pytest.approx(float(full[sorted(set(ids))].sum()), abs=1e-5)
        assert 0.0 < score.letter_mass <= 1.0
        # top_other: the best non-letter tokens with their full-vocabulary probabilities, best first.
        others = full.clone()
        others[sorted(set(ids))] = -1
        values, expected_top = others.topk(5)
        assert [token_id for _, token_id, _ in score.top_other] == expected_top.tolist()
        assert not set(ids) & {token_id for _, token_id, _ in score.top_other}
        assert [p for _, _, p in score.top_other] == pytest.approx(values.tolist(), abs=1e-6)
        assert [token for token, _, _ in score.top_other] == smol_tokenizer.convert_ids_to_tokens(
            expected_top.tolist())
        assert score.prompt_tokens == len(prompt)
    assert favourite not in {token_id for _, token_id, _ in scores[0].top_other}


def test_logits_are_computed_at_the_last_position_only(smol_tokenizer, model_and_prompts) -> None:
    model, prompts = model_and_prompts
    shapes = []
    handle = model.lm_head.register_forward_hook(lambda module, args, output: shapes.append(tuple(output.shape)))
    try:
        score_token_ids(model, smol_tokenizer, prompts[:3], letter_ids(smol_tokenizer), batch_size=3,
                        share_prefix=False)
        score_token_ids(model, smol_tokenizer, prompts[:3], letter_ids(smol_tokenizer), batch_size=3)
    finally:
        handle.remove()
    # From scratch one batch; with a shared prefix one more row for the prefix pass (its logits are unused).
    assert shapes == [(3, 1, len(smol_tokenizer)), (1, 1, len(smol_tokenizer)), (3, 1, len(smol_tokenizer))]


def test_batch_size_does_not_change_results_fp32(smol_tokenizer, model_and_prompts) -> None:
    model, prompts = model_and_prompts
    ids = letter_ids(smol_tokenizer)
    runs = {size: score_token_ids(model, smol_tokenizer, prompts, ids, batch_size=size) for size in (1, 3, 8)}
    for size in (3, 8):
        assert torch.allclose(probabilities(runs[size]), probabilities(runs[1]), atol=1e-5)
        for alone, batched in zip(runs[1], runs[size]):
            assert batched.letter_logits == pytest.approx(alone.letter_logits, abs=1e-5)
            assert batched.letter_mass == pytest.approx(alone.letter_mass, abs=1e-6)
    # Results come back in the caller's order even though batches are sorted by length.
    reversed_run = score_token_ids(model, smol_tokenizer, prompts[::-1], ids, batch_size=8)
    assert torch.allclose(probabilities(reversed_run[::-1]), probabilities(runs[1]), atol=1e-5)


def test_batch_size_does_not_change_results_bf16(smol_tokenizer) -> None:
    model = build_tiny_llama(smol_tokenizer, seed=1).to(torch.bfloat16)
    prompts = toy_prompts(smol_tokenizer, count=8)
    ids = letter_ids(smol_tokenizer)
    alone = score_token_ids(model, smol_tokenizer, prompts, ids, batch_size=1)
    batched = score_token_ids(model, smol_tokenizer, prompts, ids, batch_size=8)
    assert torch.allclose(probabilities(batched), probabilities(alone), atol=0.02)
    for one, many in zip(alone, batched):
        assert math.isclose(sum(many.letter_probs), 1.0, abs_tol=1e-5)
        assert many.letter_mass == pytest.approx(one.letter_mass, rel=0.05)


def test_ranking_is_by_probability_and_stable_on_ties() -> None:
    scores = LetterScores(letter_logits=(0.0, 1.0, 1.0, -1.0), letter_probs=(0.1, 0.35, 0.35, 0.2),
                          letter_mass=0.5, top_other=(), prompt_tokens=3)
    assert scores.ranking() == [1, 2, 3, 0]


def test_bad_arguments_are_refused(smol_tokenizer, model_and_prompts) -> None:
    model, prompts = model_and_prompts
    with pytest.raises(ValueError, match="letter_token_ids is empty"):
        score_token_ids(model, smol_tokenizer, prompts, [])
    with pytest.raises(ValueError, match="batch_size"):
        score_token_ids(model, smol_tokenizer, prompts, [1], batch_size=0)


def dummy(value: float) -> LetterScores:
    return LetterScores((value,), (1.0,), value, (), 1)


def test_score_cache_is_least_recently_used() -> None:
    cache = ScoreCache(capacity=2)
    cache.put(("a",), dummy(1))
    cache.put(("b",), dummy(2))
    assert cache.get(("a",)).letter_mass == 1  # "a" is now the most recent
    cache.put(("c",), dummy(3))
    assert len(cache) == 2
    assert cache.get(("b",)) is None
    assert cache.get(("a",)).letter_mass == 1
    assert cache.get(("c",)).letter_mass == 3
    cache.put(("a",), dummy(4))  # replacing refreshes, not duplicates
    cache.put(("d",), dummy(5))
    assert len(cache) == 2 and cache.get(("c",)) is None and cache.get(("a",)).letter_mass == 4


def embedded_tokens(model) -> list[int]:
    """Counts the tokens each forward pass embeds, to see how much the model actually computed."""
    counts: list[int] = []
    model.get_input_embeddings().register_forward_hook(lambda module, args, output: counts.append(args[0].numel()))
    return counts


@pytest.mark.parametrize("batch_size", [1, 2, 8])
def test_shared_prefix_scores_equal_scoring_from_scratch_fp32(smol_tokenizer, batch_size: int) -> None:
    model = build_tiny_llama(smol_tokenizer, seed=3)
    prompts = shared_prefix_prompts(smol_tokenizer)
    assert len({len(ids) for ids in prompts}) > 1  # suffixes of different lengths: padding inside the batch
    ids = letter_ids(smol_tokenizer)
    counts = embedded_tokens(model)
    scratch = score_token_ids(model, smol_tokenizer, prompts, ids, batch_size=batch_size, share_prefix=False)
    scratch_tokens = sum(counts)
    counts.clear()
    shared = score_token_ids(model, smol_tokenizer, prompts, ids, batch_size=batch_size)
    assert sum(counts) < scratch_tokens * 0.7  # the prefix really ran once
    assert float((probabilities(shared) - probabilities(scratch)).abs().max()) <= 1e-5
    for alone, reused in zip(scratch, shared):
        assert reused.letter_logits == pytest.approx(alone.letter_logits, abs=1e-5)
        assert reused.letter_mass == pytest.approx(alone.letter_mass, abs=1e-6)
        assert [token_id for _, token_id, _ in reused.top_other] == [token_id for _, token_id, _ in alone.top_other]
        assert reused.prompt_tokens == alone.prompt_tokens


def test_shared_prefix_matches_a_plain_forward_pass_with_a_lora_adapter(smol_tokenizer) -> None:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build_tiny_llama(smol_tokenizer, seed=4),
                           LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                      init_lora_weights=False)).eval()
    prompts = shared_prefix_prompts(smol_tokenizer)
    ids = letter_ids(smol_tokenizer)
    shared = score_token_ids(model, smol_tokenizer, prompts, ids, batch_size=3)
    reference = torch.stack([torch.softmax(reference_last_logits(model, prompt)[ids], dim=-1) for prompt in prompts])
    assert float((probabilities(shared) - reference).abs().max()) <= 1e-5
    with model.disable_adapter():  # the base under the same wrapper: a different answer, also reused correctly
        base = score_token_ids(model, smol_tokenizer, prompts, ids, batch_size=3)
        base_reference = torch.stack([torch.softmax(reference_last_logits(model, prompt)[ids], dim=-1)
                                      for prompt in prompts])
    assert float((probabilities(base) - base_reference).abs().max()) <= 1e-5
    assert float((probabilities(base) - probabilities(shared)).abs().max()) > 1e-3


def test_prompts_without_a_long_common_prefix_are_scored_from_scratch(smol_tokenizer) -> None:
    model = build_tiny_llama(smol_tokenizer, seed=5)
    prompts = [[11, 12, 13, 14, 15, 16], [11, 12, 99, 98], [11, 12, 13, 14, 15, 16, 17]]
    counts = embedded_tokens(model)
    score_token_ids(model, smol_tokenizer, prompts, letter_ids(smol_tokenizer), batch_size=8)
    assert counts == [3 * 32]  # one batch, from scratch, padded to the length bucket


def test_bf16_scoring_keeps_the_residual_stream_in_fp32_and_removes_its_hooks(smol_tokenizer) -> None:
    model = build_tiny_llama(smol_tokenizer, seed=6).to(torch.bfloat16)
    layer = model.model.layers[1]
    seen: list[torch.dtype] = []
    layer.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    prompts = toy_prompts(smol_tokenizer, count=2)
    scores = score_token_ids(model, smol_tokenizer, prompts, letter_ids(smol_tokenizer), share_prefix=False)
    assert seen == [torch.float32]  # the residual reaching layer 2 was added in fp32
    assert all(math.isclose(sum(score.letter_probs), 1.0, abs_tol=1e-5) for score in scores)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompts[0]])).logits  # a plain forward afterwards: no hook left
    assert seen[-1] == torch.bfloat16 and logits.dtype == torch.bfloat16
    reference = build_tiny_llama(smol_tokenizer, seed=6)  # the same weights in fp32
    exact = score_token_ids(reference, smol_tokenizer, prompts, letter_ids(smol_tokenizer), share_prefix=False)
    assert float((probabilities(scores) - probabilities(exact)).abs().max()) < 0.01


def test_token_budget_batches_give_the_same_scores_as_fixed_batches_fp32(smol_tokenizer, model_and_prompts) -> None:
    model, prompts = model_and_prompts
    ids = letter_ids(smol_tokenizer)
    fixed = score_token_ids(model, smol_tokenizer, prompts, ids, batch_size=8, share_prefix=False)
    counts = embedded_tokens(model)
    budget = 2 * 32 * -(-max(map(len, prompts)) // 32)  # two of the longest prompts' padded rows a pass
    budgeted = score_token_ids(model, smol_tokenizer, prompts, ids, batch_size=8, share_prefix=False,
                               token_budget=budget)
    assert max(counts) <= budget < sum(counts)  # the budget, not the row count, cut the batches
    assert len(counts) > -(-len(prompts) // 8)
    assert float((probabilities(budgeted) - probabilities(fixed)).abs().max()) <= 1e-5
    for one, other in zip(fixed, budgeted):
        assert one.ranking() == other.ranking()
        assert other.letter_mass == pytest.approx(one.letter_mass, abs=1e-6)


def test_a_prompt_longer_than_the_token_budget_runs_alone(smol_tokenizer) -> None:
    model = build_tiny_llama(smol_tokenizer, seed=7)
    prompts = [list(range(100, 100 + length)) for length in (150, 40, 45)]
    counts = embedded_tokens(model)
    score_token_ids(model, smol_tokenizer, prompts, letter_ids(smol_tokenizer), share_prefix=False, token_budget=128)
    assert counts == [2 * 64, 160]  # the two short ones together, the long one alone over the budget


def test_token_budget_is_bounded(smol_tokenizer, model_and_prompts) -> None:
    from rerank_core.limits import LimitError

    model, prompts = model_and_prompts
    for budget in (63, 262_145, 1.5):
        with pytest.raises(LimitError, match="token budget"):
            score_token_ids(model, smol_tokenizer, prompts, letter_ids(smol_tokenizer), token_budget=budget)


def test_padded_batches_reach_attention_without_a_mask(smol_tokenizer, model_and_prompts, monkeypatch) -> None:
    """Right padding: causal attention alone keeps real tokens off the pads, so SDPA runs its plain causal path
    (about 1.7x faster on CPU than with a mask for 1,500-token prompts)."""
    model, prompts = model_and_prompts
    real = torch.nn.functional.scaled_dot_product_attention
    masks: list[object] = []

    def spy(*args, **kwargs):
        masks.append(kwargs.get("attn_mask"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    assert len({len(ids) for ids in prompts[:4]}) == 4  # mixed lengths: padding inside the batch
    score_token_ids(model, smol_tokenizer, prompts[:4], letter_ids(smol_tokenizer), batch_size=4,
                    share_prefix=False)
    assert masks and all(mask is None for mask in masks)


def test_a_prefix_that_is_a_small_part_of_the_prompts_is_not_shared(smol_tokenizer) -> None:
    model = build_tiny_llama(smol_tokenizer, seed=8)
    header = list(range(200, 240))  # 40 shared tokens: above the 32-token floor, a tenth of each prompt
    prompts = [header + list(range(300 + shift, 660 + shift)) for shift in (0, 1)]
    counts = embedded_tokens(model)
    score_token_ids(model, smol_tokenizer, prompts, letter_ids(smol_tokenizer))
    assert counts == [2 * 416]  # one from-scratch pass, no prefix pass
