"""bf16 forward passes with prepacked and fused matmuls: close to fp32, adapters kept, nothing left behind."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_llama, letter_ids, probabilities, shared_prefix_prompts, toy_prompts

from rerank_core.mixed_precision import each_row_at, mixed_precision
from rerank_core.scoring import score_token_ids

needs_bf16_onednn = pytest.mark.skipif(
    not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()),
    reason="this CPU has no bf16 oneDNN: the prepacked path is not taken")


def calls_of(modules: list[torch.nn.Module]) -> list[int]:
    """How many times each module is entered (forward hooks fire around a replaced forward too)."""
    counts = [0] * len(modules)
    for index, module in enumerate(modules):
        module.register_forward_hook(lambda *_, index=index: counts.__setitem__(index, counts[index] + 1))
    return counts


@needs_bf16_onednn
def test_llama_mlp_runs_fused_and_every_replacement_is_undone(smol_tokenizer) -> None:
    model = build_tiny_llama(smol_tokenizer, seed=7).to(torch.bfloat16)
    mlp, attention = model.model.layers[0].mlp, model.model.layers[0].self_attn
    counts = calls_of([mlp, mlp.gate_proj, mlp.down_proj, attention, attention.q_proj])
    ids = torch.tensor([toy_prompts(smol_tokenizer, count=3)[2]])
    with torch.inference_mode(), mixed_precision(model):
        logits = model(input_ids=ids, logits_to_keep=1).logits
    # The MLP and attention each ran once as one fused block (their own projections were not entered).
    assert counts == [1, 0, 0, 1, 0]
    assert logits.dtype == torch.float32  # the fp32 head
    assert not [name for name, module in model.named_modules() if "forward" in vars(module)]
    with torch.inference_mode():
        plain = model(input_ids=ids, logits_to_keep=1).logits
    assert plain.dtype == torch.bfloat16 and counts == [2, 1, 1, 2, 1]


@needs_bf16_onednn
def test_prepacked_bf16_scores_stay_close_to_fp32(smol_tokenizer) -> None:
    prompts = toy_prompts(smol_tokenizer, count=6)
    exact = score_token_ids(build_tiny_llama(smol_tokenizer, seed=8), smol_tokenizer, prompts,
                            letter_ids(smol_tokenizer))
    fast = score_token_ids(build_tiny_llama(smol_tokenizer, seed=8).to(torch.bfloat16), smol_tokenizer, prompts,
                           letter_ids(smol_tokenizer))
    assert float((probabilities(fast) - probabilities(exact)).abs().max()) < 0.01


@needs_bf16_onednn
def test_lora_projections_keep_their_adapters_under_the_prepacked_path(smol_tokenizer) -> None:
    from peft import LoraConfig, get_peft_model

    def with_adapter(dtype: torch.dtype):
        torch.manual_seed(9)  # the same adapter weights for both precisions
        return get_peft_model(build_tiny_llama(smol_tokenizer, seed=9).to(dtype),
                              LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"],
                                         init_lora_weights=False)).eval()

    prompts = toy_prompts(smol_tokenizer, count=4)
    ids = letter_ids(smol_tokenizer)
    fast_model = with_adapter(torch.bfloat16)
    counts = calls_of([fast_model.base_model.model.model.layers[0].mlp.gate_proj])
    fast = score_token_ids(fast_model, smol_tokenizer, prompts, ids)
    assert counts[0] > 0  # up_proj carries an adapter: that MLP is not fused, its projections run one by one
    exact = score_token_ids(with_adapter(torch.float32), smol_tokenizer, prompts, ids)
    assert float((probabilities(fast) - probabilities(exact)).abs().max()) < 0.01
    with fast_model.disable_adapter():
        base = score_token_ids(fast_model, smol_tokenizer, prompts, ids)
    assert float((probabilities(base) - probabilities(fast)).abs().max()) > 1e-3  # the adapter was applied


def build_tiny_mistral(tokenizer, *, seed: int):
    """A tiny Mistral: attention code other than Llama's (a sliding-window argument), the same four projections."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                           pad_token_id=tokenizer.pad_token_id)
    return MistralForCausalLM(config).eval()


