"""How the commands print: aligned text tables, the template's notes, and documents written whole or to stdout."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rerank_core.chat_templates import ChatTemplateOverride
from rerank_core.fsutil import atomic_write_text

__all__ = ["describe_model", "model_json", "print_notes", "table", "write_or_print"]


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """Rows as left-aligned columns: readable in a terminal, easy to diff."""
    widths = {column: max(len(column), *(len(_cell(row.get(column))) for row in rows)) for column in columns}
    lines = ["  ".join(column.ljust(widths[column]) for column in columns)]
    lines += ["  ".join(_cell(row.get(column)).ljust(widths[column]) for column in columns) for row in rows]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, (list, tuple)):
        return ",".join(str(part) for part in value) or "-"
    return "-" if value is None else str(value)


def print_notes(notes: Sequence[str]) -> None:
    """Each note on its own "note:" line."""
    for note in notes:
        print(f"note: {note}")


def write_or_print(text: str, output: str | None) -> int:
    """A document to a file (written whole, never half) or to stdout."""
    if output is None:
        sys.stdout.write(text)
        return 0
    atomic_write_text(Path(output), text)
    print(f"wrote {output}", file=sys.stderr)
    return 0


def model_json(reference: str, name: str, chat_template: ChatTemplateOverride | None) -> dict[str, Any]:
    """Which model and which chat template made an output, for its JSON: the reference as given ('' for the embedded
    model) and the template's source and short hash (None: the tokenizer's own), as adapter manifests record them."""
    return {"reference": reference, "name": name,
            "chat_template": chat_template.record() if chat_template is not None else None}


def describe_model(record: dict[str, Any]) -> str:
    """model_json as one line for the text outputs."""
    template = record.get("chat_template")
    own = (f"chat template {template['path']} (sha256 {template['sha256']})" if template
           else "the tokenizer's own chat template")
    reference = f" ({record['reference']})" if record.get("reference") and record["reference"] != record["name"] else ""
    return f"model {record['name']}{reference}, {own}"
