"""`python -m rerank_core train`: a LoRA fine-tune with a progress bar, JSON-lines events and safe cancel."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from rerank_core.training import TRAINING_PRESETS, TrainConfig

__all__ = ["EXIT_CANCELLED", "EXIT_FAILED", "add_train_command", "main", "run_train"]

EXIT_FAILED = 1
# 128 + SIGINT, the shell's convention for a run the user stopped.
EXIT_CANCELLED = 130

# TrainConfig field -> (option, type, help). The defaults shown come from the chosen --training-preset.
_CONFIG_OPTIONS: dict[str, tuple[str, Any, str]] = {
    "lora_r": ("--lora-r", int, "LoRA rank r"),
    "lora_alpha": ("--lora-alpha", int, "LoRA alpha (the update is scaled by alpha / r)"),
    "lora_dropout": ("--lora-dropout", float, "dropout on the LoRA input"),
    "target_modules": ("--target-modules", str, "comma-separated module names LoRA adapts, e.g. q_proj,v_proj"),
    "learning_rate": ("--lr", float, "peak learning rate (AdamW, linear decay)"),
    "epochs": ("--epochs", float, "passes over the training samples (fractions allowed)"),
    "batch_size": ("--batch-size", int, "samples per step and process"),
    "grad_accumulation": ("--grad-accumulation", int, "micro-batches summed into one optimizer step"),
    "warmup": ("--warmup", float, "linear warm-up: below 1 a share of all steps, 1 or more a number of steps"),
    "max_samples": ("--max-samples", int, "draw at most this many training samples (0: all of them)"),
    "max_prompt_tokens": ("--max-prompt-tokens", int,
                          "drop the oldest history items until the prompt fits this many tokens "
                          "(0: size it from the data, room for the candidates plus --history-items)"),
    "history_items": ("--history-items", int,
                      "recent history items a data-sized prompt budget makes room for"),
    "sample_mode": ("--sample-mode", str,
                    "prefixes: every prefix of each training sequence (LlamaRec); "
                    "random_split: one seeded split point per user (the research code)"),
    "eval_every": ("--eval-every", int, "validation NDCG@10/Recall@10 every N steps (0: only before and after)"),
    "eval_users": ("--eval-users", int, "size of the fixed validation subset (0: no validation)"),
}


def _add_shared_options(parser: argparse.ArgumentParser) -> None:
    """The options every command has, named as in cli.py, but defaulting to the training preset's values.

    cli.add_common_options defaults suit inspection (preset seed, 1536 prompt tokens, 8 prompts per
    forward pass); for training they would silently override the quick preset's seed_after, data-sized
    prompt budget and 4.
    """
    quick = TRAINING_PRESETS["quick"]
    group = parser.add_argument_group("model, data and prompt (defaults: the training preset's)")
    group.add_argument("--model", metavar="PATH",
                       help="local Hugging Face model folder (default: embedded SmolLM2-135M-Instruct)")
    group.add_argument("--data", metavar="PATH|NAME", help="dataset folder or file, or a built-in dataset: sample "
                       "(synthetic, the default) or ml-100k-real (real MovieLens 100K from the recbole package)")
    group.add_argument("--data-format", help="force the data format instead of detecting it")
    group.add_argument("--preset", help="prompt preset: seed, seed_after, llamarec, llamarec_after "
                       f"(quick: {quick.prompt_preset}; *_after put the letter after the item text)")
    group.add_argument("--template-kwargs", metavar="JSON",
                       help="chat-template options as a JSON object, e.g. '{\"enable_thinking\": false}'; used for "
                            "training and validation, recorded in the manifest and applied when the adapter is "
                            "evaluated (default: none)")
    group.add_argument("--strategy", help=f"verbalizer strategy for validation and the manifest: as_trained, seed, "
                       f"encode (quick: {quick.strategy})")
    group.add_argument("--candidates", type=int, metavar="N",
                       help=f"candidates per prompt, 1-52 (quick: {quick.candidates})")
    group.add_argument("--candidate-source", help=f"negatives: random, popular or retriever "
                       f"(quick: {quick.candidate_source})")
    group.add_argument("--text-field", help=f"item text in prompts: title, caption or summary "
                       f"(quick: {quick.text_field})")
    group.add_argument("--seed", type=int, help=f"seed for samples, candidates and LoRA initialisation "
                       f"(quick: {quick.seed})")
    group.add_argument("--dtype", default="auto", help="auto, bf16, fp16 or fp32 (default: %(default)s)")
    group.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]; under torchrun each process takes "
                       "the GPU of its LOCAL_RANK (default: %(default)s)")
    group.add_argument("--trust-remote-code", action="store_true",
                       help="allow model folders to run their own Python code (off by default)")
    group.add_argument("--adapters-dir", metavar="PATH",
                       help="adapters folder (default: adapters/ beside the code, or $RERANK_ADAPTERS_DIR)")


def add_train_command(subparsers: Any) -> argparse.ArgumentParser:
    """Register `train` (with every option it reads) on a subparsers object; sets handler=run_train."""
    quick, full = TRAINING_PRESETS["quick"], TRAINING_PRESETS["full"]
    parser = subparsers.add_parser(
        "train", help="LoRA fine-tune on answer letters and save adapters/<name>",
        description="LoRA fine-tune on the answer letters of training samples cut from each user's sequence, "
                    "then publish adapters/<name> with a manifest. Progress goes to a bar on stderr (letter_loss, "
                    "the answer letter's loss, next to ln(N), the loss of a model that spreads its answer evenly "
                    "over N candidates; total_loss also averages the end-of-turn tokens) "
                    "and, with --events, to a JSON-lines file. Cancel with SIGTERM, SIGINT (Ctrl-C) or by "
                    "creating the --cancel-file: the run stops at the next step and leaves nothing in "
                    "adapters/. Runs unchanged under `torchrun` / `accelerate launch`. Exit status: 0 saved, "
                    f"{EXIT_FAILED} failed, {EXIT_CANCELLED} cancelled. Settings not given come from "
                    "--training-preset.")
    _add_shared_options(parser)
    parser.add_argument("--name", required=True, help="adapter folder name: letters, digits, '.', '_', '-'")
    parser.add_argument("--training-preset", choices=sorted(TRAINING_PRESETS), default="quick",
                        help="quick: a few minutes on a 2-core CPU with the default model; full: GPU sizing")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing adapter of that name")
    parser.add_argument("--events", metavar="FILE", help="write progress events as JSON lines to FILE")
    parser.add_argument("--cancel-file", metavar="FILE", help="stop at the next step once FILE exists")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    for name, (option, kind, text) in _CONFIG_OPTIONS.items():
        parser.add_argument(option, dest=name, type=kind, default=None,
                            help=f"{text} (quick: {_shown(getattr(quick, name))}, "
                                 f"full: {_shown(getattr(full, name))})")
    parser.add_argument("--train-on-eos", dest="train_on_eos", action=argparse.BooleanOptionalAction,
                        default=None, help="also train the end-of-turn token(s) after the letter (quick: on)")
    parser.set_defaults(handler=run_train)
    return parser


def _shown(value: Any) -> str:
    if value is None:
        return "0"  # the command line's spelling of None (no sample limit, a data-sized prompt budget)
    return ",".join(value) if isinstance(value, tuple) else str(value)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The training preset, with every option the user gave replacing its value."""
    from rerank_core.training import training_config

    overrides: dict[str, Any] = {name: getattr(args, name, None) for name in _CONFIG_OPTIONS}
    if overrides["target_modules"] is not None:
        overrides["target_modules"] = tuple(part.strip() for part in overrides["target_modules"].split(",")
                                            if part.strip())
    shared = {"prompt_preset": "preset", "strategy": "strategy", "candidates": "candidates",
              "candidate_source": "candidate_source", "text_field": "text_field", "seed": "seed",
              "train_on_eos": "train_on_eos", "template_kwargs": "template_kwargs"}
    overrides.update({field_name: getattr(args, option, None) for field_name, option in shared.items()})
    # 0 means "no limit" for max_samples and "size from the data" for max_prompt_tokens: both None in TrainConfig.
    zeroed = [name for name in ("max_samples", "max_prompt_tokens") if overrides[name] == 0]
    config = training_config(args.training_preset, **{name: None if name in zeroed else value
                                                      for name, value in overrides.items()})
    return replace(config, **dict.fromkeys(zeroed)) if zeroed else config


