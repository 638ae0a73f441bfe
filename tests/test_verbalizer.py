"""Letter token IDs on three tokenizer families, and the audit flags that catch a silent mismatch."""

from __future__ import annotations

import string

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from rerank_core.prompts import get_preset, letters_for
from rerank_core.verbalizer import STRATEGIES, LetterToken, VerbalizerError, resolve_letters

CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def word_tokenizer(letters: str, *, lowercase: bool = False) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with a ChatML template whose vocabulary holds only the given letters."""
    words = ["[UNK]", "<|im_start|>", "<|im_end|>", "user", "assistant", *letters]
    backend = Tokenizer(models.WordLevel({word: index for index, word in enumerate(words)}, unk_token="[UNK]"))
    if lowercase:
        backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="<|im_end|>",
                                        additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tokenizer.chat_template = CHATML
    return tokenizer


def sentencepiece_like_tokenizer() -> PreTrainedTokenizerFast:
    """A Metaspace BPE (SentencePiece style) with `▁A`, `▁B`, `▁D` merged but no `▁C`: C encodes to 2 tokens."""
    vocab = {"<unk>": 0, "</s>": 1, "▁": 2}
    for char in sorted(set(string.ascii_letters + string.digits + string.punctuation + "\n")):
        vocab[char] = len(vocab)
    merges = []
    for letter in "ABD":
        vocab["▁" + letter] = len(vocab)
        merges.append(("▁", letter))
    backend = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")


def by_letter(rows: list[LetterToken]) -> dict[str, LetterToken]:
    return {row.letter: row for row in rows}


@pytest.mark.parametrize("name", ["seed", "seed_after", "llamarec", "llamarec_after"])
def test_smollm2_all_strategies_agree_without_flags(smol_tokenizer, name: str) -> None:
    preset = get_preset(name)
    letters = letters_for(52)
    resolved = {strategy: resolve_letters(smol_tokenizer, preset, letters, strategy) for strategy in STRATEGIES}
    ids = {strategy: [row.token_id for row in rows] for strategy, rows in resolved.items()}
    assert ids["as_trained"] == ids["seed"] == ids["encode"]
    for rows in resolved.values():
        assert all(row.flags == () for row in rows)
        assert [row.token for row in rows] == letters  # GPT-2 BPE: the bare letters
        assert all(row.as_trained_id == row.token_id for row in rows)
    assert ids["seed"][:3] == [smol_tokenizer.convert_tokens_to_ids(letter) for letter in "ABC"]
    assert {row.step for row in resolved["seed"]} == {f"convert_tokens_to_ids('{letter}')" for letter in letters}


def test_llama2_llamarec_encode_is_not_the_token_training_emits(llama2_tokenizer) -> None:
    """LlamaRec's encode('A')[0] is `▁A` (319), but after 'Response:\\n' training emits bare `A` (29909)."""
    encoded = by_letter(resolve_letters(llama2_tokenizer, get_preset("llamarec"), letters_for(20), "encode"))
    assert (encoded["A"].token, encoded["A"].token_id) == ("▁A", 319)
    assert (encoded["A"].as_trained_token, encoded["A"].as_trained_id) == ("A", 29909)
    assert all("differs_from_as_trained" in row.flags for row in encoded.values())
    assert encoded["A"].step == "encode('A')[0]"

    trained = by_letter(resolve_letters(llama2_tokenizer, get_preset("llamarec"), letters_for(20), "as_trained"))
    assert (trained["A"].token, trained["A"].token_id) == ("A", 29909)
    assert all(row.flags == () for row in trained.values())

    # The seed's first step (bare letter token) happens to hit the as-trained token here.
    seed = by_letter(resolve_letters(llama2_tokenizer, get_preset("llamarec"), letters_for(20), "seed"))
    assert seed["A"].token_id == 29909
    assert seed["A"].step == "convert_tokens_to_ids('A')"
    assert all(row.flags == () for row in seed.values())
    assert len({row.token_id for row in trained.values()}) == 20