@needs_bf16_onednn
def test_attention_dtype_follows_the_attention_code_and_its_adapters(smol_tokenizer, monkeypatch) -> None:
    """Llama's attention: bf16 after fp32 rotary (faster with AMX; the 135M model's Δp 0.0124 -> 0.0100).
    Other attention code: fp32 queries, keys and values (Δp 0.0142 -> 0.0080). An adapter on a projection: bf16."""
    from peft import LoraConfig, get_peft_model

    real = torch.nn.functional.scaled_dot_product_attention
    dtypes: list[tuple[torch.dtype, ...]] = []

    def spy(query, key, value, *args, **kwargs):
        dtypes.append((query.dtype, key.dtype, value.dtype))
        return real(query, key, value, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    prompts = toy_prompts(smol_tokenizer, count=3)
    ids = letter_ids(smol_tokenizer)
    for build, expected in ((build_tiny_llama, torch.bfloat16), (build_tiny_mistral, torch.float32)):
        dtypes.clear()
        fast = score_token_ids(build(smol_tokenizer, seed=10).to(torch.bfloat16), smol_tokenizer, prompts, ids)
        assert dtypes and set(dtypes) == {(expected,) * 3}, build.__name__
        exact = score_token_ids(build(smol_tokenizer, seed=10), smol_tokenizer, prompts, ids)
        assert float((probabilities(fast) - probabilities(exact)).abs().max()) < 0.01, build.__name__
    dtypes.clear()
    wrapped = get_peft_model(build_tiny_mistral(smol_tokenizer, seed=10).to(torch.bfloat16),
                             LoraConfig(r=4, target_modules=["v_proj"], init_lora_weights=False)).eval()
    score_token_ids(wrapped, smol_tokenizer, prompts, ids)
    assert dtypes and set(dtypes) == {(torch.bfloat16,) * 3}
    assert not [name for name, module in wrapped.named_modules() if "forward" in vars(module)]


@needs_bf16_onednn
def test_rotary_angles_are_fp32_where_attention_is(smol_tokenizer) -> None:
    """cos/sin cast to bf16 rotate fp32 queries by rounded angles (the 135M model: Δp 0.0123 -> 0.0081)."""
    model = build_tiny_llama(smol_tokenizer, seed=11).to(torch.bfloat16)
    seen: list[torch.dtype] = []
    model.model.rotary_emb.register_forward_hook(lambda module, args, output: seen.append(output[0].dtype))
    ids = torch.tensor([toy_prompts(smol_tokenizer, count=3)[1]])
    with torch.inference_mode(), mixed_precision(model):
        model(input_ids=ids, logits_to_keep=1)
    with torch.inference_mode():
        model(input_ids=ids, logits_to_keep=1)
    assert seen == [torch.float32, torch.bfloat16]  # fp32 inside the block, the model's own dtype after it


@needs_bf16_onednn
def test_a_rotary_that_does_not_repeat_its_angles_keeps_fp32_attention(smol_tokenizer, monkeypatch) -> None:
    """The fast block turns each pair by the first half of cos and sin: a rotary whose halves differ (code other
    than Llama's) must not take it, but fp32 queries, keys and values, and still score close to fp32."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    class ReversedSecondHalf(LlamaRotaryEmbedding):
        def forward(self, x, position_ids):
            cos, sin = super().forward(x, position_ids)
            half = cos.shape[-1] // 2
            return (torch.cat((cos[..., :half], cos[..., half:].flip(-1)), dim=-1),
                    torch.cat((sin[..., :half], sin[..., half:].flip(-1)), dim=-1))

    real = torch.nn.functional.scaled_dot_product_attention
    dtypes: list[torch.dtype] = []

    def spy(query, key, value, *args, **kwargs):
        dtypes.append(query.dtype)
        return real(query, key, value, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    prompts, ids = toy_prompts(smol_tokenizer, count=3), letter_ids(smol_tokenizer)
    fast_model, exact_model = (build_tiny_llama(smol_tokenizer, seed=13).to(dtype)
                               for dtype in (torch.bfloat16, torch.float32))
    for model in (fast_model, exact_model):
        model.model.rotary_emb.__class__ = ReversedSecondHalf
    fast = score_token_ids(fast_model, smol_tokenizer, prompts, ids)
    assert dtypes and set(dtypes) == {torch.float32}
    exact = score_token_ids(exact_model, smol_tokenizer, prompts, ids)
    assert float((probabilities(fast) - probabilities(exact)).abs().max()) < 0.01


def test_rotary_and_norm_agree_with_llamas_own_code() -> None:
    """The fused rotary (of heads from weights with the rotary pairs side by side) and norm against transformers'
    apply_rotary_pos_emb and LlamaRMSNorm, rounded once."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

    from rerank_core.mixed_precision import _pairs_adjacent, _rms_norm, _rotated

    generator = torch.Generator().manual_seed(12)
    weight = torch.randn(5 * 8, 16, generator=generator)  # 5 heads of 8 dimensions
    hidden = torch.randn(2, 7, 16, generator=generator)  # [batch, length, width]
    angles = torch.randn(2, 7, 4, generator=generator)
    cos, sin = torch.cat((angles, angles), dim=-1).cos(), torch.cat((angles, angles), dim=-1).sin()  # as Llama's
    heads = (hidden @ weight.T).view(2, 7, 5, 8).to(torch.bfloat16)
    query, _ = apply_rotary_pos_emb(heads.float().transpose(1, 2), heads.float().transpose(1, 2), cos, sin)
    # Llama's result, its dimensions put in the pairs' order: 0, 4, 1, 5, ...
    expected = query.to(torch.bfloat16).transpose(1, 2).unflatten(-1, (2, 4)).transpose(-1, -2).flatten(-2)
    pairs = (hidden @ _pairs_adjacent(weight, 8).T).view(2, 7, 5, 8).to(torch.bfloat16)
    got = _rotated(pairs, cos, sin)
    assert got.dtype == torch.bfloat16
    assert float((got.float() - expected.float()).abs().max()) <= 2 ** -7 * float(expected.float().abs().max())
    assert float((got == expected).float().mean()) > 0.98  # the rest differ by one bf16 rounding step

    norm = LlamaRMSNorm(8, eps=1e-5).to(torch.bfloat16)
    torch.nn.init.normal_(norm.weight, generator=generator)
    residual = torch.randn(3, 4, 8, generator=generator)  # the fp32 residual stream
    torch.testing.assert_close(_rms_norm(norm, residual), norm(residual).to(torch.bfloat16), rtol=2 ** -7, atol=0)


@needs_bf16_onednn
@pytest.mark.parametrize("share_prefix", [False, True])
def test_the_last_layer_computes_only_the_positions_the_head_reads(smol_tokenizer, monkeypatch,
                                                                    share_prefix: bool) -> None:
    """Right-padded rows of different lengths, from scratch and against a shared prefix's cache: the last layer's
    MLP sees one row per prompt, and the scores equal those of the whole last layer."""
    import rerank_core.scoring as scoring

    model = build_tiny_llama(smol_tokenizer, seed=14, layers=3).to(torch.bfloat16)
    prompts, ids = shared_prefix_prompts(smol_tokenizer), letter_ids(smol_tokenizer)
    rows_seen: list[tuple[int, ...]] = []
    model.model.layers[-1].mlp.register_forward_hook(lambda module, args, output: rows_seen.append(args[0].shape[:2]))
    trimmed = score_token_ids(model, smol_tokenizer, prompts, ids, batch_size=3, share_prefix=share_prefix)
    assert rows_seen and all(length == 1 for _, length in rows_seen), rows_seen  # one position a row
    rows_seen.clear()
    monkeypatch.setattr(scoring, "mixed_precision",
                        lambda model, read_positions=None, prefix=None: mixed_precision(model, None, prefix))
    whole = score_token_ids(model, smol_tokenizer, prompts, ids, batch_size=3, share_prefix=share_prefix)
    assert all(length > 1 for _, length in rows_seen)  # the check above can fail: untrimmed, every position runs
    assert float((probabilities(trimmed) - probabilities(whole)).abs().max()) <= 1e-3
    assert [score.ranking() for score in trimmed] == [score.ranking() for score in whole]


def test_each_row_at_reads_and_writes_one_position_per_row() -> None:
    """Hand-worked: rows 0, 1, 2 of a [3, 4, 2] batch at positions 3, 0, 2."""
    batch = torch.arange(24).view(3, 4, 2)
    index = each_row_at(batch, torch.tensor([3, 0, 2]))
    assert batch[index].tolist() == [[6, 7], [8, 9], [20, 21]]
    batch[index] = -1
    assert (batch == -1).sum() == 6 and batch[0, 3].tolist() == [-1, -1] and batch[1, 1].tolist() == [10, 11]


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_attention_after_a_prefix_equals_attention_over_the_joined_keys(dtype: torch.dtype, tolerance: float) -> None:
    """Two unmasked parts joined by their log-sum-exps against one pass over the prefix's and the rows' own keys
    behind the mask a cache needs (each row sees the whole prefix and its own keys up to itself)."""
    from rerank_core.mixed_precision import _attention_after_prefix

    generator = torch.Generator().manual_seed(3)
    rows, heads, groups, length, prefix_length, dim = 3, 6, 2, 5, 7, 8
    query = torch.randn(rows, heads, length, dim, generator=generator)
    key, value = (torch.randn(rows, heads // groups, length, dim, generator=generator) for _ in range(2))
    prefix = tuple(torch.randn(1, heads // groups, prefix_length, dim, generator=generator) for _ in range(2))
    attention = torch.nn.Module()
    attention.scaling = dim ** -0.5
    joined = [torch.cat((shared.expand(rows, -1, -1, -1), own), dim=2) for shared, own in zip(prefix, (key, value))]
    visible = torch.ones(length, prefix_length + length, dtype=torch.bool).tril(prefix_length)
    expected = torch.nn.functional.scaled_dot_product_attention(
        query, *joined, attn_mask=visible, scale=attention.scaling, enable_gqa=True).transpose(1, 2)
    got = _attention_after_prefix(attention, query.to(dtype), key.to(dtype), value.to(dtype),
                                  tuple(part.to(dtype) for part in prefix))
    assert got.shape == (rows, length, heads, dim) and got.dtype == dtype
    torch.testing.assert_close(got.float(), expected, rtol=0, atol=tolerance)


@needs_bf16_onednn
def test_the_fast_path_attends_a_shared_prefix_itself_without_a_cache(smol_tokenizer, monkeypatch) -> None:
    """Rotations of one prompt: past _MIN_PREFIX_ATTENDED_APART tokens the suffix passes get no cache (the prefix
    is attended once for all rows) and score as the same passes through a cache do; a shorter prefix goes in one."""
    import rerank_core.mixed_precision as mp

    model = build_tiny_llama(smol_tokenizer, seed=5, layers=3).to(torch.bfloat16)
    prompts, ids = shared_prefix_prompts(smol_tokenizer), letter_ids(smol_tokenizer)
    caches: list[bool] = []
    model.model.register_forward_pre_hook(
        lambda module, args, kwargs: caches.append(kwargs.get("cache") is not None), with_kwargs=True)
    cached = score_token_ids(model, smol_tokenizer, prompts, ids, batch_size=2)
    assert len(prompts[0]) < mp._MIN_PREFIX_ATTENDED_APART
    assert caches == [False, True, True, True]  # the prefix's own pass, then three suffix passes through a cache
    caches.clear()
    monkeypatch.setattr(mp, "_MIN_PREFIX_ATTENDED_APART", 1)
    apart = score_token_ids(model, smol_tokenizer, prompts, ids, batch_size=2)
    assert caches == [False, False, False, False]
    assert float((probabilities(apart) - probabilities(cached)).abs().max()) <= 2e-3
