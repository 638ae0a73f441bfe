"""Prefix labels: loss exactly on the answer letter (and end-of-turn tokens), for several tokenizer families."""

from __future__ import annotations

import copy

import pytest
from conftest import inference_only_system, make_toy_dataset

from rerank_core.alignment import TemplateMismatch
from rerank_core.labels import IGNORE_INDEX, check_answer_token, label_example, mask_preview
from rerank_core.prompts import PromptPreset, build_prompt, get_preset, letters_for
from rerank_core.verbalizer import resolve_letters

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# A "thinking" template: the generation prompt opens an empty think block the training rendering never has.
THINKING_TEMPLATE = CHATML_TEMPLATE.replace(
    "{{ '<|im_start|>assistant\n' }}", "{{ '<|im_start|>assistant\n<think>\n\n</think>\n\n' }}")


def _prompt_text(tokenizer, preset: PromptPreset, count: int = 20) -> str:
    dataset = make_toy_dataset()
    items = sorted(dataset.items)
    history = [dataset.text(item) for item in items[:6]]
    candidates = [dataset.text(item) for item in items[10:10 + count]]
    return build_prompt(tokenizer, preset, history, candidates).text


@pytest.fixture(scope="module")
def wordlevel_tokenizer():
    """A third family built here: a WordLevel tokenizer (whole words, no merges) with a ChatML template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[UNK]", "[PAD]", "<|im_start|>", "<|im_end|>"]
    backend = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    dataset = make_toy_dataset()
    corpus = [dataset.text(item) for item in dataset.items] + list(letters_for(52)) + [
        "You are a recommendation ranking assistant. Choose exactly ONE item the user is most likely to "
        "interact with next. User history: Candidate items: Answer with only one letter (A-T, a-z). "
        "- user assistant ( )"]
    backend.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=specials))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]",
                                        eos_token="<|im_end|>")
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def _families(request: pytest.FixtureRequest) -> list[tuple[str, object, PromptPreset]]:
    return [
        ("SmolLM2 byte-level BPE, ChatML", request.getfixturevalue("smol_tokenizer"), get_preset("seed_after")),
        ("SmolLM2, llamarec text preset", request.getfixturevalue("smol_tokenizer"), get_preset("llamarec")),
        ("Llama-2 SentencePiece, llamarec text preset", request.getfixturevalue("llama2_tokenizer"),
         get_preset("llamarec")),
        ("Llama-2 SentencePiece, [INST] chat template", request.getfixturevalue("llama2_chat_tokenizer"),
         get_preset("seed")),
        ("WordLevel, ChatML", request.getfixturevalue("wordlevel_tokenizer"), get_preset("seed_after")),
    ]


def test_first_loss_token_is_the_as_trained_letter_token_in_every_family(request):
    for family, tokenizer, preset in _families(request):
        text = _prompt_text(tokenizer, preset, count=12)
        letters = letters_for(12)
        resolved = resolve_letters(tokenizer, preset, letters, "as_trained", text=text)
        probed = resolve_letters(tokenizer, preset, letters, "as_trained")  # neutral probe, as the app does
        for letter, on_text, on_probe in zip(letters, resolved, probed, strict=True):
            example = label_example(tokenizer, preset, text, letter)
            first = example.loss_positions[0]
            assert first == example.prompt_length, family
            assert example.input_ids[first] == on_text.token_id == on_probe.token_id, (family, letter)


def test_smol_chatml_labels_are_letter_and_end_of_turn(smol_tokenizer):
    text = _prompt_text(smol_tokenizer, get_preset("seed_after"))
    example = label_example(smol_tokenizer, get_preset("seed_after"), text, "B")
    tokens = smol_tokenizer.convert_ids_to_tokens(list(example.input_ids))
    # The inference prompt ends with the assistant header; the loss sits on exactly what follows it.
    prompt_end = smol_tokenizer.decode(list(example.input_ids[example.prompt_length - 4:example.prompt_length]))
    assert prompt_end == "<|im_start|>assistant\n"
    assert tokens[example.prompt_length:] == ["B", "<|im_end|>", "Ċ"]
    assert example.loss_positions == [len(tokens) - 3, len(tokens) - 2, len(tokens) - 1]
    assert [example.labels[i] for i in example.loss_positions] == list(example.input_ids[-3:])
    assert all(label == IGNORE_INDEX for label in example.labels[:example.prompt_length])

    letter_only = label_example(smol_tokenizer, get_preset("seed_after"), text, "B", train_on_eos=False)
    assert letter_only.input_ids == example.input_ids[:example.prompt_length + 1]
    assert letter_only.loss_positions == [example.prompt_length]
    assert smol_tokenizer.convert_ids_to_tokens(letter_only.labels[-1]) == "B"


def test_llama2_labels_follow_sentencepiece_tokens(llama2_tokenizer, llama2_chat_tokenizer):
    text = _prompt_text(llama2_tokenizer, get_preset("llamarec"))
    example = label_example(llama2_tokenizer, get_preset("llamarec"), text, "C")
    tokens = llama2_tokenizer.convert_ids_to_tokens(list(example.input_ids))
    # LlamaRec's text preset: "### Response:\n" then the letter (no space marker) and EOS.
    assert tokens[example.prompt_length - 1] == "<0x0A>"
    assert [tokens[i] for i in example.loss_positions] == ["C", "</s>"]

    chat_text = _prompt_text(llama2_chat_tokenizer, get_preset("seed"))
    chat = label_example(llama2_chat_tokenizer, get_preset("seed"), chat_text, "C")
    chat_tokens = llama2_chat_tokenizer.convert_ids_to_tokens(list(chat.input_ids))
    assert chat_tokens[chat.prompt_length - 1] == "]"  # ... [/INST]
    # After [/INST] the template writes " C </s>": the letter becomes "▁C", not the bare "C".
    assert [chat_tokens[i] for i in chat.loss_positions] == ["▁C", "▁", "</s>"]


def test_wordlevel_labels(wordlevel_tokenizer):
    text = _prompt_text(wordlevel_tokenizer, get_preset("seed_after"))
    example = label_example(wordlevel_tokenizer, get_preset("seed_after"), text, "D")
    tokens = wordlevel_tokenizer.convert_ids_to_tokens(list(example.input_ids))
    assert "[UNK]" not in tokens
    assert tokens[example.prompt_length - 2:example.prompt_length] == ["<|im_start|>", "assistant"]
    assert [tokens[i] for i in example.loss_positions] == ["D", "<|im_end|>"]


def test_inference_only_text_is_a_loud_mismatch(smol_tokenizer):
    broken = copy.deepcopy(smol_tokenizer)
    broken.chat_template = inference_only_system(CHATML_TEMPLATE)
    text = _prompt_text(broken, get_preset("seed_after"))
    with pytest.raises(TemplateMismatch) as raised:
        label_example(broken, get_preset("seed_after"), text, "A")
    message = str(raised.value)
    assert "not a token prefix" in message and "differ at token" in message
    assert "Answer" in message  # the divergence is shown token by token


def test_generation_prompt_block_training_lacks_is_cut_from_the_prompt(smol_tokenizer):
    """The generation prompt writes an empty think block; finished turns never do: loss goes on the letter."""
    thinking = copy.deepcopy(smol_tokenizer)
    thinking.chat_template = THINKING_TEMPLATE
    text = _prompt_text(thinking, get_preset("seed_after"))
    example = label_example(thinking, get_preset("seed_after"), text, "A")
    tokens = thinking.convert_ids_to_tokens(list(example.input_ids))
    assert [tokens[i] for i in example.loss_positions] == ["A", "<|im_end|>", "Ċ"]
    assert thinking.decode(list(example.input_ids[:example.prompt_length])).endswith("<|im_start|>assistant\n")


def test_answer_marker_before_every_letter_is_moved_into_the_prompt(smol_tokenizer):
    """'Answer: ' written before every letter is the same span for all letters: it joins the scored prompt."""
    marked = copy.deepcopy(smol_tokenizer)
    marked.chat_template = CHATML_TEMPLATE.replace(
        "message['content'] + '<|im_end|>'",
        "(('Answer: ' + message['content']) if message['role'] == 'assistant' else message['content']) + '<|im_end|>'")
    text = _prompt_text(marked, get_preset("seed_after"))
    example = label_example(marked, get_preset("seed_after"), text, "B")
    assert marked.convert_ids_to_tokens(example.input_ids[example.prompt_length]) == "ĠB"
    assert marked.decode(list(example.input_ids[:example.prompt_length])).endswith("assistant\nAnswer:")


def test_first_loss_token_that_is_not_the_letter_is_named(smol_tokenizer):
    answer, letter_b = smol_tokenizer.convert_tokens_to_ids(["Answer", "B"])
    check_answer_token(smol_tokenizer, (letter_b, 2), "B")
    with pytest.raises(TemplateMismatch, match=r"first loss token after the prompt would be 'Answer' \(\d+\), not "
                                               r"the answer letter 'B'"):
        check_answer_token(smol_tokenizer, (answer, letter_b), "B")


def test_truncation_can_leave_no_loss_token(smol_tokenizer):
    text = _prompt_text(smol_tokenizer, get_preset("seed_after"))
    full = label_example(smol_tokenizer, get_preset("seed_after"), text, "A")
    cut_to_letter = label_example(smol_tokenizer, get_preset("seed_after"), text, "A",
                                  max_length=full.prompt_length + 1)
    assert cut_to_letter.loss_tokens == 1
    cut_to_prompt = label_example(smol_tokenizer, get_preset("seed_after"), text, "A", max_length=full.prompt_length)
    assert cut_to_prompt.loss_tokens == 0


def test_mask_preview_lists_every_token_with_its_loss_flag(smol_tokenizer):
    text = _prompt_text(smol_tokenizer, get_preset("seed_after"), count=3)
    example = label_example(smol_tokenizer, get_preset("seed_after"), text, "C")
    rows = mask_preview(smol_tokenizer, example)
    assert [row.token_id for row in rows] == list(example.input_ids)
    assert [row.position for row in rows if row.loss] == example.loss_positions
    assert [row.token for row in rows if row.loss] == ["C", "<|im_end|>", "Ċ"]
    assert sum(row.in_prompt for row in rows) == example.prompt_length
