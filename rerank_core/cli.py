"""`python -m rerank_core`: the same calls as the app, from a shell or a GPU box."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rerank_core.adapters import check_adapter
from rerank_core.candidates import CANDIDATE_ORDERS, CANDIDATE_SOURCES, MAX_CANDIDATES, CandidateConfig
from rerank_core.cli_diagnose import add_diagnose_command
from rerank_core.cli_train import add_train_command
from rerank_core.data import TEXT_FIELDS, Dataset, load_dataset
from rerank_core.display import visible_text
from rerank_core.distributed import close_process_group, process_device, process_shard
from rerank_core.inspector import BASE, Inspector, InspectSettings
from rerank_core.loaders import FORMATS
from rerank_core.models import load_model, load_tokenizer
from rerank_core.prompts import PRESETS, answer_slot, letters_for, with_template_kwargs
from rerank_core.verbalizer import STRATEGIES, resolve_letters

__all__ = ["add_common_options", "build_inspector", "build_settings", "main"]

log = logging.getLogger("rerank_core")


def _int_range(low: int, high: int | None = None) -> Any:
    """An argparse type: a bad value stops at parsing, with the option's name, before anything loads."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low or (high is not None and value > high):
            allowed = f"from {low} to {high}" if high is not None else f"of at least {low}"
            raise argparse.ArgumentTypeError(f"{value} is out of range: use a whole number {allowed}")
        return value

    return parse


def add_common_options(parser: argparse.ArgumentParser) -> None:
    """Options every command shares, so a result seen in the app can be reproduced exactly."""
    group = parser.add_argument_group("model, data and prompt")
    group.add_argument("--model", metavar="PATH",
                       help="local Hugging Face model folder (safetensors); default: embedded SmolLM2-135M-Instruct")
    group.add_argument("--tokenizer", metavar="PATH",
                       help="tokenizer folder (tokenizer files or a SentencePiece tokenizer.model) for commands "
                            "that need no weights; `show` then prints the prompt and audit without scores")
    group.add_argument("--data", metavar="PATH|NAME",
                       help="dataset folder or file, or a built-in dataset: sample (synthetic, the default) or "
                            "ml-100k-real (real MovieLens 100K from the recbole package)")
    group.add_argument("--data-format", choices=FORMATS,
                       help="force the data format instead of detecting it from the file names")
    group.add_argument("--preset", default="seed", choices=sorted(PRESETS),
                       help="prompt preset (default: %(default)s; *_after put the letter after the item text)")
    group.add_argument("--template-kwargs", default="", metavar="JSON",
                       help="chat-template options as a JSON object, e.g. '{\"enable_thinking\": false}' "
                            "(passed to apply_chat_template for inference and training alike)")
    group.add_argument("--strategy", default="as_trained", choices=STRATEGIES,
                       help="letter→token strategy (default: %(default)s)")
    group.add_argument("--text-field", default="title", choices=TEXT_FIELDS,
                       help="which item text stands for an item (default: %(default)s)")
    group.add_argument("--candidates", type=_int_range(1, MAX_CANDIDATES), default=20, metavar="N",
                       help="number of candidates, 1-52 (default: %(default)s)")
    group.add_argument("--candidate-source", default="random", choices=CANDIDATE_SOURCES,
                       help="where negatives come from (default: %(default)s)")
    group.add_argument("--candidate-order", default="shuffled", choices=CANDIDATE_ORDERS,
                       help="shuffled (seeded) or the retriever's ranking (default: %(default)s)")
    group.add_argument("--seed", type=int, default=0, help="seed for candidates and sampling (default: %(default)s)")
    group.add_argument("--max-prompt-tokens", type=_int_range(1), default=1536, metavar="N",
                       help="drop oldest history items until the prompt fits (default: %(default)s)")
    group.add_argument("--dtype", default="auto", help="auto, bf16, fp16 or fp32 (default: %(default)s)")
    group.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default: %(default)s)")
    group.add_argument("--batch-size", type=_int_range(1), default=8,
                       help="prompts per forward pass (default: %(default)s)")
    group.add_argument("--trust-remote-code", action="store_true",
                       help="allow model folders to run their own Python code (off by default)")
    group.add_argument("--adapters-dir", metavar="PATH",
                       help="adapters folder (default: adapters/ beside the code, or $RERANK_ADAPTERS_DIR)")


