"""`python -m rerank_core train`: a LoRA fine-tune with a progress bar, JSON-lines events and safe cancel."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from rerank_core.chat_templates import check_chat_template, read_chat_template
from rerank_core.data.loaders import load_dataset
from rerank_core.distributed import launched_rank, process_device
from rerank_core.models import load_model
from rerank_core.progress import CancelFlag, EventLog
from rerank_core.training.config import TRAINING_PRESETS, TrainConfig, training_config
from rerank_core.training.manifest import check_adapter_target
from rerank_core.training.run import train_adapter
from rerank_core.training.samples import item_text_cost
from rerank_core.training.settings import SETTINGS, Setting, parse_settings

__all__ = ["EXIT_BAD_SETTINGS", "EXIT_CANCELLED", "EXIT_FAILED", "add_train_command", "main", "run_train"]

EXIT_FAILED = 1
# As every other command: a bad setting or a taken name is refused before anything loads.
EXIT_BAD_SETTINGS = 2
# 128 + SIGINT, the shell's convention for a run the user stopped.
EXIT_CANCELLED = 130


def _add_shared_options(parser: argparse.ArgumentParser) -> None:
    """Model, data and device options, named as in cli/common.py; the prompt and candidate options are settings."""
    group = parser.add_argument_group("model and data")
    group.add_argument("--model", metavar="REF",
                       help="a local Hugging Face model folder, a hub id org/name[@revision] from the local cache, "
                            "or a .gguf file (default: embedded SmolLM2-135M-Instruct)")
    group.add_argument("--chat-template", metavar="FILE.jinja",
                       help="a chat template to train with instead of the tokenizer's own (recorded in the manifest)")
    group.add_argument("--max-memory", metavar="BUDGETS",
                       help="with --device auto, the most each device may hold, e.g. 0=20GiB,1=20GiB,cpu=64GiB")
    group.add_argument("--data", metavar="PATH|NAME", help="dataset folder or file, or a built-in dataset: sample "
                       "(synthetic, the default) or ml-100k-real (real MovieLens 100K from the recbole package)")
    group.add_argument("--data-format", help="force the data format instead of detecting it")
    group.add_argument("--dtype", default="auto", help="auto, bf16, fp16 or fp32 (default: %(default)s)")
    group.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]; under torchrun each process takes "
                       "the GPU of its LOCAL_RANK (default: %(default)s)")
    group.add_argument("--trust-remote-code", action="store_true",
                       help="allow model folders to run their own Python code (off by default)")
    group.add_argument("--adapters-dir", metavar="PATH",
                       help="adapters folder (default: adapters/ beside the code, or $RERANK_ADAPTERS_DIR)")


def _setting_type(item: Setting) -> Any:
    """An argparse type: a bad value stops at parsing (exit 2), naming the option, before anything loads; the text
    itself is kept, so parse_settings stays the one place that converts it (0 → None included)."""
    def parse(text: str) -> str:
        try:
            item.parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        return text

    parse.__name__ = item.kind.__name__  # argparse names the type in its "invalid ... value" message
    return parse


def _add_settings(parser: argparse.ArgumentParser) -> None:
    """One flag per training setting, from training.settings.SETTINGS; a flag not given keeps the preset's value."""
    quick, full = TRAINING_PRESETS["quick"], TRAINING_PRESETS["full"]
    group = parser.add_argument_group("training settings (defaults: the training preset's)")
    for item in SETTINGS:
        defaults = f"quick: {_shown(getattr(quick, item.name))}, full: {_shown(getattr(full, item.name))}"
        text = f"{item.help}; {item.rule} ({defaults})"
        if item.kind is bool:
            group.add_argument(item.flag, dest=item.name, action=argparse.BooleanOptionalAction, default=None,
                               help=text)
        else:
            group.add_argument(item.flag, dest=item.name, type=_setting_type(item), default=None,
                               metavar=item.name.upper(), help=text)


def add_train_command(subparsers: Any) -> argparse.ArgumentParser:
    """Register `train` (with every option it reads) on a subparsers object; sets handler=run_train."""
    parser = subparsers.add_parser(
        "train", help="LoRA fine-tune on answer letters and save adapters/<name>",
        description="LoRA fine-tune on the answer letters of training samples cut from each user's sequence, "
                    "then publish adapters/<name> with a manifest. Progress goes to a bar on stderr (letter_loss, "
                    "the answer letter's loss, next to ln(N), the loss of a model that spreads its answer evenly "
                    "over N candidates; total_loss also averages the end-of-turn tokens) "
                    "and, with --events, to a JSON-lines file. Cancel with SIGTERM, SIGINT (Ctrl-C) or by "
                    "creating the --cancel-file: the run stops at the next step and leaves nothing in "
                    "adapters/. Runs unchanged under `torchrun` / `accelerate launch`. Exit status: 0 saved, "
                    f"{EXIT_FAILED} failed, {EXIT_BAD_SETTINGS} bad settings (nothing loaded), {EXIT_CANCELLED} "
                    "cancelled. Settings not given come from --config, then from --training-preset.")
    _add_shared_options(parser)
    parser.add_argument("--name", required=True, help="adapter folder name: letters, digits, '.', '_', '-'")
    parser.add_argument("--training-preset", choices=sorted(TRAINING_PRESETS), default="quick",
                        help="quick: a few minutes on a 2-core CPU with the default model; full: GPU sizing; "
                             "movielens: the real MovieLens 100K (ml-100k-real) with the count in the item text, "
                             "6-12 minutes on a 2-core CPU (346 s on a Zen 5)")
    parser.add_argument("--config", metavar="FILE",
                        help="every setting from a JSON file (TrainConfig.to_json, as the app hands a run over); "
                             "flags given beside it win")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing adapter of that name")
    parser.add_argument("--events", metavar="FILE", help="write progress events as JSON lines to FILE")
    parser.add_argument("--cancel-file", metavar="FILE", help="stop at the next step once FILE exists")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_settings(parser)
    parser.set_defaults(handler=run_train)
    return parser


