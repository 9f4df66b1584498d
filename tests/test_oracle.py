"""benchmarks/oracle.py: the demo generator's own next-item probabilities."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from conftest import ROOT
from mp4sr_train.data import generate_demo, hold_out_items, load_or_preprocess

sys.path.insert(0, str(ROOT / "benchmarks"))
import oracle  # noqa: E402


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    data_dir = generate_demo(tmp_path_factory.mktemp("oracle") / "data", n_items=400, n_users=600, seed=3)
    data, _ = load_or_preprocess(data_dir, data_dir.parent / "cache")
    return oracle.World(data, data_dir), data


def test_probabilities_are_a_distribution_over_unseen_items(world):
    w, data = world
    p = w.scores(data.test.histories)
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-9)
    assert (p[:, 0] == 0).all()
    assert (np.take_along_axis(p, data.test.histories, axis=1)[data.test.histories != 0] == 0).all()
    held = hold_out_items(data, 0.1, 0)[1]
    np.testing.assert_allclose(w.scores(data.test.histories, held).sum(1), 1.0, atol=1e-9)


def test_a_companion_target_ranks_first_and_targets_are_likely(world):
    w, data = world
    kinds = oracle.target_kinds(w, data.test)
    ranks = oracle.oracle_ranks(w, data.test)  # (users, 2): items above the target, items tied with it
    assert 0.15 < (kinds == 0).mean() < 0.35  # the generator's 25% companion steps, less those already seen
    assert (ranks[kinds == 0].sum(1) == 0).mean() > 0.9  # a nearly exhausted topic can outweigh the companion
    # Ranked by the generator's probabilities, the targets sit far above chance.
    assert np.median(ranks.sum(1)) < 0.05 * data.num_items


def test_metrics_take_the_expectation_over_tied_items():
    from mp4sr_train.metrics import metrics_from_ranks

    # 2 items above the target, 3 tied with it: its rank is 2, 3, 4 or 5, each as likely.
    got = oracle.metrics(np.array([[2, 3], [0, 0], [7, 0]]))
    every_order = [metrics_from_ranks(np.array([r, 0, 7])) for r in (2, 3, 4, 5)]
    for key in ("recall@5", "ndcg@5", "recall@10", "ndcg@10", "ndcg@50"):
        assert got[key] == pytest.approx(np.mean([m[key] for m in every_order]))


def test_the_calibrated_oracle_cannot_tell_held_out_items_apart_by_popularity(world):
    w, data = world
    held = hold_out_items(data, 0.1, 0)[1]
    p = w.scores(data.test.histories[:50], held)
    for t in np.unique(w.topic[held]):
        same = held & (w.topic == t)
        unseen = ~np.isin(np.flatnonzero(same), data.test.histories[:50])
        # Apart from the companion link, every held-out item of a topic gets one probability.
        topic_part = p[:, same][:, unseen]
        if topic_part.size:
            assert np.ptp(np.median(topic_part, axis=0)) < 1e-12
