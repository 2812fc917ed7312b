"""Several trained copies of one architecture served as one model: the mean of their logits.

The members differ only in their seed (initial weights, batch order, dropout masks); they share
the vocabulary, the labels and the dev split, so one encoder feeds all of them and one ONNX graph
holds them side by side.

Why the mean of the logits and not of the probabilities: softmax(mean of logits) is the
normalised geometric mean of the members' probabilities, close to the arithmetic mean when the
members mostly agree (cross-validation measures both: docs/training.md), and it keeps Kim's CNN's
explanation exact. Each member's logit is its bias plus the sum of its features' contributions, so
the mean is the mean bias plus the sum of every member's contributions divided by N:
`forward_with_evidence` returns the members' features side by side, member after member
(B, N * F'), each contribution divided by N.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class LogitMeanEnsemble(nn.Module):
    """Members (each: forward -> logits (B, K)) -> the mean of their logits (B, K)."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs two or more members, got {len(members)}")
        self.members = nn.ModuleList(members)
        self.config = members[0].config  # every member's (they differ only in their weights)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return torch.stack([member(*inputs) for member in self.members]).mean(dim=0)  # (N, B, K) -> (B, K)


class ExplainableLogitMean(LogitMeanEnsemble):
    """An ensemble of models with `forward_with_evidence` (Kim's CNN), keeping it exact."""

    def forward_with_evidence(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Mean logits (B, K), window starts (B, N * F'), contributions / N (B, K, N * F')."""
        evidence = [member.forward_with_evidence(*inputs) for member in self.members]
        logits = torch.stack([logits for logits, _, _ in evidence]).mean(dim=0)
        window_starts = torch.cat([starts for _, starts, _ in evidence], dim=1)
        contributions = torch.cat([shares for _, _, shares in evidence], dim=2) / len(self.members)
        return logits, window_starts, contributions

    def window_scores(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        """Every member's per-width window scores, member after member (the order of the features)."""
        return [scores for member in self.members for scores in member.window_scores(*inputs)]


def ensemble_of(members: Sequence[nn.Module]) -> LogitMeanEnsemble:
    explainable = all(hasattr(member, "forward_with_evidence") for member in members)
    return (ExplainableLogitMean if explainable else LogitMeanEnsemble)(members)


# Member m of an ensemble trains with seed + m * MEMBER_SEED_STRIDE: member 0 is the single model
# of that seed, and no member's seed is another fold's (cross-validation's folds use seed + fold).
MEMBER_SEED_STRIDE = 1000


def member_seeds(seed: int, members: int) -> list[int]:
    return [seed + MEMBER_SEED_STRIDE * member for member in range(members)]
