"""Learning to rank output lengths (arXiv 2408.15792): a small encoder that orders prompts shortest-first."""

from lmstack.ranking.listmle import ListMLEObjective, listmle_loss
from lmstack.ranking.metrics import kendall_tau, per_list_tau
from lmstack.ranking.predictor import LengthRanker

__all__ = ["LengthRanker", "ListMLEObjective", "kendall_tau", "listmle_loss", "per_list_tau"]
