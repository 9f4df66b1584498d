"""Full-ranking metrics (SPEC section 5): Recall@K (= Hit@K), NDCG@K, MRR@K."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

KS = (5, 10, 20, 50)


def target_ranks(scores: Tensor, targets: Tensor) -> Tensor:
    """0-based rank of each target among all items, (B,). Ties count against the target, so a
    model that scores everything equally ranks every target last, never first."""
    t = scores.gather(1, targets[:, None])  # (B, 1)
    ahead = (scores > t) | ((scores == t) & (torch.arange(scores.shape[1], device=scores.device) != targets[:, None]))
    return ahead.sum(1)


class RankAccumulator:
    """Collects target ranks over batches; `result()` averages the metrics over all of them."""

    def __init__(self, ks: tuple[int, ...] = KS):
        self.ks = ks
        self.ranks: list[np.ndarray] = []

    def add(self, scores: Tensor, targets: Tensor) -> None:
        self.ranks.append(target_ranks(scores, targets).cpu().numpy())

    def result(self) -> dict[str, float]:
        return metrics_from_ranks(np.concatenate(self.ranks), self.ks)


def metrics_from_ranks(ranks: np.ndarray, ks: tuple[int, ...] = KS) -> dict[str, float]:
    out = {}
    for k in ks:
        hit = ranks < k
        out[f"recall@{k}"] = float(hit.mean())
        out[f"ndcg@{k}"] = float(np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0).mean())
        out[f"mrr@{k}"] = float(np.where(hit, 1.0 / (ranks + 1.0), 0.0).mean())
    return out


def popularity_scores(train_counts: np.ndarray) -> Tensor:
    """Popularity baseline: training counts, ties broken by item index; padding never ranked."""
    n = len(train_counts)
    s = torch.as_tensor(train_counts, dtype=torch.float64) - torch.arange(n) / (2.0 * n)
    s[0] = float("-inf")
    return s
