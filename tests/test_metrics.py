"""Metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from mp4sr_train.metrics import metrics_from_ranks, popularity_scores, target_ranks


def test_ranks_count_ties_against_the_target():
    scores = torch.tensor([[float("-inf"), 0.9, 0.5, 0.5, 0.1]])
    assert target_ranks(scores, torch.tensor([2])).tolist() == [2]  # 0.9 ahead, the 0.5 tie too
    assert target_ranks(scores, torch.tensor([1])).tolist() == [0]
    flat = torch.zeros(1, 5)
    assert target_ranks(flat, torch.tensor([3])).tolist() == [4]  # all tied: last, not first


def test_metrics_hand_computed():
    ranks = np.array([0, 4, 9, 30])
    m = metrics_from_ranks(ranks, ks=(5, 10))
    assert m["recall@5"] == pytest.approx(2 / 4)
    assert m["recall@10"] == pytest.approx(3 / 4)
    assert m["ndcg@5"] == pytest.approx((1 + 1 / math.log2(6)) / 4)
    assert m["ndcg@10"] == pytest.approx((1 + 1 / math.log2(6) + 1 / math.log2(11)) / 4)
    assert m["mrr@10"] == pytest.approx((1 + 1 / 5 + 1 / 10) / 4)


def test_popularity_orders_by_count_and_never_ranks_padding():
    s = popularity_scores(np.array([100, 3, 7, 7, 0]))
    assert torch.isneginf(s[0])
    assert s.argsort(descending=True).tolist()[:4] == [2, 3, 1, 4]


def test_popularity_ranks_are_those_of_the_full_score_matrix():
    from mp4sr_train.data.types import Split, SplitData
    from mp4sr_train.loop import evaluate_popularity

    rng = np.random.default_rng(0)
    counts = rng.integers(0, 5, 41)  # many equal counts: the index breaks the ties
    counts[0] = 0
    targets = rng.integers(1, 41, 300)
    split = Split(np.zeros((300, 1), dtype=np.int64), targets)
    data = SplitData(item_ids=tuple(map(str, range(40))), user_ids=(), train=split, valid=split, test=split,
                     train_counts=counts)
    matrix = popularity_scores(counts)[None].expand(300, -1)
    expected = metrics_from_ranks(target_ranks(matrix, torch.as_tensor(targets)).numpy())
    assert evaluate_popularity(data, split) == expected
