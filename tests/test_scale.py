"""The large-catalogue training path (train.softmax: encode only a step's items, sampled softmax
with log-Q) and block-wise evaluation, against the exact full-catalogue code they stand in for."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from mp4sr_train import config as config_lib
from mp4sr_train.data.types import Split
from mp4sr_train.loop import chunked_ranks, encode_items_chunked, evaluate, sample_split
from mp4sr_train.metrics import target_ranks
from mp4sr_train.model import M2SE, ItemFeatures, ItemIdEmbedding, candidates, item_vectors
from mp4sr_train.tasks import NegativeSample, finetune_loss, full_scores, pretrain_loss, sampled_finetune_loss

N, S, F = 50, 3, 12


@pytest.fixture()
def setup():
    torch.manual_seed(0)
    cfg = config_lib.preset("tiny")
    model = M2SE(cfg.model, F)
    g = torch.Generator().manual_seed(1)
    feats = ItemFeatures(torch.randn(N + 1, S, F, generator=g), torch.rand(N + 1, S, generator=g) > 0.2,
                         torch.randn(N + 1, 2, F, generator=g), torch.rand(N + 1, 2, generator=g) > 0.3)
    known = torch.ones(N + 1, dtype=torch.bool)
    known[-5:] = False  # items without a trained row: their rows come from the features
    id_emb = ItemIdEmbedding.create(cfg.train.ids, N, cfg.model.d, known, 2)
    ids = torch.randint(1, N + 1, (12, 6), generator=g)
    ids[3:, 4:] = 0  # right padding
    targets = torch.randint(1, N + 1, (12,), generator=g)
    targets[5] = targets[2]  # two histories with the same target
    return cfg, model, feats, id_emb, ids, targets


def grads(params) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.clone() for p in params]


def test_the_sampled_loss_is_the_full_one_when_the_sample_is_the_whole_catalogue_without_log_q(setup):
    cfg, model, feats, id_emb, ids, targets = setup
    model.eval()  # the same dropout masks on both paths: none
    train = dataclasses.replace(cfg.train, ids=dataclasses.replace(cfg.train.ids, dropout=0.0))
    sample = NegativeSample(np.ones(N + 1), N, "uniform", log_q=False)
    params = list(model.parameters()) + list(id_emb.parameters())
    full, _ = finetune_loss(model, id_emb, feats, ids, targets, train)
    full.backward()
    full_grads = grads(params)
    for p in params:
        p.grad = None
    sampled, _ = sampled_finetune_loss(model, id_emb, feats, ids, targets, train, sample,
                                       negatives=torch.arange(1, N + 1))
    sampled.backward()
    torch.testing.assert_close(sampled, full, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads(params), full_grads, strict=True):
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("distribution", ["uniform", "popularity"])
def test_gradients_reach_every_parameter_on_both_paths(setup, distribution):
    cfg, model, feats, id_emb, ids, targets = setup
    model.train()
    counts = np.bincount(targets.numpy(), minlength=N + 1) + 1
    sample = NegativeSample(counts, 16, distribution, log_q=True)
    g = torch.Generator().manual_seed(0)
    params = dict(model.named_parameters()) | {f"id.{k}": v for k, v in id_emb.named_parameters()}
    for path in ("full", "sampled"):
        for p in params.values():
            p.grad = None
        loss, _ = finetune_loss(model, id_emb, feats, ids, targets, cfg.train, g,
                                sample if path == "sampled" else None)
        loss.backward()
        missing = [name for name, p in params.items() if p.grad is None or not p.grad.abs().sum() > 0]
        assert not missing, (path, missing)
    for p in model.parameters():
        p.grad = None
    loss, _ = pretrain_loss(model, feats, ids, targets, cfg.train, g, sample)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_pretraining_on_the_steps_items_alone_is_the_same_loss(setup):
    cfg, model, feats, _, ids, targets = setup
    model.eval()
    train = dataclasses.replace(cfg.train, drop_max=0.0, use_mixup=False)
    sample = NegativeSample(np.ones(N + 1), 8, "uniform", log_q=True)
    full, _ = pretrain_loss(model, feats, ids, targets, train)
    touched, _ = pretrain_loss(model, feats, ids, targets, train, sample=sample)
    torch.testing.assert_close(touched, full, rtol=1e-6, atol=1e-6)


def test_log_q_corrects_by_the_probability_of_each_candidate():
    counts = np.array([0, 6, 2, 0, 2], np.float64)  # targets per item; item 3 never a target
    sample = NegativeSample(counts, 4, "popularity", log_q=True)
    items = torch.tensor([1, 2, 4])
    p = counts[1:][[0, 1, 3]] / 10
    drawn = 1 - (1 - p) ** 8 * (1 - p) ** 4  # among 8 targets or 4 shared negatives at least once
    torch.testing.assert_close(sample.correction(items, batch=8), torch.log(torch.tensor(drawn)).float())
    # A rare item: the probability is its expected count (the log-Q of Yi et al. 2019).
    rare = NegativeSample(np.array([0.0] + [1.0] * 100_000), 64, "uniform", log_q=True)
    expected = 512 * 1e-5 + 64 * 1e-5
    torch.testing.assert_close(rare.correction(torch.tensor([7]), batch=512),
                               torch.log(torch.tensor([expected])).float(), rtol=1e-2, atol=0)
    uniform = NegativeSample(counts, 4, "uniform", log_q=True)
    assert torch.all(uniform.draw(torch.Generator().manual_seed(0)) >= 1)
    assert sorted(set(NegativeSample(counts, 400, "popularity", True).draw().tolist())) == [1, 2, 4]


def test_block_wise_evaluation_gives_the_full_rankings(setup):
    cfg, model, feats, id_emb, ids, targets = setup
    model.eval()
    with torch.inference_mode():
        z = model.encode_items(feats)
        torch.testing.assert_close(encode_items_chunked(model, feats, 7), z)
        full = target_ranks(full_scores(model, feats, ids, id_emb, z), targets)
        inputs, outputs = item_vectors(z, id_emb)
        for chunk in (1, 7, N + 1):
            h = model.encode_history(ids, inputs)
            assert torch.equal(chunked_ranks(h, candidates(outputs), targets, chunk), full)
    split = Split(ids.numpy(), targets.numpy())
    assert evaluate(model, feats, split, 5, id_emb, chunk=8) == evaluate(model, feats, split, 5, id_emb)


def test_auto_switches_to_the_sampled_path_above_its_threshold():
    sm = config_lib.SoftmaxConfig()
    assert not sm.sampled(sm.auto_above) and sm.sampled(sm.auto_above + 1)
    assert config_lib.SoftmaxConfig(kind="sampled").sampled(10)
    assert not config_lib.SoftmaxConfig(kind="full").sampled(10**9)
    with pytest.raises(Exception, match="kind"):
        config_lib.replace(config_lib.preset("tiny"), {"train.softmax.kind": "approximate"})


def test_validation_on_a_seeded_sample_of_users():
    split = Split(np.arange(40).reshape(20, 2), np.arange(20))
    a, b = sample_split(split, 5, seed=3), sample_split(split, 5, seed=3)
    assert len(a) == 5 and np.array_equal(a.targets, b.targets) and np.all(np.diff(a.targets) > 0)
    assert not np.array_equal(a.targets, sample_split(split, 5, seed=4).targets)
    assert sample_split(split, 0, seed=3) is split and sample_split(split, 99, seed=3) is split
    assert np.array_equal(a.histories, split.histories[a.targets])
