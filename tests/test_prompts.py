"""Prompt presets against hand-written expected text: the seed's chat prompt and LlamaRec's alpaca_short."""

from __future__ import annotations

import contextlib
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from rerank_core.prompts import (
    PRESETS,
    PromptError,
    build_prompt,
    custom_preset,
    encode_rendered,
    get_preset,
    letter_range,
    letters_for,
    render_inference,
    render_training,
)

SMOL_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


def no_template_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer with no chat template at all."""
    vocab = {"[UNK]": 0, "</s>": 1}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="</s>")


def test_letters_and_letter_range() -> None:
    assert letters_for(3) == ["A", "B", "C"]
    assert "".join(letters_for(52)) == "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
    assert letter_range(letters_for(20)) == "A-T"
    assert letter_range(letters_for(26)) == "A-Z"
    assert letter_range(letters_for(27)) == "A-Z, a-a"
    assert letter_range(letters_for(30)) == "A-Z, a-d"
    with pytest.raises(PromptError, match="at most 52"):
        letters_for(53)
    with pytest.raises(PromptError, match="at least 1"):
        letters_for(0)


def test_seed_preset_text_matches_seed_pipeline_section_2(smol_tokenizer) -> None:
    prompt = build_prompt(smol_tokenizer, get_preset("seed"), ["Old Film", "New Film"], ["Cand One", "Cand Two"])
    expected = (
        "You are a recommendation ranking assistant.\n"
        "\n"
        "Choose exactly ONE item the user is most likely to interact with next.\n"
        "\n"
        "User history:\n"
        "- Old Film\n"
        "- New Film\n"
        "\n"
        "Candidate items:\n"
        "A. Cand One\n"
        "B. Cand Two\n"
        "\n"
        "Answer with only one letter (A-B)."
    )
    assert prompt.text == expected
    assert prompt.letters == ("A", "B")
    assert prompt.dropped_history == 0
    # Rendered with SmolLM2's own ChatML template and the generation prompt.
    assert prompt.rendered == (
        SMOL_SYSTEM + "<|im_start|>user\n" + expected + "<|im_end|>\n<|im_start|>assistant\n")
    assert prompt.token_count == len(smol_tokenizer(prompt.rendered, add_special_tokens=False)["input_ids"])


def test_seed_preset_past_26_candidates_names_both_ranges(smol_tokenizer) -> None:
    candidates = [f"c{i}" for i in range(28)]
    prompt = build_prompt(smol_tokenizer, get_preset("seed"), ["h"], candidates)
    lines = prompt.text.split("\n")
    assert lines[-1] == "Answer with only one letter (A-Z, a-b)."
    assert "Z. c25" in lines
    assert "a. c26" in lines
    assert "b. c27" in lines


def test_more_than_52_candidates_is_a_clear_error(smol_tokenizer) -> None:
    with pytest.raises(PromptError, match=r"53 .*52"):
        build_prompt(smol_tokenizer, get_preset("seed"), ["h"], [f"c{i}" for i in range(53)])


def test_llamarec_preset_is_alpaca_short_exactly(smol_tokenizer) -> None:
    prompt = build_prompt(smol_tokenizer, get_preset("llamarec"), ["t1", "t2"], ["c1", "c2"])
    expected = (
        "### Instruction:\n"
        "Given user history in chronological order, recommend an item from the candidate pool "
        "with its index letter.\n\n"
        "### Input:\n"
        "User history: (1) t1 \n (2) t2; \n Candidate pool: (A) c1 \n (B) c2\n\n"
        "### Response:\n"
    )
    assert prompt.text == expected
    assert prompt.rendered == expected  # no chat template
    # Training text: prompt + letter + EOS (LlamaRec trains the letter and EOS).
    assert render_training(smol_tokenizer, get_preset("llamarec"), prompt.text, "B") == expected + "B<|im_end|>"


def test_llamarec_keeps_the_20_most_recent_history_items(smol_tokenizer) -> None:
    history = [f"h{i}" for i in range(25)]
    prompt = build_prompt(smol_tokenizer, get_preset("llamarec"), history, ["c"])
    assert prompt.history_texts == tuple(history[5:])
    assert prompt.dropped_history == 5
    assert "User history: (1) h5 \n (2) h6 \n" in prompt.text
    assert "(20) h24; \n Candidate pool: (A) c\n" in prompt.text
    assert "h4 " not in prompt.text
    # The cap and the token limit add up in the dropped count.
    limited = build_prompt(smol_tokenizer, get_preset("llamarec"), history, ["c"],
                           max_prompt_tokens=prompt.token_count - 10)
    assert limited.dropped_history == 25 - len(limited.history_texts) > 5
    assert limited.history_texts == tuple(history[limited.dropped_history:])
    # The seed preset has no such cap.
    assert build_prompt(smol_tokenizer, get_preset("seed"), history, ["c"]).dropped_history == 0


def test_llamarec_titles_are_cut_to_32_tokens(smol_tokenizer) -> None:
    long_title = " ".join(["the"] * 40)  # one token per word in GPT-2 BPE: "the", "Ġthe", ...
    assert len(smol_tokenizer.tokenize(long_title)) == 40
    prompt = build_prompt(smol_tokenizer, get_preset("llamarec"), [long_title], [long_title, "short"])
    cut = " ".join(["the"] * 32)
    assert f"(1) {cut};" in prompt.text
    assert f"(A) {cut} \n (B) short\n" in prompt.text
    # The seed preset never cuts titles.
    assert long_title in build_prompt(smol_tokenizer, get_preset("seed"), [long_title], ["c"]).text


def test_llamarec_title_cut_on_sentencepiece(llama2_tokenizer) -> None:
    long_title = " ".join(["the"] * 40)
    prompt = build_prompt(llama2_tokenizer, get_preset("llamarec"), [long_title], ["c"])
    assert prompt.history_texts == (" ".join(["the"] * 32),)


@pytest.mark.parametrize(("before", "after"), [("seed", "seed_after"), ("llamarec", "llamarec_after")])
def test_after_variants_move_the_letter_behind_the_text_and_nothing_else(smol_tokenizer, before: str,
                                                                         after: str) -> None:
    history, candidates = ["h1", "h2"], ["Cand One", "Cand Two", "Cand Three"]
    text_before = build_prompt(smol_tokenizer, get_preset(before), history, candidates).text
    text_after = build_prompt(smol_tokenizer, get_preset(after), history, candidates).text
    lines = {"seed": ("{letter}. {text}", "- {text} ({letter})"),
             "llamarec": ("({letter}) {text}", "{text} ({letter})")}[before]
    expected = text_before
    for letter, text in zip("ABC", candidates):
        expected = expected.replace(lines[0].format(letter=letter, text=text),
                                    lines[1].format(letter=letter, text=text))
    assert text_after == expected
    assert text_after != text_before
    assert PRESETS[after].letter_after and not PRESETS[before].letter_after
    assert PRESETS[after].chat == PRESETS[before].chat


def test_seed_after_text_by_hand(smol_tokenizer) -> None:
    text = build_prompt(smol_tokenizer, get_preset("seed_after"), ["h"], ["x", "y"]).text
    assert "Candidate items:\n- x (A)\n- y (B)\n\nAnswer with only one letter (A-B)." in text
    text = build_prompt(smol_tokenizer, get_preset("llamarec_after"), ["h"], ["x", "y"]).text
    assert "Candidate pool: x (A) \n y (B)\n\n### Response:\n" in text


@pytest.mark.parametrize("name", ["seed", "llamarec"])
def test_history_truncation_drops_oldest_and_is_maximal(smol_tokenizer, name: str) -> None:
    preset = get_preset(name)
    history = [f"history film number {i}" for i in range(15)]
    candidates = [f"candidate {i}" for i in range(5)]
    full = build_prompt(smol_tokenizer, preset, history, candidates)
    limit = full.token_count - 20
    prompt = build_prompt(smol_tokenizer, preset, history, candidates, max_prompt_tokens=limit)
    kept = len(prompt.history_texts)
    assert 0 < kept < len(history)
    assert prompt.dropped_history == len(history) - kept
    assert prompt.history_texts == tuple(history[-kept:])  # the most recent survive
    assert prompt.token_count <= limit
    assert prompt.token_count == len(encode_rendered(smol_tokenizer, preset, prompt.rendered))
    # Maximal: keeping one more (older) item would not fit.
    one_more = build_prompt(smol_tokenizer, preset, history[-(kept + 1):], candidates)
    assert one_more.token_count > limit
    # A prompt that already fits is left alone.
    assert build_prompt(smol_tokenizer, preset, history, candidates,
                        max_prompt_tokens=full.token_count).dropped_history == 0


def test_truncation_that_cannot_fit_says_so(smol_tokenizer) -> None:
    with pytest.raises(PromptError, match="even with no history"):
        build_prompt(smol_tokenizer, get_preset("seed"), ["h1", "h2"], ["c1", "c2"], max_prompt_tokens=10)


def test_chat_preset_without_chat_template_suggests_llamarec() -> None:
    tokenizer = no_template_tokenizer()
    with pytest.raises(PromptError, match="llamarec"):
        build_prompt(tokenizer, get_preset("seed"), ["h"], ["c"])
    with pytest.raises(PromptError, match="has none"):
        render_training(tokenizer, get_preset("seed_after"), "text", "A")
    # The text preset needs no template.
    assert build_prompt(tokenizer, get_preset("llamarec"), ["h"], ["c"]).rendered.startswith("### Instruction:\n")


def test_render_inference_is_prefix_of_render_training_for_chatml(smol_tokenizer) -> None:
    inference = render_inference(smol_tokenizer, get_preset("seed"), "hello")
    training = render_training(smol_tokenizer, get_preset("seed"), "hello", "C")
    assert training == inference + "C<|im_end|>\n"


def test_custom_preset_validation_and_use(smol_tokenizer) -> None:
    with pytest.raises(PromptError, match=r"\{history\}"):
        custom_preset("Only {candidates}")
    with pytest.raises(PromptError, match=r"\{candidates\}"):
        custom_preset("Only {history}")
    with pytest.raises(PromptError, match=r"candidate_line .*\{letter\}"):
        custom_preset("{history} {candidates}", candidate_line="{text}")
    with pytest.raises(PromptError, match=r"history_line .*\{text\}"):
        custom_preset("{history} {candidates}", history_line="-")
    with pytest.raises(PromptError, match="unknown placeholder or stray brace"):
        custom_preset("{history} {candidates} {user}")
    with pytest.raises(PromptError, match="unknown placeholder or stray brace"):
        custom_preset("{history} {candidates} {")
    preset = custom_preset("Seen: {history}\nPick ({letter_range}) {{json}}: {candidates}", chat=False,
                           history_line="* {text}", candidate_line="[{letter}] {text}", separator="; ")
    prompt = build_prompt(smol_tokenizer, preset, ["h1", "h2"], ["c1", "c2", "c3"])
    assert prompt.text == "Seen: * h1; * h2\nPick (A-C) {json}: [A] c1; [B] c2; [C] c3"
    assert prompt.rendered == prompt.text
    # Presets are passed on as they are: the resolver takes names only.
    with pytest.raises(TypeError, match="takes a preset name, not a PromptPreset"):
        get_preset(preset)


def test_unknown_preset_lists_the_known_ones() -> None:
    with pytest.raises(PromptError, match="seed, seed_after, llamarec, llamarec_after"):
        get_preset("alpaca")


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(titles=st.lists(st.text(alphabet="abcdefghij XYZ0123456789'()-:,", min_size=1, max_size=60), min_size=1,
                       max_size=40),
       budget_share=st.floats(min_value=0.3, max_value=1.0), estimate=st.none() | st.integers(0, 45))
def test_a_budget_drops_the_fewest_oldest_items_that_fit(smol_tokenizer, titles: list[str], budget_share: float,
                                                          estimate: int | None) -> None:
    """The search starts from an estimate (its own, or any other); its answer is a linear scan's: the fewest
    oldest items dropped."""
    preset = get_preset("seed")
    candidates = ["Heat (1995)", "Toy Story (1995)", "Casino (1995)"]
    whole = build_prompt(smol_tokenizer, preset, titles, candidates)
    budget = max(1, int(whole.token_count * budget_share))
    fitting = [dropped for dropped in range(len(titles) + 1)
               if build_prompt(smol_tokenizer, preset, titles[dropped:], candidates).token_count <= budget]
    with contextlib.ExitStack() as stack:
        if estimate is not None:
            stack.enter_context(mock.patch("rerank_core.prompts._covering", lambda *args: estimate))
        if not fitting:
            with pytest.raises(PromptError):
                build_prompt(smol_tokenizer, preset, titles, candidates, max_prompt_tokens=budget)
            return
        built = build_prompt(smol_tokenizer, preset, titles, candidates, max_prompt_tokens=budget)
    assert built.dropped_history == fitting[0]
    assert built.token_count <= budget and built.history_texts == tuple(titles[fitting[0]:])
