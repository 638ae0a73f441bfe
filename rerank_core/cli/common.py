"""What every `python -m rerank_core` command shares: the model, data and prompt options and what they build."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from rerank_core.candidates import CANDIDATE_ORDERS, CANDIDATE_SOURCES, MAX_CANDIDATES, CandidateConfig
from rerank_core.chat_templates import read_chat_template
from rerank_core.cli.output import model_json
from rerank_core.data.dataset import Dataset
from rerank_core.data.item_text import TEXT_FIELDS, item_text_spelling
from rerank_core.data.loaders import FORMATS, load_dataset
from rerank_core.distributed import process_device, process_shard
from rerank_core.inspector import Inspector, InspectSettings
from rerank_core.model_refs import parse_model_ref
from rerank_core.models import load_model, load_tokenizer
from rerank_core.prompts import PRESETS, get_preset
from rerank_core.verbalizer import STRATEGIES

__all__ = ["add_common_options", "build_inspector", "build_settings", "int_range", "load_data",
           "model_from_options", "tokenizer_from_options"]

log = logging.getLogger("rerank_core")


def int_range(low: int, high: int | None = None) -> Any:
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


def _item_text_spec(text: str) -> str:
    """An argparse type: a malformed item-text spec stops at parsing; its parts are checked once the data loads."""
    try:
        return item_text_spelling(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_common_options(parser: argparse.ArgumentParser) -> None:
    """Options every command shares, so a result seen in the app can be reproduced exactly."""
    group = parser.add_argument_group("model, data and prompt")
    group.add_argument("--model", metavar="REF",
                       help="a local Hugging Face model folder (safetensors), a hub id org/name[@revision] from the "
                            "local Hugging Face cache (never downloaded; $HF_HUB_CACHE/$HF_HOME honoured), or a .gguf "
                            "file (converted once); default: embedded SmolLM2-135M-Instruct")
    group.add_argument("--tokenizer", metavar="REF",
                       help="a tokenizer for commands that need no weights: a folder (tokenizer files or a "
                            "SentencePiece tokenizer.model), a cached hub id, or a .gguf file (vocabulary-only too); "
                            "`show` then prints the prompt and audit without scores")
    group.add_argument("--chat-template", metavar="FILE.jinja",
                       help="a chat template to use instead of the tokenizer's own, for inference and training alike "
                            "(recorded in adapter manifests and reports, checked by the audit)")
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
    group.add_argument("--text-field", default="title", type=_item_text_spec, metavar="SPEC",
                       help=f"which item text stands for an item: one of {', '.join(TEXT_FIELDS)} (title_count: the "
                            "title and its interaction count in the training part), or parts joined by '+': title, "
                            "caption, summary, count and the dataset's own fields, e.g. title+year+genres+count on "
                            "ml-100k, title+release_year+class+count on ml-100k-real (default: %(default)s)")
    group.add_argument("--candidates", type=int_range(1, MAX_CANDIDATES), default=20, metavar="N",
                       help="number of candidates, 1-52 (default: %(default)s)")
    group.add_argument("--candidate-source", default="random", choices=CANDIDATE_SOURCES,
                       help="where negatives come from (default: %(default)s)")
    group.add_argument("--candidate-order", default="shuffled", choices=CANDIDATE_ORDERS,
                       help="shuffled (seeded) or the retriever's ranking (default: %(default)s)")
    group.add_argument("--seed", type=int, default=0, help="seed for candidates and sampling (default: %(default)s)")
    group.add_argument("--max-prompt-tokens", type=int_range(1), default=1536, metavar="N",
                       help="drop oldest history items until the prompt fits (default: %(default)s)")
    group.add_argument("--dtype", default="auto", help="auto, bf16, fp16 or fp32 (default: %(default)s)")
    group.add_argument("--device", default="auto",
                       help="auto, cpu or cuda[:N] (default: %(default)s; auto spreads a model over the GPUs with "
                            "accelerate when there are several or it does not fit one)")
    group.add_argument("--max-memory", metavar="BUDGETS",
                       help="with --device auto, the most each device may hold, e.g. 0=20GiB,1=20GiB,cpu=64GiB "
                            "(accelerate's max_memory; layers beyond go to the next device)")
    group.add_argument("--batch-size", type=int_range(1), default=8,
                       help="prompts per forward pass (default: %(default)s)")
    group.add_argument("--trust-remote-code", action="store_true",
                       help="allow model folders to run their own Python code (off by default)")
    group.add_argument("--adapters-dir", metavar="PATH",
                       help="adapters folder (default: adapters/ beside the code, or $RERANK_ADAPTERS_DIR)")


def build_settings(args: argparse.Namespace, split: str = "test") -> InspectSettings:
    """InspectSettings from the common options."""
    candidates = CandidateConfig(source=args.candidate_source, count=args.candidates, seed=args.seed,
                                 order=args.candidate_order)
    return InspectSettings(preset=get_preset(args.preset), strategy=args.strategy, text_field=args.text_field,
                           split=split, candidates=candidates, max_prompt_tokens=args.max_prompt_tokens,
                           use_adapter_preset=not getattr(args, "ignore_adapter_preset", False),
                           template_kwargs=args.template_kwargs)


def tokenizer_from_options(args: argparse.Namespace) -> Any:
    """The tokenizer --tokenizer (else --model) names, with --chat-template applied: what audit and diagnose read."""
    return load_tokenizer(args.tokenizer or args.model, chat_template=getattr(args, "chat_template", None))


def model_from_options(args: argparse.Namespace, inspector: Inspector) -> dict[str, Any]:
    """The model and chat template an output was made with (output.model_json): the loaded model's, or with a
    tokenizer alone, the reference and template the options name."""
    if inspector.loaded is not None:
        loaded = inspector.loaded
        return model_json(loaded.reference, loaded.name, loaded.chat_template)
    reference = args.tokenizer or args.model or ""
    template = read_chat_template(args.chat_template) if getattr(args, "chat_template", None) else None
    return model_json(reference, parse_model_ref(reference).display_name, template)


def load_data(args: argparse.Namespace) -> Dataset:
    dataset = load_dataset(args.data, args.data_format)
    dataset.item_text(args.text_field)  # a field the data lacks is named before any model loads
    if dataset.short_users:
        log.warning("%d user(s) with fewer than 3 interactions are left out of the split: %s",
                    len(dataset.short_users), ", ".join(dataset.short_users[:10]))
    return dataset


def build_inspector(args: argparse.Namespace, *, need_model: bool = True) -> Inspector:
    """An Inspector from the common options; with --tokenizer and no model, one without weights."""
    dataset = load_data(args)
    if args.tokenizer and not args.model and not need_model:
        return Inspector(dataset, tokenizer=tokenizer_from_options(args), adapters_root=args.adapters_dir)
    # Under torchrun / accelerate launch each process takes its own GPU and scores its share of the prompts.
    device = process_device(args.device)
    shard = process_shard(device)
    loaded = load_model(args.model, device=device, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
                        chat_template=args.chat_template, max_memory=args.max_memory)
    return Inspector(dataset, loaded, adapters_root=args.adapters_dir, batch_size=args.batch_size, shard=shard)