def build_settings(args: argparse.Namespace, split: str = "test") -> InspectSettings:
    """InspectSettings from the common options."""
    candidates = CandidateConfig(source=args.candidate_source, count=args.candidates, seed=args.seed,
                                 order=args.candidate_order)
    return InspectSettings(preset=args.preset, strategy=args.strategy, text_field=args.text_field,
                           split=split, candidates=candidates, max_prompt_tokens=args.max_prompt_tokens,
                           use_adapter_preset=not getattr(args, "ignore_adapter_preset", False),
                           template_kwargs=args.template_kwargs)


def load_data(args: argparse.Namespace) -> Dataset:
    dataset = load_dataset(args.data, args.data_format)
    if dataset.short_users:
        log.warning("%d user(s) with fewer than 3 interactions are left out of the split: %s",
                    len(dataset.short_users), ", ".join(dataset.short_users[:10]))
    return dataset


def build_inspector(args: argparse.Namespace, *, need_model: bool = True) -> Inspector:
    """An Inspector from the common options; with --tokenizer and no model, one without weights."""
    dataset = load_data(args)
    if args.tokenizer and not args.model and not need_model:
        return Inspector(dataset, tokenizer=load_tokenizer(args.tokenizer), adapters_root=args.adapters_dir)
    # Under torchrun / accelerate launch each process takes its own GPU and scores its share of the prompts.
    device = process_device(args.device)
    shard = process_shard(device)
    loaded = load_model(args.model, device=device, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    return Inspector(dataset, loaded, adapters_root=args.adapters_dir, batch_size=args.batch_size, shard=shard)


def _table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
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


def command_audit(args: argparse.Namespace) -> int:
    preset = with_template_kwargs(args.preset, args.template_kwargs)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    letters = resolve_letters(tokenizer, preset, letters_for(args.candidates), args.strategy)
    rows = [token.to_json() for token in letters]
    slot = answer_slot(tokenizer, preset)
    if args.format == "json":
        print(json.dumps({"preset": preset.name, "template_kwargs": preset.template_kwargs,
                          "answer_slot": slot.to_json(), "letters": rows}, indent=2, ensure_ascii=False))
    else:
        print(_table(rows, ["letter", "token", "token_id", "strategy", "step", "as_trained_id", "flags"]))
        flagged = sum(1 for row in rows if row["flags"])
        print(f"\n{flagged} of {len(rows)} letters flagged" if flagged else f"\nall {len(rows)} letters clean")
        _print_notes(slot.notes())
    return 0


def _print_notes(notes: Sequence[str]) -> None:
    for note in notes:
        print(f"note: {note}")


def command_show(args: argparse.Namespace) -> int:
    inspector = build_inspector(args, need_model=False)
    settings = build_settings(args, args.split)
    specials = inspector.tokenizer.all_special_tokens
    if inspector.loaded is None:
        if args.format == "html":
            raise ValueError("--format html needs scores: give --model (or no --tokenizer) instead of a "
                             "tokenizer alone")
        prepared = inspector.prepare(args.user, settings)
        payload = {
            "user_id": args.user, "split": args.split, "history": list(prepared.split.history),
            "candidates": list(prepared.candidates.item_ids), "target_index": prepared.candidates.target_index,
            "rendered_prompt": prepared.prompt.rendered, "prompt_tokens": len(prepared.token_ids),
            "answer_slot": prepared.answer_slot.to_json(),
            "audit": [token.to_json() for token in prepared.letter_tokens]}
        if args.format == "json":
            print(json.dumps(payload, indent=2, ensure_ascii=False))
        else:
            print(visible_text(prepared.prompt.rendered, specials))
            print(_table(payload["audit"], ["letter", "token", "token_id", "step", "as_trained_id", "flags"]))
            _print_notes(prepared.answer_slot.notes())
        return 0
    result = inspector.inspect(args.user, settings, args.adapter or BASE)
    if args.format == "html":
        from rerank_core.report import inspection_report

        return _write_or_print(inspection_report(result, inspector.dataset, model=inspector.loaded.name,
                                                 special_tokens=specials), args.output)
    payload = result.to_json(inspector.dataset)
    if args.format == "json":
        print(json.dumps(payload, indent=2, ensure_ascii=False, default=str))
        return 0
    if result.preset_note:
        print(f"note: {result.preset_note}")
    print(f"user {result.user_id} ({args.split}), system {result.system}, preset {result.settings.preset}")
    print(f"\nhistory ({len(payload['history'])} items, {payload['dropped_history']} dropped to fit):")
    print(_table(payload["history"], ["position", "item_id", "text", "in_prompt"]))
    print("\nrendered prompt (special tokens ⟦…⟧, newlines ↵):")
    print(visible_text(payload["rendered_prompt"], specials))
    print("\nletter audit:")
    print(_table(payload["audit"], ["letter", "token", "token_id", "step", "as_trained_id", "flags"]))
    _print_notes(result.prepared.answer_slot.notes())
    print("\ncandidates:")
    print(_table(payload["candidates"], ["letter", "item_id", "text", "truth", "probability", "rank"]))
    others = ", ".join(f"{row['token']!r} {row['probability']:.3f}" for row in payload["top_other"])
    print(f"\nletter mass {payload['letter_mass']:.3f}; top other tokens: {others}")
    print(f"ground truth rank: {payload['rank']}; " + ", ".join(
        f"{name} {value:.3f}" for name, value in payload["metrics"].items()))
    return 0


def _write_or_print(text: str, output: str | None) -> int:
    """A document to a file (written whole, never half) or to stdout."""
    if output is None:
        sys.stdout.write(text)
        return 0
    from rerank_core.fsutil import atomic_write_text

    atomic_write_text(Path(output), text)
    print(f"wrote {output}", file=sys.stderr)
    return 0


def command_eval(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from rerank_core.baselines import with_baselines
    from rerank_core.compare import compare_systems, comparison_table
    from rerank_core.fsutil import atomic_write_text

    baselines = _baseline_names(args.baselines)
    inspector = build_inspector(args)
    shard = inspector.shard
    is_main = shard is None or shard.is_main
    settings = build_settings(args, args.split)
    users = inspector.dataset.users
    if args.users:
        users = users[:args.users]
    processes = 1 if shard is None else shard.world_size
    if processes > len(users):
        raise ValueError(f"{processes} processes but only {len(users)} user(s) to evaluate: launch at most "
                         f"{len(users)} processes or evaluate more users (--users)")
    systems = [BASE, *(args.adapter or [])]
    # Bad adapters and an unwritable output folder fail now, not after minutes of scoring.
    for name in systems[1:]:
        check_adapter(inspector.loaded, name, args.adapters_dir)
    out_dir = Path(args.output_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OSError(f"--output-dir {out_dir} cannot be created ({error.strerror}): choose a writable folder") \
            from None
    # Every process runs the same comparison; scoring inside it is split across them (Inspector.shard).
    with tqdm(total=len(users) * len(systems), desc="scoring", unit="user", file=sys.stderr,
              disable=not is_main) as bar:
        per_user, summary = compare_systems(inspector, users, settings, systems,
                                            progress=lambda done, _total: bar.update(done - bar.n))
    per_user, summary = with_baselines(inspector, per_user, summary, users, settings, baselines,
                                       reference=args.reference)
    if not is_main:
        return 0
    csv_path, summary_path = out_dir / "per_user.csv", out_dir / "summary.json"
    atomic_write_text(csv_path, per_user.to_csv(index=False))
    records = json.loads(summary.to_json(orient="records"))
    atomic_write_text(summary_path, json.dumps({"users": len(users), "split": args.split, "processes": processes,
                                                "rows": records}, indent=2))
    print(json.dumps(records, indent=2) if args.format == "json" else comparison_table(summary))
    print(f"\nwrote {csv_path} and {summary_path}", file=sys.stderr)
    if args.report:
        from rerank_core.report import comparison_report

        _write_or_print(comparison_report(per_user, summary, settings, dataset=inspector.dataset.name,
                                          model=inspector.loaded.name), args.report)
    return 0


def _baseline_names(text: str) -> list[str]:
    from rerank_core.baselines import BASELINES

    names = [part.strip() for part in text.split(",") if part.strip() and part.strip() != "none"]
    unknown = [name for name in names if name not in BASELINES]
    if unknown:
        raise ValueError(f"--baselines: {', '.join(unknown)} is not one of {', '.join(BASELINES)} (or none)")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m rerank_core", description=(
        "Inspect, evaluate and fine-tune LLM letter rerankers (LlamaRec style). "
        "Every command takes the model, data and prompt options shown in its --help."))
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    audit = commands.add_parser("audit", help="letter → token ID audit for a tokenizer and preset",
                                description="Resolve every letter in use and flag suspicious ones. "
                                            "Needs a tokenizer only.")
    add_common_options(audit)
    audit.add_argument("--format", choices=("table", "json"), default="table", help="output format")
    audit.set_defaults(handler=command_audit)

    show = commands.add_parser("show", help="one user: history, candidates, prompt, audit, probabilities",
                               description="Everything the app's Inspect tab shows for one user.")
    add_common_options(show)
    show.add_argument("--user", required=True, help="user id")
    show.add_argument("--split", choices=("test", "validation"), default="test", help="which target")
    show.add_argument("--adapter", help="score with this adapter from the adapters folder instead of the base")
    show.add_argument("--ignore-adapter-preset", action="store_true",
                      help="score an adapter with --preset instead of the preset it was trained with")
    show.add_argument("--format", choices=("text", "json", "html"), default="text",
                      help="output format; html: one self-contained report file (charts inlined, opens offline)")
    show.add_argument("--output", metavar="FILE", help="write the output to FILE instead of stdout")
    show.set_defaults(handler=command_show)

    evaluate = commands.add_parser("eval", help="metrics over many users; base vs adapters with paired CIs",
                                   description="Score many users, write a per-user CSV and a JSON summary.")
    add_common_options(evaluate)
    evaluate.add_argument("--users", type=_int_range(0), default=200,
                          help="first N users (0 = all; default %(default)s)")
    evaluate.add_argument("--split", choices=("test", "validation"), default="test", help="which target")
    evaluate.add_argument("--adapter", action="append", metavar="NAME",
                          help="also score this adapter (repeatable); differences are paired with the base")
    evaluate.add_argument("--ignore-adapter-preset", action="store_true",
                          help="score adapters with --preset instead of the preset each was trained with")
    evaluate.add_argument("--baselines", default="random,popularity,retriever", metavar="NAMES",
                          help="comma-separated baselines scored on the same candidates: random (expected "
                               "value), popularity (training-part counts), retriever (co-occurrence order); "
                               "none for no baselines (default: %(default)s)")
    evaluate.add_argument("--reference", metavar="RUN",
                          help="pair every run against this one (base, an adapter or a baseline, e.g. "
                               "popularity); default: the base")
    evaluate.add_argument("--output-dir", default="eval_out", help="where per_user.csv and summary.json go")
    evaluate.add_argument("--format", choices=("text", "json"), default="text", help="summary format")
    evaluate.add_argument("--report", metavar="FILE.html",
                          help="also write a self-contained HTML report (settings, metrics with CIs, charts, "
                               "movers) that opens offline")
    evaluate.set_defaults(handler=command_eval)

    add_train_command(commands)
    add_diagnose_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if int(os.environ.get("RANK", "0")) > 0:
        # Under a launcher every process runs the command; one copy of each table (rank 0's) is enough.
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    try:
        return args.handler(args)
    except (ValueError, KeyError, OSError, RuntimeError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"error: {message}", file=sys.stderr)
        return 2
    finally:
        close_process_group()