class _ProgressBar:
    """tqdm over steps with the loss next to ln(N): a run stuck at the uniform letter loss shows at once."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: Any = None
        self.validation = ""

    def __call__(self, event: dict[str, Any]) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

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
    from rerank_core.data import load_dataset
    from rerank_core.models import load_model
    from rerank_core.progress import CancelFlag, EventLog
    from rerank_core.training import check_adapter_target, train_adapter

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
    try:
        with cancel.handling_signals():
            try:
                config = config_from_args(args)
                check_adapter_target(args.name, args.adapters_dir, overwrite=args.overwrite)  # before loading
                dataset = load_dataset(args.data, args.data_format)
                loaded = load_model(args.model, device=_process_device(args.device), dtype=args.dtype or "auto",
                                    trust_remote_code=args.trust_remote_code)
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
                return EXIT_FAILED
    finally:
        if events is not None:
            events.close()
    if report.status == "cancelled":
        print(f"cancelled ({cancel.reason}); nothing was saved", file=sys.stderr)
        return EXIT_CANCELLED
    _print_summary(report)
    return 0


def _process_device(requested: str | None) -> str:
    """Under torchrun each process loads onto its own GPU, not all onto cuda:0."""
    import torch

    device = requested or "auto"
    local_rank = os.environ.get("LOCAL_RANK")
    if local_rank is not None and device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{local_rank}"
    return device


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
    """`python -m rerank_core.cli_train train ...`: the train command alone (the app's job runner uses it)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m rerank_core")
    add_train_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
