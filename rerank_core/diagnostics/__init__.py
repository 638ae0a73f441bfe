"""Diagnostics no single score shows, one module each: position bias, letter prior, history influence, letter
mass; the template check needs no model and lives beside alignment (rerank_core.template_check)."""

from rerank_core.diagnostics.history import HistoryInfluence, history_influence
from rerank_core.diagnostics.mass import LetterMass, letter_mass
from rerank_core.diagnostics.position import (
    ORDER_MODES,
    OrderSpec,
    PositionBias,
    PositionBiasSummary,
    candidate_orders,
    kendall_tau_b,
    position_bias,
    position_bias_over_users,
)
from rerank_core.diagnostics.prior import PRIOR_MODES, LetterPrior, letter_prior
from rerank_core.template_check import TemplateConsistency, TemplateProblem, template_consistency

__all__ = [
    "ORDER_MODES",
    "PRIOR_MODES",
    "HistoryInfluence",
    "LetterMass",
    "LetterPrior",
    "OrderSpec",
    "PositionBias",
    "PositionBiasSummary",
    "TemplateConsistency",
    "TemplateProblem",
    "candidate_orders",
    "history_influence",
    "kendall_tau_b",
    "letter_mass",
    "letter_prior",
    "position_bias",
    "position_bias_over_users",
    "template_consistency",
]
