"""A preset name becomes a PromptPreset once, at an entry point; everything below takes the PromptPreset."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import make_toy_dataset

from rerank_core.inspector import Inspector, InspectSettings
from rerank_core.prompts import LLAMAREC_TEMPLATE, custom_preset, get_preset

ROOT = Path(__file__).resolve().parents[1]
# The entry points, and the one function in each that turns a name into a PromptPreset.
RESOLVERS = {
    ("rerank_core/cli/audit.py", "command_audit"),  # --preset
    ("rerank_core/cli/common.py", "build_settings"),  # --preset for every scoring command
    ("rerank_core/cli/diagnose.py", "command_template"),  # --preset
    ("rerank_core/training/config.py", "TrainConfig.prompt_preset"),  # the preset name the training config stores
    ("rerank_core/adapters.py", "AdapterInfo.preset"),  # the manifest's "preset"
    ("rerank_app/pickers.py", "Pickers.settings"),  # the Inspect tab's preset picker
    ("rerank_app/context.py", "InspectionService.template_consistency"),  # the Diagnose tab's template check
    ("rerank_app/context.py", "ModelRegistry.template_effect"),  # the template panel's preset picker
}


def _sources() -> list[Path]:
    return sorted([*ROOT.joinpath("rerank_core").rglob("*.py"), *ROOT.joinpath("rerank_app").rglob("*.py"),
                   ROOT / "app.py"])


def _functions(tree: ast.Module) -> list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """Every function with its qualified name (Class.method)."""
    found = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                found.append((prefix + child.name, child))
                visit(child, prefix + child.name + ".")
            elif isinstance(child, ast.ClassDef):
                visit(child, prefix + child.name + ".")

    visit(tree, "")
    return found


def _calls_get_preset(nodes: list[ast.AST], *, into_classes: bool = False) -> bool:
    """A get_preset call in these statements, not counting nested functions (they are checked on their own)."""
    stack = list(nodes)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) or (
                isinstance(node, ast.ClassDef) and not into_classes):
            continue
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "get_preset":
            return True
        stack.extend(ast.iter_child_nodes(node))
    return False


def test_only_the_entry_points_resolve_a_preset_name() -> None:
    callers, module_level = set(), []
    for path in _sources():
        relative = path.relative_to(ROOT).as_posix()
        tree = ast.parse(path.read_text(encoding="utf-8"))
        callers |= {(relative, name) for name, function in _functions(tree) if _calls_get_preset(function.body)}
        if _calls_get_preset(tree.body, into_classes=True):
            module_level.append(relative)
    assert sorted(callers - RESOLVERS) == [], "get_preset belongs to the entry points; pass the PromptPreset on"
    assert sorted(RESOLVERS - callers) == [], "an entry point no longer resolves a name: update RESOLVERS"
    assert module_level == []


def test_core_functions_take_a_prompt_preset_never_a_name() -> None:
    wrong = []
    for path in _sources():
        relative = path.relative_to(ROOT).as_posix()
        for name, function in _functions(ast.parse(path.read_text(encoding="utf-8"))):
            for argument in [*function.args.posonlyargs, *function.args.args, *function.args.kwonlyargs]:
                annotation = ast.unparse(argument.annotation) if argument.annotation else ""
                if "PromptPreset" in annotation and annotation not in ("PromptPreset", "PromptPreset | None"):
                    wrong.append(f"{relative}:{name}({argument.arg}: {annotation})")
                # A core parameter named `preset` is a prompt preset; the training preset (quick, full) is
                # called training_preset.
                if relative.startswith("rerank_core/") and argument.arg == "preset" and annotation != "PromptPreset":
                    wrong.append(f"{relative}:{name}({argument.arg}: {annotation or 'no annotation'})")
    assert wrong == []


def test_settings_refuse_a_preset_name_with_the_fix() -> None:
    with pytest.raises(TypeError, match=r"InspectSettings.preset must be a PromptPreset, not str 'seed'.*get_preset"):
        InspectSettings(preset="seed")


def test_a_custom_preset_named_like_a_built_in_one_has_its_own_cache_entries(llama2_chat_tokenizer) -> None:
    """Letters are cached per preset: keyed on the name, a text preset called "seed" would get the chat preset's
    `▁A` instead of the bare `A` it trains (test_verbalizer has both tokens for this tokenizer)."""
    inspector = Inspector(make_toy_dataset(), tokenizer=llama2_chat_tokenizer)
    impostor = custom_preset(LLAMAREC_TEMPLATE, chat=False, name="seed")
    built_in = inspector.letter_tokens(InspectSettings(preset=get_preset("seed")), 3)
    custom = inspector.letter_tokens(InspectSettings(preset=impostor), 3)
    assert (built_in[0].token_id, custom[0].token_id) == (319, 29909)