def test_llama2_chat_seed_preset_letter_follows_a_space(llama2_chat_tokenizer) -> None:
    """After `[/INST]` the template writes ' A', so training emits `▁A`; the seed's bare `A` is wrong."""
    letters = letters_for(3)
    trained = by_letter(resolve_letters(llama2_chat_tokenizer, get_preset("seed"), letters, "as_trained"))
    assert (trained["A"].token, trained["A"].token_id) == ("▁A", 319)
    seed = by_letter(resolve_letters(llama2_chat_tokenizer, get_preset("seed"), letters, "seed"))
    assert (seed["A"].token, seed["A"].token_id, seed["A"].as_trained_id) == ("A", 29909, 319)
    assert seed["A"].step == "convert_tokens_to_ids('A')"
    assert all("differs_from_as_trained" in row.flags for row in seed.values())
    encoded = by_letter(resolve_letters(llama2_chat_tokenizer, get_preset("seed"), letters, "encode"))
    assert encoded["A"].token_id == 319
    assert all(row.flags == () for row in encoded.values())
    # Consistency of the audit: a strategy is flagged exactly when it disagrees with the as-trained ID.
    for rows in (seed, encoded, trained):
        for row in rows.values():
            assert row.as_trained_id == trained[row.letter].token_id
            assert ("differs_from_as_trained" in row.flags) == (row.token_id != row.as_trained_id)


def test_unknown_letter_is_flagged_by_every_strategy() -> None:
    tokenizer = word_tokenizer("ABD")  # no C
    unk = tokenizer.unk_token_id
    for strategy in STRATEGIES:
        rows = by_letter(resolve_letters(tokenizer, get_preset("seed"), letters_for(4), strategy))
        assert rows["C"].token_id == unk
        assert "unknown_token" in rows["C"].flags
        assert rows["A"].flags == () and rows["A"].token == "A"
    seed = by_letter(resolve_letters(tokenizer, get_preset("seed"), letters_for(4), "seed"))
    assert seed["C"].step == "encode('C')[0]"  # steps 1 and 2 both found the unknown token


def test_two_letters_sharing_an_id_are_flagged() -> None:
    tokenizer = word_tokenizer(string.ascii_lowercase, lowercase=True)  # an uncased vocabulary
    for strategy in STRATEGIES:
        rows = by_letter(resolve_letters(tokenizer, get_preset("seed"), letters_for(27), strategy))
        assert rows["A"].token_id == rows["a"].token_id == tokenizer.convert_tokens_to_ids("a")
        assert "shared_id" in rows["A"].flags and "shared_id" in rows["a"].flags
        assert all(rows[letter].flags == () for letter in "BCDEFGHIJKLMNOPQRSTUVWXYZ")


def test_letter_that_encodes_to_two_tokens_is_flagged() -> None:
    tokenizer = sentencepiece_like_tokenizer()
    assert tokenizer.tokenize("C") == ["▁", "C"]
    encoded = by_letter(resolve_letters(tokenizer, get_preset("llamarec"), letters_for(4), "encode"))
    assert encoded["C"].token == "▁"  # encode(letter)[0] is the bare word boundary, not a letter at all
    assert set(encoded["C"].flags) == {"multi_token", "differs_from_as_trained"}
    assert encoded["A"].token == "▁A" and encoded["A"].flags == ("differs_from_as_trained",)
    trained = by_letter(resolve_letters(tokenizer, get_preset("llamarec"), letters_for(4), "as_trained"))
    assert trained["C"].token == "C" and trained["C"].flags == ("multi_token",)
    assert trained["A"].token == "A" and trained["A"].flags == ()


def test_as_trained_refuses_a_template_that_is_not_a_prefix() -> None:
    tokenizer = word_tokenizer("ABC")
    # The generation prompt adds a word the training conversation never has.
    tokenizer.chat_template = CHATML.replace("assistant\n{% endif %}", "assistant\nthinking{% endif %}")
    with pytest.raises(VerbalizerError, match="no as-trained token"):
        resolve_letters(tokenizer, get_preset("seed"), letters_for(3), "as_trained")
    rows = resolve_letters(tokenizer, get_preset("seed"), letters_for(3), "seed")
    assert all("template_not_prefix" in row.flags and row.as_trained_id is None for row in rows)


def test_unknown_strategy_and_json_row(smol_tokenizer) -> None:
    with pytest.raises(VerbalizerError, match="as_trained, seed, encode"):
        resolve_letters(smol_tokenizer, get_preset("seed"), ["A"], "first_token")
    (row,) = resolve_letters(smol_tokenizer, get_preset("seed"), ["A"], "as_trained")
    assert row.to_json() == {"letter": "A", "token": "A", "token_id": 49, "strategy": "as_trained",
                             "step": "token after the rendered prompt", "as_trained_id": 49,
                             "as_trained_token": "A", "flags": []}