def _shown(value: Any) -> str:
    if value is None:
        return "0"  # the command line's spelling of None (no sample limit, a data-sized prompt budget)
    return ",".join(value) if isinstance(value, tuple) else str(value)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """--config's settings (or the training preset), with every setting flag the user gave replacing its value."""
    given = {item.name: getattr(args, item.name, None) for item in SETTINGS}
    if args.config:
        try:
            base = TrainConfig.from_json(json.loads(Path(args.config).read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError, TypeError) as error:
            raise ValueError(f"--config {args.config} cannot be read as training settings: {error}") from None
    else:
        base = training_config(args.training_preset)
    return replace(base, **parse_settings(given))


class _ProgressBar:
    """tqdm over steps with the loss next to ln(N): a run stuck at the uniform letter loss shows at once."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: Any = None
        self.validation = ""

    def __call__(self, event: dict[str, Any]) -> None:
        if not self.enabled:
            return
        kind = event["event"]
        if kind == "stage" and event.get("stage") == "training":
            self.bar = tqdm(total=event["total_steps"], desc="train", unit="step", file=sys.stderr,
                            dynamic_ncols=True)
        elif kind == "stage":
            detail = f" {event['detail']}" if event.get("detail") else ""
            print(f"[{event['stage']}]{detail}", file=sys.stderr, flush=True)
        elif kind == "validation":
            self.validation = f"{event['NDCG@10']:.3f}"
            if self.bar is None:
                print(f"validation step {event['step']}: NDCG@10 {event['NDCG@10']:.4f} "
                      f"Recall@10 {event['Recall@10']:.4f}", file=sys.stderr, flush=True)
        elif kind == "step" and self.bar is not None:
            self.bar.update(event["step"] - self.bar.n)
            # The letter loss is what ln N bounds; the total also averages the end-of-turn tokens.
            postfix = {"letter_loss": f"{event['letter_loss']:.3f}", "lnN": f"{event['uniform_loss']:.3f}",
                       "total_loss": f"{event['total_loss']:.3f}"}
            if self.validation:
                postfix["val_ndcg10"] = self.validation
            self.bar.set_postfix(postfix, refresh=True)
        elif kind in ("done", "cancelled", "failed") and self.bar is not None:
            self.bar.close()
            self.bar = None


def run_train(args: argparse.Namespace) -> int:
    """The `train` command: load, train, publish; returns the exit status."""
    events = EventLog(args.events) if args.events else None
    bar = _ProgressBar(not args.no_progress)
    finished: list[str] = []

    def on_event(event: dict[str, Any]) -> None:
        if event["event"] in ("done", "cancelled", "failed"):
            finished.append(event["event"])
        if events is not None:
            events.write(event)
        bar(event)

    cancel = CancelFlag(args.cancel_file)
    checked = False
    try:
        with cancel.handling_signals():
            try:
                config = config_from_args(args)
                # A template that cannot be read or rendered is a bad setting too: refused before anything loads.
                template = check_chat_template(read_chat_template(args.chat_template)) if args.chat_template else None
                check_adapter_target(args.name, args.adapters_dir, overwrite=args.overwrite)  # before loading
                checked = True
                dataset = load_dataset(args.data, args.data_format)
                dataset.item_text(config.text_field)  # an unknown field is named before the model loads
                loaded = load_model(args.model, device=process_device(args.device), dtype=args.dtype or "auto",
                                    trust_remote_code=args.trust_remote_code, chat_template=template,
                                    max_memory=args.max_memory)
                if launched_rank() == 0:  # what the item text costs, before the run spends time on it
                    cost = item_text_cost(dataset, loaded.tokenizer, config)
                    print(cost.describe_cost(config.text_field), file=sys.stderr, flush=True)
                report = train_adapter(loaded, dataset, config, args.name, root=args.adapters_dir,
                                       overwrite=args.overwrite, on_event=on_event, cancel=cancel,
                                       training_preset=args.training_preset)
            except (Exception, KeyboardInterrupt) as error:
                if not finished:  # failed before train_adapter could say so
                    on_event({"event": "failed", "adapter": args.name, "error": f"{type(error).__name__}: {error}"})
                if isinstance(error, KeyboardInterrupt):
                    print("cancelled", file=sys.stderr)
                    return EXIT_CANCELLED
                print(f"error: {error}", file=sys.stderr)
                return EXIT_FAILED if checked else EXIT_BAD_SETTINGS
    finally:
        if events is not None:
            events.close()
    if report.status == "cancelled":
        print(f"cancelled ({cancel.reason}); nothing was saved", file=sys.stderr)
        return EXIT_CANCELLED
    _print_summary(report)
    return 0


def _print_summary(report: Any) -> None:
    if report.path is None:
        return  # a non-zero rank of a distributed run: rank 0 prints
    before, after = report.validation.get("before"), report.validation.get("after")
    print(f"saved adapter {report.adapter!r} to {report.path}")
    print(f"  {report.samples} samples (dropped: {report.dropped}), {report.steps} steps, "
          f"{report.train_time_s:.1f} s training, {report.wall_time_s:.1f} s in all")
    if report.loss_line:
        print(f"  final {report.loss_line}")
    if before and after:
        print("  validation " + ", ".join(f"{name} {before[name]:.4f} -> {after[name]:.4f}" for name in before))
    print(json.dumps({"adapter": report.adapter, "path": report.path, "status": report.status}))


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m rerank_core.cli.train train ...`: the train command alone (the app's job runner uses it)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m rerank_core")
    add_train_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
