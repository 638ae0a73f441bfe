"""What each item text costs in prompt tokens (issue 22): the README's `--text-field` comparison, tokenization only.

Run: `PYTHONPATH=. python bench/bench_item_text.py [--data ml-100k-real] [--candidates 20] [--history-items 5]`.
For each spec it measures the seeded sample prompts a fine-tune's prompt budget is sized from
(training.samples.item_text_cost: the quick preset's prompt preset, the given candidates and recent history
items) and prints a markdown table of the median and longest prompt with one item's text. Deterministic: no
timing, no model weights (the tokenizer alone), seconds on a CPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rerank_core.data.loaders import load_dataset
from rerank_core.models import load_tokenizer
from rerank_core.training.config import training_config
from rerank_core.training.samples import item_text_cost

# MovieLens 100K from the recbole package has release_year and class (its genres); the title already ends with
# the year, so title+release_year+class+count renders as title+class+count does.
DEFAULT_SPECS = ("title", "caption", "summary", "title_count", "title+count", "title+class",
                 "title+release_year+class+count", "class+count")


def main() -> None:
    """Print the table for the given dataset and specs."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="ml-100k-real", help="dataset folder or built-in name")
    parser.add_argument("--model", help="tokenizer of this model reference (default: the embedded one)")
    parser.add_argument("--specs", default=",".join(DEFAULT_SPECS), help="comma-separated item-text specs")
    parser.add_argument("--candidates", type=int, default=20)
    parser.add_argument("--history-items", type=int, default=5)
    parser.add_argument("--item", default="50", help="the item whose text the table shows (ml-100k: Star Wars)")
    args = parser.parse_args()
    dataset = load_dataset(args.data)
    tokenizer = load_tokenizer(args.model)
    print(f"{dataset.name}: {args.candidates} candidates + {args.history_items} history items, fields "
          f"{', '.join(dataset.item_fields) or 'none'}\n")
    print("| `--text-field` | median prompt tokens | max | item text |")
    print("|---|---|---|---|")
    for spec in args.specs.split(","):
        config = training_config("quick", text_field=spec, candidates=args.candidates,
                                 history_items=args.history_items)
        cost = item_text_cost(dataset, tokenizer, config)
        shown = dataset.text(args.item, spec).replace("|", "\\|")  # a literal bar inside a markdown cell
        print(f"| `{spec}` | {cost.median_tokens} | {cost.tokens} | {shown} |")


if __name__ == "__main__":
    main()
