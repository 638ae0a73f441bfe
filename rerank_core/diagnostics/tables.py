"""The diagnostics' tables (pandas, no plotting): what `rerank_core diagnose` prints and the app shows."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from rerank_core.diagnostics import (
    HistoryInfluence,
    LetterMass,
    LetterPrior,
    PositionBias,
    PositionBiasSummary,
)
from rerank_core.metrics import rank_of_truth
from rerank_core.template_check import TemplateConsistency

__all__ = [
    "history_influence_frame",
    "letter_mass_frame",
    "letter_prior_frame",
    "position_items_frame",
    "position_summary_frame",
    "template_letters_frame",
    "template_tokens_frame",
]


def position_items_frame(result: PositionBias) -> pd.DataFrame:
    """Per item: probability as shown, debiased, its spread over orders, and both ranks."""
    item_probs, debiased = result.item_probs, result.debiased
    # Ranks with the metrics' tie rule (ties rank last), so the truth's row matches its metrics.
    shown_rank = [rank_of_truth(item_probs[0], index) for index in range(len(result.item_ids))]
    debiased_rank = [rank_of_truth(debiased, index) for index in range(len(result.item_ids))]
    return pd.DataFrame([{
        "letter": result.letters[index], "item_id": item_id, "text": text,
        "truth": "★ truth" if index == result.target_index else "",
        "probability": round(float(item_probs[0, index]), 4), "debiased": round(float(debiased[index]), 4),
        "min_over_orders": round(float(item_probs[:, index].min()), 4),
        "max_over_orders": round(float(item_probs[:, index].max()), 4),
        "rank": shown_rank[index], "rank_debiased": debiased_rank[index]}
        for index, (item_id, text) in enumerate(zip(result.item_ids, result.item_texts, strict=True))])


def position_summary_frame(summaries: Sequence[PositionBiasSummary]) -> pd.DataFrame:
    """One row per system: how biased, how stable, and what averaging over orders does to NDCG@10."""
    rows = []
    for summary in summaries:
        metrics = summary.metrics()
        difference = summary.debiased_difference()
        rows.append({
            "system": summary.system, "users": len(summary.users), "orders": len(summary.users[0].orders),
            "P(A)": round(float(summary.mass_by_letter[0]), 4), "top-1 is A": round(summary.top1_a_rate, 4),
            "uniform": round(summary.uniform, 4), "stability (tau)": round(summary.mean_stability, 4),
            "NDCG@10 shown": round(metrics["original"]["NDCG@10"], 4),
            "NDCG@10 debiased": round(metrics["debiased"]["NDCG@10"], 4),
            "debiased − shown (95% CI)": f"{difference.difference:+.4f} "
                                         f"({difference.low:+.4f} .. {difference.high:+.4f})",
            "NDCG@10 mean over orders": round(metrics["over_orders"]["NDCG@10"], 4)})
    return pd.DataFrame(rows)


def letter_prior_frame(priors: Sequence[LetterPrior]) -> pd.DataFrame:
    """One row per letter, one column per system, with the uniform share beside them."""
    if not priors:
        return pd.DataFrame(columns=["letter", "uniform"])
    frame = pd.DataFrame({"letter": list(priors[0].letters), "uniform": round(priors[0].uniform, 4)})
    for prior in priors:
        frame[prior.system] = prior.mean.round(4)
        frame[f"{prior.system} top-1 share"] = prior.top_letter_share.round(4)
    return frame


def history_influence_frame(result: HistoryInfluence) -> pd.DataFrame:
    """The history table with each item's influence; `influential` marks the rows to highlight."""
    delta = result.truth_delta
    influential = set(result.most_influential())
    return pd.DataFrame([{
        "position": position, "item_id": item_id, "text": text,
        "Δ P(truth)": None if delta is None else round(float(delta[row]), 4),
        "total_variation": round(float(result.total_variation[row]), 4),
        "top-1 without": f"{result.letters[int(result.top1_without[row])]}"
                         + (" (changed)" if result.top1_changed[row] else ""),
        "influential": row in influential}
        for row, (position, item_id, text) in enumerate(
            zip(result.positions, result.history_ids, result.history_texts, strict=True))])


def template_tokens_frame(report: TemplateConsistency) -> pd.DataFrame:
    """Both token sequences side by side around the first difference (or the end of the prompt)."""
    inference = {index: (token_id, token) for index, token_id, token in report.inference_window}
    training = {index: (token_id, token) for index, token_id, token in report.training_window}
    loss = {index for index, _, _ in report.loss_tokens}
    rows = []
    for index in sorted(set(inference) | set(training)):
        left, right = inference.get(index), training.get(index)
        rows.append({
            "index": index, "inference token": "" if left is None else visible_token(left[1]),
            "inference id": None if left is None else left[0],
            "training token": "" if right is None else visible_token(right[1]),
            "training id": None if right is None else right[0],
            "same": left == right, "loss": index in loss,
            "note": "first difference" if index == report.diverge_at else
                    ("answer letter" if report.answer_token and index == report.answer_token[0] else "")})
    frame = pd.DataFrame(rows, columns=["index", "inference token", "inference id", "training token",
                                        "training id", "same", "loss", "note"])
    # Nullable integers: a side that has ended shows <NA>, not a float ID.
    return frame.astype({"inference id": "Int64", "training id": "Int64"})


def template_letters_frame(report: TemplateConsistency) -> pd.DataFrame:
    """Per letter: the bare-letter (seed) token and the token training teaches, with audit flags."""
    return pd.DataFrame([{
        "letter": token.letter, "seed token": visible_token(token.token), "seed id": token.token_id,
        "as-trained token": visible_token(token.as_trained_token), "as-trained id": token.as_trained_id,
        "flags": ", ".join(token.flags) or "ok"} for token in report.letter_tokens])


# Byte-level BPE spells a newline, a space and a tab as these letters; Inspect shows ↵ · ⇥ for them.
_BYTE_LEVEL_MARKS = str.maketrans({"Ċ": "↵", "Ġ": "·", "ĉ": "⇥"})


def visible_token(token: str | None) -> str | None:
    """A vocabulary token as Inspect shows it: ↵ for a newline, · for a space, ⇥ for a tab."""
    return None if token is None else token.translate(_BYTE_LEVEL_MARKS)


def letter_mass_frame(report: LetterMass) -> pd.DataFrame:
    return report.summary().round(4)
