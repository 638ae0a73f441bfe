"""Chat templates written for the tests that render as each model family's own template does.

Each family's behaviour was read from its public template (llama.cpp keeps many under
models/templates/) and rewritten here: only the parts a one-turn rerank prompt reaches. Tokenizers
are the embedded SmolLM2 byte-level BPE (with the family's special tokens added and, for Llama-3 and
Qwen, the family's pre-tokenizer pattern) or the shared Llama-2 SentencePiece model.

`python tests/template_gallery.py` prints the README's gallery table from what the audit measures.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Regex, pre_tokenizers

# Llama-2 chat: no generation prompt; the answer follows `[/INST]` after a space, then ` </s>`.
LLAMA2 = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'].strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'].strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)
# Llama-3.1 instruct: a system header with the knowledge-cutoff and date lines, header blocks per turn.
LLAMA3 = (
    "{{ bos_token }}<|start_header_id|>system<|end_header_id|>\n\n"
    "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>"
    "{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
# Mistral instruct v0.3: control tokens [INST] [/INST], no generation prompt, the answer after a space.
MISTRAL_V03 = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + '[/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] | trim + eos_token }}"
    "{% endif %}{% endfor %}"
)
# Gemma 2/3: turns between <start_of_turn> and <end_of_turn>; the assistant's role is called 'model'.
GEMMA = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
# Phi-3 mini: <|user|> / <|assistant|> tags, each turn closed by <|end|>.
PHI3 = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
# Qwen2.5: ChatML with a default system prompt when none is given.
QWEN25 = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Qwen3 (thinking): the last assistant turn always carries a think block, empty when there is no
# reasoning; the generation prompt opens the turn only, unless enable_thinking is false, when it
# writes the empty block itself.
QWEN3 = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}"
    "{% set content = message['content'] %}{% set reasoning = '' %}"
    "{% if '</think>' in content %}"
    "{% set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\n') %}"
    "{% set content = content.split('</think>')[-1].lstrip('\n') %}{% endif %}"
    "{% if loop.last %}{{ '<|im_start|>assistant\n<think>\n' + reasoning + '\n</think>\n\n' + content }}"
    "{% else %}{{ '<|im_start|>assistant\n' + content }}{% endif %}{{ '<|im_end|>\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\n\n</think>\n\n' }}{% endif %}"
    "{% endif %}"
)
# DeepSeek-R1 distill: finished assistant turns drop their reasoning; the generation prompt opens <think>.
DEEPSEEK_R1 = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '<｜User｜>' + message['content'] }}{% elif message['role'] == 'assistant' %}"
    "{% set content = message['content'] %}{% if '</think>' in content %}"
    "{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{ '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\n' }}{% endif %}"
)

# The pre-tokenizer patterns of Qwen2/2.5/3 and Llama-3 (digits one at a time vs up to three):
# both keep a run of newlines in one token whatever follows, unlike GPT-2's pattern.
QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_PATTERN = QWEN_PATTERN.replace(r"\p{N}|", r"\p{N}{1,3}|")


@dataclass(frozen=True)
class Family:
    """One model family: its template, the vocabulary it runs on here, and the tokens it adds."""

    name: str
    template: str
    vocabulary: str  # "smollm2" or "llama2"
    specials: tuple[str, ...] = ()
    bos: str | None = None
    eos: str | None = None
    pattern: str | None = None
    template_kwargs: str = ""
    reasoning: bool = False


FAMILIES: tuple[Family, ...] = (
    Family("Llama-2 chat", LLAMA2, "llama2"),
    Family("Llama-3.1 instruct", LLAMA3, "smollm2",
           ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
           bos="<|begin_of_text|>", eos="<|eot_id|>", pattern=LLAMA3_PATTERN),
    Family("Mistral instruct v0.3", MISTRAL_V03, "llama2", ("[INST]", "[/INST]")),
    Family("Gemma 2/3", GEMMA, "smollm2", ("<bos>", "<start_of_turn>", "<end_of_turn>"),
           bos="<bos>", eos="<end_of_turn>"),
    Family("Phi-3", PHI3, "llama2", ("<|user|>", "<|assistant|>", "<|end|>"), eos="<|end|>"),
    Family("Qwen2.5", QWEN25, "smollm2", pattern=QWEN_PATTERN),
    Family("Qwen3 (thinking)", QWEN3, "smollm2", ("<think>", "</think>"), pattern=QWEN_PATTERN, reasoning=True),
    Family("Qwen3, enable_thinking=false", QWEN3, "smollm2", ("<think>", "</think>"), pattern=QWEN_PATTERN,
           template_kwargs='{"enable_thinking": false}', reasoning=True),
    Family("DeepSeek-R1 distill", DEEPSEEK_R1, "smollm2",
           ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"),
           bos="<｜begin▁of▁sentence｜>", eos="<｜end▁of▁sentence｜>", pattern=QWEN_PATTERN, reasoning=True),
    Family("SmolLM2 (ChatML)", "", "smollm2"),
)


def build_tokenizer(family: Family, smol: Any, llama2: Any | None) -> Any:
    """A copy of the base tokenizer with the family's special tokens, pre-tokenizer and chat template."""
    base = llama2 if family.vocabulary == "llama2" else smol
    tokenizer = copy.deepcopy(base)
    if family.specials:
        tokenizer.add_special_tokens({"additional_special_tokens": list(family.specials)})
    if family.bos:
        tokenizer.bos_token = family.bos
    if family.eos:
        tokenizer.eos_token = family.eos
    if family.pattern:
        tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(family.pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if family.template:
        tokenizer.chat_template = family.template
    return tokenizer


def measure(family: Family, tokenizer: Any) -> dict[str, Any]:
    """What the audit finds for this family: the slot, as-trained tokens of A/B/Z, letters each strategy misses."""
    from rerank_core.prompts import answer_slot, get_preset, letters_for, with_template_kwargs
    from rerank_core.verbalizer import resolve_letters

    preset = with_template_kwargs(get_preset("seed"), family.template_kwargs)
    letters = letters_for(26)
    rows = {strategy: {row.letter: row for row in resolve_letters(tokenizer, preset, letters, strategy)}
            for strategy in ("as_trained", "seed", "encode")}
    trained = rows["as_trained"]
    return {
        "family": family.name,
        "slot": answer_slot(tokenizer, preset),
        "as_trained": {letter: (trained[letter].token, trained[letter].token_id) for letter in "ABZ"},
        "differs": {strategy: [letter for letter, row in rows[strategy].items()
                               if "differs_from_as_trained" in row.flags] for strategy in ("seed", "encode")},
        "tokens": {strategy: rows[strategy]["A"].token for strategy in rows},
    }


def _markdown(measured: list[dict[str, Any]]) -> str:
    lines = ["| family | prompt end → letter | as_trained (A, B, Z) | seed | encode |",
             "|---|---|---|---|---|"]
    for row in measured:
        slot = row["slot"]
        moved = ", ".join(f"`{flag}`" for flag in slot.flags) or "letter right after the generation prompt"
        if slot.inserted_ids:
            moved += f": +{slot.inserted_text!r}"
        if slot.trimmed_ids:
            moved += f": −{slot.trimmed_text!r}"
        trained = ", ".join(f"`{token}` {token_id}" for token, token_id in row["as_trained"].values())
        verdicts = ["agrees" if not row["differs"][name] else
                    f"differs on {len(row['differs'][name])}/26 (`{row['tokens'][name]}` for A)"
                    for name in ("seed", "encode")]
        lines.append(f"| {row['family']} | {moved} | {trained} | {verdicts[0]} | {verdicts[1]} |")
    return "\n".join(lines)


def main() -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from conftest import LLAMA2_MODEL, llama2_folder_at

    from rerank_core.models import load_tokenizer

    smol = load_tokenizer()
    llama2 = None
    if LLAMA2_MODEL.is_file():
        import tempfile

        llama2 = load_tokenizer(llama2_folder_at(Path(tempfile.mkdtemp())))
    measured = [measure(family, build_tokenizer(family, smol, llama2)) for family in FAMILIES
                if family.vocabulary == "smollm2" or llama2 is not None]
    print(_markdown(measured))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
