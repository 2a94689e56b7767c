"""Per-sample signals from class probabilities ``[..., B, K]`` and labels ``[B]``, shared by the
core and the plugins (MAIL's PM, LRAT's t, BAT's q, BiLAW's margins, the weight dumps)."""

from __future__ import annotations

from torch import Tensor


def _label_index(probs: Tensor, y: Tensor) -> Tensor:
    return y.expand(probs.shape[:-1]).unsqueeze(-1)


def true_prob(probs: Tensor, y: Tensor) -> Tensor:
    """``p_y``."""
    return probs.gather(-1, _label_index(probs, y)).squeeze(-1)


def max_other_prob(probs: Tensor, y: Tensor) -> Tensor:
    """``max_{j != y} p_j``."""
    return probs.scatter(-1, _label_index(probs, y), float("-inf")).amax(-1)


def probabilistic_margin(probs: Tensor, y: Tensor) -> Tensor:
    """``p_y - max_{j != y} p_j`` (MAIL Eq. 5/6, LRAT Eq. 11, BiLAW's Def. 2 margin)."""
    return true_prob(probs, y) - max_other_prob(probs, y)
