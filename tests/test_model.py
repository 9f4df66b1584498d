"""Named invariants of M2SE and its training tasks, on a seeded tiny model."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from mp4sr_train import config as config_lib
from mp4sr_train.config import IdConfig, TrainConfig, preset
from mp4sr_train.model import (
    M2SE,
    ItemFeatures,
    ItemIdEmbedding,
    candidates,
    item_vectors,
    score,
    serving_table,
    untrained_vectors,
    user_vector,
)
from mp4sr_train.tasks import cmcl_loss, finetune_loss, nip_loss, pretrain_loss, random_drop

N, FEAT = 30, 12


@pytest.fixture
def model() -> M2SE:
    torch.manual_seed(0)
    return M2SE(preset("tiny").model, FEAT).eval()


@pytest.fixture
def feats() -> ItemFeatures:
    g = torch.Generator().manual_seed(1)
    text_mask = torch.rand(N + 1, 3, generator=g) > 0.3
    image_mask = torch.rand(N + 1, 2, generator=g) > 0.3
    text_mask[5] = False  # item 5 has no text, item 6 no image
    image_mask[6] = False
    return ItemFeatures(torch.randn(N + 1, 3, FEAT, generator=g), text_mask,
                        torch.randn(N + 1, 2, FEAT, generator=g), image_mask)


def histories() -> torch.Tensor:
    ids = torch.tensor([[3, 7, 9, 0, 0, 0, 0, 0], [1, 2, 3, 4, 5, 6, 7, 8], [12, 0, 0, 0, 0, 0, 0, 0]])
    return ids


@pytest.mark.parametrize("layers,heads", [(1, 1), (2, 2), (3, 4)])
def test_encode_last_is_encode_sequence(layers, heads):
    """The serving rewrite (last layer at the last position alone) computes the same function,
    whatever the depth and heads, for empty, short, full-width and padded histories."""
    torch.manual_seed(layers)
    cfg = dataclasses.replace(preset("tiny").model, n_layers=layers, n_heads=heads, d=16)
    model = M2SE(cfg, FEAT).eval()
    x = torch.randn(5, cfg.max_len, cfg.d)
    lengths = torch.tensor([0, 1, 3, cfg.max_len, cfg.max_len - 1])
    with torch.no_grad():
        torch.testing.assert_close(model.encode_last(x, lengths), model.encode_sequence(x, lengths),
                                   atol=1e-5, rtol=1e-5)


def test_causal_earlier_outputs_ignore_later_items(model, feats):
    z = model.encode_items(feats)
    a = histories()[1:2]
    b = a.clone()
    b[0, 5:] = torch.tensor([20, 21, 22])
    # Truncating to the first 5 items must give the same user vector whatever follows.
    h_a = model.encode_history(a[:, :5], z)
    h_b = model.encode_history(torch.cat([b[:, :5], torch.zeros(1, 3, dtype=torch.long)], 1), z)
    torch.testing.assert_close(h_a, h_b)


def test_padding_invariance(model, feats):
    z = model.encode_items(feats)
    ids = histories()
    short = model.encode_history(ids[:1, :3], z)
    long = model.encode_history(ids[:1], z)
    torch.testing.assert_close(short, long)


def test_batch_permutation(model, feats):
    z = model.encode_items(feats)
    ids = histories()
    perm = torch.tensor([2, 0, 1])
    torch.testing.assert_close(model.encode_history(ids, z)[:, perm], model.encode_history(ids[perm], z))


def test_alone_equals_in_batch(model, feats):
    z = model.encode_items(feats)
    ids = histories()
    together = model.encode_history(ids, z)
    for i in range(len(ids)):
        torch.testing.assert_close(model.encode_history(ids[i : i + 1], z)[:, 0], together[:, i])


def test_pad_item_never_recommended(model, feats):
    z = model.encode_items(feats)
    s = score(model.encode_history(histories(), z), candidates(z))
    assert torch.isneginf(s[:, 0]).all()
    assert (s.topk(N, dim=1).indices != 0).all()


def test_missing_modality_uses_learned_vector(model, feats):
    pooled = model.pool_items(feats, 0)
    torch.testing.assert_close(pooled[5], model.missing[0])
    assert torch.isfinite(model.encode_items(feats)).all()


@pytest.mark.parametrize("untied", [False, True])
def test_serving_identity(model, feats, untied):
    known = torch.zeros(N + 1, dtype=torch.bool)
    known[1:20] = True
    id_emb = ItemIdEmbedding(N, model.cfg.d, known, candidate_rows="untied" if untied else "tied")
    z = model.encode_items(feats)
    inputs, outputs = item_vectors(z, id_emb)
    h = model.encode_history(histories(), inputs)
    direct = score(h, candidates(outputs))
    served = user_vector(h) @ serving_table(outputs).T
    torch.testing.assert_close(direct[:, 1:], served[:, 1:], atol=1e-5, rtol=1e-5)
    # Unknown (cold) items are scored from features only.
    torch.testing.assert_close(inputs[:, 25], model.encode_items(feats)[:, 25])
    torch.testing.assert_close(outputs[:, 25], model.encode_items(feats)[:, 25])
    # Trained items: one row per side when untied, the same row otherwise.
    assert torch.equal(inputs[:, 1:20], outputs[:, 1:20]) != untied


def _grad_names(module: torch.nn.Module) -> set[str]:
    return {n for n, p in module.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0}


def test_every_parameter_gets_a_gradient_in_pretraining(feats):
    torch.manual_seed(0)
    model = M2SE(preset("tiny").model, FEAT).train()
    cfg = TrainConfig()
    ids, targets = histories(), torch.tensor([4, 9, 13])
    loss, _ = pretrain_loss(model, feats, ids, targets, cfg, torch.Generator().manual_seed(0))
    loss.backward()
    assert _grad_names(model) == set(), "parameters without gradient (attention pooling included)"


def test_every_parameter_gets_a_gradient_in_finetuning(feats):
    torch.manual_seed(0)
    model = M2SE(preset("tiny").model, FEAT).train()
    id_emb = ItemIdEmbedding(N, model.cfg.d, torch.ones(N + 1, dtype=torch.bool))
    loss, _ = finetune_loss(model, id_emb, feats, histories(), torch.tensor([4, 9, 13]), TrainConfig())
    loss.backward()
    assert _grad_names(model) == set()
    assert id_emb.weight.grad.abs().sum() > 0


def test_residual_candidate_rows_start_tied(model, feats):
    known = torch.ones(N + 1, dtype=torch.bool)
    id_emb = ItemIdEmbedding(N, model.cfg.d, known, from_features=True, modalities=2, candidate_rows="residual")
    z = model.encode_items(feats)
    inputs, outputs = item_vectors(z, id_emb, torch.arange(N + 1) % 3 == 0)  # trained and dropped rows
    assert torch.equal(inputs, outputs)


def test_every_parameter_gets_a_gradient_in_finetuning_with_untied_id_rows(feats):
    torch.manual_seed(0)
    model = M2SE(preset("tiny").model, FEAT).train()
    known = torch.ones(N + 1, dtype=torch.bool)
    id_emb = ItemIdEmbedding(N, model.cfg.d, known, from_features=True, modalities=2, candidate_rows="untied")
    cfg = TrainConfig(ids=IdConfig(candidate_rows="untied", dropout=0.5))
    loss, _ = finetune_loss(model, id_emb, feats, histories(), torch.tensor([4, 9, 13]), cfg,
                            torch.Generator().manual_seed(0))
    loss.backward()
    assert _grad_names(model) == set() and _grad_names(id_emb) == set()


def test_id_rows_from_features_fill_untrained_and_dropped_items(model, feats):
    known = torch.zeros(N + 1, dtype=torch.bool)
    known[1:20] = True
    torch.manual_seed(0)
    id_emb = ItemIdEmbedding(N, model.cfg.d, known, from_features=True, modalities=2)
    z = model.encode_items(feats)
    with torch.no_grad():
        rows, predicted = id_emb(z), id_emb.from_features(z)
        drop = torch.zeros(N + 1, dtype=torch.bool)
        drop[3] = True
        dropped = id_emb(z, drop)
    assert (rows[0] == 0).all()  # padding
    torch.testing.assert_close(rows[1:20], id_emb.weight[1:20].detach())
    torch.testing.assert_close(rows[20:], predicted[20:])
    assert predicted[20:].abs().sum() > 0
    # A dropped item is scored as an untrained one; the others keep their trained rows.
    torch.testing.assert_close(dropped[3], predicted[3])
    torch.testing.assert_close(dropped[4:], rows[4:])
    # New items (the export's item tower) get exactly what untrained catalogue items get.
    new_inputs, new_outputs = untrained_vectors(z, id_emb)
    torch.testing.assert_close(new_inputs[:, 20:], (z + rows)[:, 20:])
    assert new_outputs is new_inputs
    plain = ItemIdEmbedding(N, model.cfg.d, known)
    assert (plain(z)[20:] == 0).all() and untrained_vectors(z, plain) == (z, z)


@pytest.mark.parametrize("rows_kind", ["untied", "residual"])
def test_untied_id_rows_predict_each_side_for_untrained_and_dropped_items(model, feats, rows_kind):
    known = torch.zeros(N + 1, dtype=torch.bool)
    known[1:20] = True
    torch.manual_seed(0)
    id_emb = ItemIdEmbedding(N, model.cfg.d, known, from_features=True, modalities=2, candidate_rows=rows_kind)
    z = model.encode_items(feats)
    drop = torch.zeros(N + 1, dtype=torch.bool)
    drop[3] = True
    with torch.no_grad():
        inputs, outputs = item_vectors(z, id_emb, drop)
        new_inputs, new_outputs = untrained_vectors(z, id_emb)
    if rows_kind == "residual":  # it starts tied: give the differences a value
        with torch.no_grad():
            for p in (id_emb.out_weight, id_emb.project_out.weight, id_emb.project_out.bias):
                p.normal_()
            inputs, outputs = item_vectors(z, id_emb, drop)
            new_inputs, new_outputs = untrained_vectors(z, id_emb)
    out_rows = id_emb.out_weight + (id_emb.weight if rows_kind == "residual" else 0)
    torch.testing.assert_close(outputs[:, 1:3], z[:, 1:3] + out_rows[1:3])  # trained: the candidate rows
    torch.testing.assert_close(inputs[:, 1:3], z[:, 1:3] + id_emb.weight[1:3])  # ... and the input rows
    for got, want in ((inputs, new_inputs), (outputs, new_outputs)):  # dropped and untrained: predicted rows
        torch.testing.assert_close(got[:, 3], want[:, 3])
        torch.testing.assert_close(got[:, 20:], want[:, 20:])
    assert (new_outputs - new_inputs)[:, 20:].abs().sum() > 0  # each side has its own projection
    # Rows of some items only (the sampled path) are those of the whole catalogue.
    index = torch.tensor([0, 2, 3, 25])
    part = item_vectors(z[:, index], id_emb, drop, index=index)
    for got, whole in zip(part, (inputs, outputs), strict=True):
        torch.testing.assert_close(got, whole[:, index])


def test_id_dropout_trains_the_feature_projection(feats):
    torch.manual_seed(0)
    model = M2SE(preset("tiny").model, FEAT).train()
    id_emb = ItemIdEmbedding(N, model.cfg.d, torch.ones(N + 1, dtype=torch.bool), from_features=True)
    cfg = TrainConfig(ids=IdConfig(dropout=0.5, from_features=True))
    loss, _ = finetune_loss(model, id_emb, feats, histories(), torch.tensor([4, 9, 13]), cfg,
                            torch.Generator().manual_seed(0))
    loss.backward()
    assert _grad_names(model) == set() and _grad_names(id_emb) == set()
    # Without dropout every item here has a trained row: the projection is unused.
    id_emb.zero_grad(set_to_none=True)
    no_dropout = TrainConfig(ids=IdConfig(dropout=0.0, from_features=True))
    finetune_loss(model, id_emb, feats, histories(), torch.tensor([4, 9, 13]), no_dropout)[0].backward()
    grad = id_emb.project.weight.grad
    assert grad is None or not grad.any()


def test_reference_quirks_freeze_pooling(feats):
    model = M2SE(preset("tiny").model, FEAT).train()
    cfg = TrainConfig(reference_quirks=True)
    loss, _ = pretrain_loss(model, feats, histories(), torch.tensor([4, 9, 13]), cfg)
    loss.backward()
    assert all(p.grad is None for p in model.pool.parameters())


def test_nip_matches_hand_computation():
    h = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), dim=-1)
    e = F.normalize(torch.tensor([[1.0, 0.2], [0.3, 1.0], [0.5, 0.5]]), dim=-1)
    targets = torch.tensor([4, 7, 4])  # rows 0 and 2 share a target: not each other's negatives
    tau = 0.5
    logits = h @ e.T / tau
    expected = []
    for i, allowed in enumerate([[0, 1], [0, 1, 2], [1, 2]]):
        expected.append(-(logits[i, i] - torch.logsumexp(logits[i, allowed], 0)))
    torch.testing.assert_close(nip_loss(h, e, targets, tau), torch.stack(expected).mean())
    # Reference quirk: the excluded logit becomes 0 and still counts in the denominator.
    quirk = []
    for i, j_excl in enumerate([2, None, 0]):
        row = logits[i].clone()
        if j_excl is not None:
            row[j_excl] = 0.0
        quirk.append(-(row[i] - torch.logsumexp(row, 0)))
    torch.testing.assert_close(nip_loss(h, e, targets, tau, quirks=True), torch.stack(quirk).mean())


def test_cmcl_matches_hand_computation():
    g = torch.Generator().manual_seed(0)
    ht = F.normalize(torch.randn(3, 4, generator=g), dim=-1)
    hi = F.normalize(torch.randn(3, 4, generator=g), dim=-1)
    targets = torch.tensor([1, 2, 3])  # all distinct: plain NT-Xent
    tau = 0.2
    reps = torch.cat([ht, hi])
    sim = reps @ reps.T / tau
    losses = []
    for i in range(6):
        pos = (i + 3) % 6
        others = [j for j in range(6) if j != i]
        losses.append(-(sim[i, pos] - torch.logsumexp(sim[i, others], 0)))
    torch.testing.assert_close(cmcl_loss(ht, hi, targets, tau), torch.stack(losses).mean())


def test_random_drop_keeps_first_and_compacts():
    ids = torch.tensor([[5, 6, 7, 8, 0, 0]])
    dropped = random_drop(ids, 1.0)  # drop everything droppable
    assert dropped.tolist() == [[5, 0, 0, 0, 0, 0]]
    assert random_drop(ids, 0.0).tolist() == ids.tolist()
    g = torch.Generator().manual_seed(3)
    out = random_drop(ids.repeat(50, 1), 0.5, g)
    for row in out.tolist():
        real = [x for x in row if x]
        assert real[0] == 5 and real == sorted(real)  # order kept
        assert row[len(real):] == [0] * (6 - len(real))  # compacted left


def test_a_modality_no_item_has_leaves_the_model(feats):
    """Text-only catalogue: the model is text-only (no image tower, no mixup or CMCL against the
    constant missing vector), unless train.skip_absent_modalities is off."""
    from mp4sr_train.config import present_modalities

    text_only = dataclasses.replace(feats, image_mask=torch.zeros_like(feats.image_mask))
    assert text_only.present() == ("text",) and feats.present() == ("text", "image")
    cfg, dropped = present_modalities(preset("tiny"), text_only.present())
    assert cfg.model.modalities == ("text",) and dropped == ("image",)
    assert present_modalities(preset("tiny"), feats.present()) == (preset("tiny"), ())
    kept = config_lib.replace(preset("tiny"), {"train.skip_absent_modalities": False})
    assert present_modalities(kept, text_only.present()) == (kept, ())
    torch.manual_seed(0)
    ids, targets = histories(), torch.tensor([4, 9, 13])
    _, parts = pretrain_loss(M2SE(cfg.model, FEAT).train(), text_only, ids, targets, cfg.train,
                             torch.Generator().manual_seed(0))
    assert set(parts) == {"nip_text"}
    _, parts = pretrain_loss(M2SE(kept.model, FEAT).train(), text_only, ids, targets, kept.train,
                             torch.Generator().manual_seed(0))
    assert set(parts) == {"nip_text", "nip_image", "cmcl"}

def test_popularity_smoothing_moves_that_share_of_the_target_mass_onto_the_prior(model, feats):
    """finetune_loss with `train.popularity_smoothing` e and a prior q: (1 - e) CE(target) + e CE(q);
    0 (the default) is the plain cross-entropy, whatever the prior."""
    from mp4sr_train.tasks import full_scores

    n = len(feats) - 1
    known = torch.ones(n + 1, dtype=torch.bool)
    known[0] = False
    id_emb = ItemIdEmbedding(n, model.cfg.d, known)
    ids = torch.tensor([[1, 2, 3], [4, 5, 0]])
    targets = torch.tensor([6, 7])
    prior = torch.rand(n + 1)
    prior[0] = 0.0
    prior = prior / prior.sum()
    model.eval()
    no_drop = IdConfig(dropout=0.0)  # no random ID dropout: the same logits in every call
    plain, _ = finetune_loss(model, id_emb, feats, ids, targets, TrainConfig(ids=no_drop), prior=prior)
    e = 0.3
    smoothed, _ = finetune_loss(model, id_emb, feats, ids, targets, TrainConfig(ids=no_drop, popularity_smoothing=e),
                                prior=prior)
    with torch.no_grad():
        log_p = torch.log_softmax(full_scores(model, feats, ids, id_emb) / TrainConfig().tau, dim=-1)
    ce = -log_p[torch.arange(2), targets].mean()
    torch.testing.assert_close(plain, ce)
    torch.testing.assert_close(smoothed, (1 - e) * ce - e * (log_p[:, 1:] * prior[1:]).sum(-1).mean())
