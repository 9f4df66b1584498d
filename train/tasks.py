"""Pre-training and fine-tuning: the losses that wrap M2SE (SPEC sections 3 and 4)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from mp4sr_train.config import TrainConfig
from mp4sr_train.distributed import gather
from mp4sr_train.model import M2SE, ItemFeatures, ItemIdEmbedding, candidates, item_vectors, score
from torch import Tensor


def random_drop(ids: Tensor, ratio: float, generator: torch.Generator | None = None) -> Tensor:
    """Drop each history position with probability `ratio` (never the first), compact left."""
    b, length = ids.shape
    pos = torch.arange(length, device=ids.device)
    rand = torch.rand(b, length, device=ids.device, generator=generator)
    keep = (ids != 0) & ((rand >= ratio) | (pos == 0))
    # Stable compaction: kept positions first in their original order, then the dropped ones.
    order = torch.argsort((~keep).long() * length + pos, dim=1)
    return torch.where(keep.gather(1, order), ids.gather(1, order), torch.zeros_like(ids))


def same_target_mask(targets: Tensor) -> Tensor:
    """(B, B) True where two different sequences share a target: they are not negatives."""
    same = targets[:, None] == targets[None, :]
    return same & ~torch.eye(len(targets), dtype=torch.bool, device=targets.device)


def _exclude(logits: Tensor, mask: Tensor, quirks: bool) -> Tensor:
    # The reference sets such logits to 0, which still counts exp(0) in the denominator.
    return logits.masked_fill(mask, 0.0 if quirks else float("-inf"))


def _not_negatives(row_targets: Tensor, col_targets: Tensor, row_seq: Tensor, col_seq: Tensor) -> Tensor:
    """(R, C) True where row and column are different sequences with the same target."""
    return (row_targets[:, None] == col_targets[None, :]) & (row_seq[:, None] != col_seq[None, :])


def nip_loss(h: Tensor, e: Tensor, targets: Tensor, tau: float, quirks: bool = False) -> Tensor:
    """In-batch InfoNCE between normalised user vectors h (B, d) and target vectors e (B, d);
    under torchrun the columns are the whole batch's, across ranks (distributed.gather)."""
    e_all, offset = gather(e)
    t_all, _ = gather(targets)
    rows = torch.arange(len(h), device=h.device) + offset
    columns = torch.arange(len(e_all), device=h.device)
    logits = _exclude(h @ e_all.T / tau, _not_negatives(targets, t_all, rows, columns), quirks)
    return F.cross_entropy(logits, rows)


def cmcl_loss(h_text: Tensor, h_image: Tensor, targets: Tensor, tau: float, quirks: bool = False) -> Tensor:
    """NT-Xent: positive (h_text[i], h_image[i]); negatives the other 2B - 2 vectors, except
    those of sequences sharing the target. Averaged over both directions. Under torchrun the
    columns are the whole batch's, across ranks."""
    b, dev = len(h_text), h_text.device
    text_all, offset = gather(h_text)
    image_all, _ = gather(h_image)
    t_all, _ = gather(targets)
    n = len(text_all)
    reps = torch.cat([h_text, h_image])  # (2b, d): this rank's rows
    logits = reps @ torch.cat([text_all, image_all]).T / tau  # (2b, 2n)
    local = torch.arange(b, device=dev) + offset
    row_seq, col_seq = local.repeat(2), torch.arange(n, device=dev).repeat(2)
    self_column = torch.cat([local, local + n])
    own = torch.zeros_like(logits, dtype=torch.bool)
    own[torch.arange(2 * b, device=dev), self_column] = True
    logits = logits.masked_fill(own, float("-inf"))  # a vector is never its own negative
    logits = _exclude(logits, _not_negatives(targets.repeat(2), t_all.repeat(2), row_seq, col_seq), quirks)
    positives = torch.cat([local + n, local])
    return F.cross_entropy(logits, positives)


def touched_items(*tensors: Tensor, extra: Tensor | None = None) -> tuple[Tensor, list[Tensor]]:
    """The sorted distinct items (padding 0 first) of `tensors` and `extra`, and each tensor
    rewritten as positions among them (padding stays 0): what a large-catalogue step encodes."""
    parts = [t.flatten() for t in tensors] + ([extra] if extra is not None else [])
    zero = torch.zeros(1, dtype=parts[0].dtype, device=parts[0].device)
    touched = torch.unique(torch.cat([zero, *parts]))
    return touched, [torch.searchsorted(touched, t) for t in tensors]


class NegativeSample:
    """Shared negatives for fine-tuning's sampled softmax, and the log-Q correction: the log of
    the probability that item j is among a step's (distinct) candidates,
    1 - (1 - p_target(j))^B (1 - q(j))^S, where the B targets of the batch act as in-batch
    negatives for the other histories and the S shared negatives are drawn from q (uniform over
    the catalogue, or proportional to training-target counts). For rare items that is their
    expected count B p_target(j) + S q(j) (Yi et al. 2019); for items certain to be drawn it is 1,
    where the expected count would penalise them for being drawn more than once, which a
    candidate list without repeats never does. Mixed negatives as in Yang et al. 2020."""

    def __init__(self, target_counts: np.ndarray, negatives: int, distribution: str, log_q: bool,
                 device: torch.device | str = "cpu"):
        counts = torch.as_tensor(np.asarray(target_counts, np.float64), device=device)  # (N + 1,)
        counts[0] = 0.0
        q = counts.clone() if distribution == "popularity" else torch.ones_like(counts)
        q[0] = 0.0
        self.q = q / q.sum()
        self.p_target = counts / counts.sum().clamp(min=1.0)
        self.negatives, self.log_q = negatives, log_q

    def draw(self, generator: torch.Generator | None = None) -> Tensor:
        return torch.multinomial(self.q.float(), self.negatives, replacement=True, generator=generator)

    def correction(self, items: Tensor, batch: int) -> Tensor:
        """log P(item among the candidates) of the candidate items (C,); zeros without log-Q."""
        if not self.log_q:
            return torch.zeros(len(items), device=items.device)
        # log P(not drawn), in float64: p small, B and S large
        missed = batch * torch.log1p(-self.p_target[items]) + self.negatives * torch.log1p(-self.q[items])
        return torch.log(-torch.expm1(missed).clamp(max=-1e-30)).float()


def pretrain_loss(
    model: M2SE, feats: ItemFeatures, ids: Tensor, targets: Tensor, cfg: TrainConfig,
    generator: torch.Generator | None = None, sample: NegativeSample | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Item drop, complementary sequence mixup, NIP per modality and CMCL (SPEC section 3).
    With `sample` (a large catalogue) only the step's items are encoded; the losses, all
    in-batch, are the same.

    A single-modality model (an ablation, or a catalogue with one modality: config's
    `present_modalities`) has no other modality to mix in or contrast with: NIP only."""
    dev = ids.device
    draw = lambda: float(torch.rand((), device=dev, generator=generator))  # noqa: E731
    if cfg.drop_max > 0:
        ids = random_drop(ids, draw() * cfg.drop_max, generator)
    names = model.cfg.modalities
    rows = targets  # where the target vectors sit in z; the losses' masks compare item ids
    if sample is not None:  # encode only the step's items; ids and rows become positions among them
        touched, (ids, rows) = touched_items(ids, targets)
        z = model.encode_items(feats.take(touched), detach_pool=cfg.reference_quirks)
    else:
        z = model.encode_items(feats, detach_pool=cfg.reference_quirks)  # (M, N + 1, d)
    both = len(z) == 2
    seq = z[:, ids]  # (M, B, L, d)
    if cfg.use_mixup and both:
        p = draw() * cfg.mixup_max
        m = (torch.rand(ids.shape, device=dev, generator=generator) < p) & (ids != 0)
        m = m[None, ..., None].float()  # (1, B, L, 1)
        seq = m * seq.flip(0) + (1 - m) * seq  # the same positions swapped both ways
    lengths = (ids != 0).sum(-1)
    h = model.encode_sequence(seq.flatten(0, 1), lengths.repeat(len(z))).view(len(z), len(ids), -1)
    h = F.normalize(h, dim=-1)
    e = F.normalize(z[:, rows], dim=-1)  # (M, B, d)
    q = cfg.reference_quirks
    parts = {}
    loss = torch.zeros((), device=dev)
    if cfg.use_nip:
        for m_idx, name in enumerate(names):
            parts[f"nip_{name}"] = nip_loss(h[m_idx], e[m_idx], targets, cfg.tau, q)
            loss = loss + parts[f"nip_{name}"]
    if cfg.cmcl_weight > 0 and both:
        parts["cmcl"] = cmcl_loss(h[0], h[1], targets, cfg.tau, q)
        loss = loss + cfg.cmcl_weight * parts["cmcl"]
    return loss, {k: float(v.detach()) for k, v in parts.items()}


def full_scores(
    model: M2SE, feats: ItemFeatures, ids: Tensor, id_emb: ItemIdEmbedding | None = None,
    z: Tensor | None = None, drop: Tensor | None = None,
) -> Tensor:
    """Scores of every item for each history (B, N + 1); pass `z` to reuse item vectors, `drop`
    (N + 1,) bool to score the marked items as if they had no ID row."""
    if z is None:
        z = model.encode_items(feats)
    inputs, outputs = item_vectors(z, id_emb, drop)
    return score(model.encode_history(ids, inputs), candidates(outputs))


def finetune_loss(
    model: M2SE, id_emb: ItemIdEmbedding, feats: ItemFeatures, ids: Tensor, targets: Tensor,
    cfg: TrainConfig, generator: torch.Generator | None = None, sample: NegativeSample | None = None,
    prior: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Cross-entropy of score / tau over the full catalogue (padding column excluded); with
    `prior` (N + 1,) a distribution over items, `cfg.popularity_smoothing` of the target mass on it.

    With `cfg.ids.dropout` > 0, a fresh random share of the items loses its ID row for this step,
    in the histories and among the candidates alike (DropoutNet, Volkovs et al. 2017): the model
    must rank items by their features too, as it must for items added after training.
    With `sample` (a large catalogue): sampled_finetune_loss."""
    if sample is not None:
        return sampled_finetune_loss(model, id_emb, feats, ids, targets, cfg, sample, generator)
    z = model.encode_items(feats, detach_pool=cfg.reference_quirks)
    drop = None
    if cfg.ids.dropout > 0:
        drop = torch.rand(z.shape[1], device=z.device, generator=generator) < cfg.ids.dropout
    logits = full_scores(model, feats, ids, id_emb, z, drop) / cfg.tau
    loss = F.cross_entropy(logits, targets)
    parts = {"ce": float(loss.detach())}
    if prior is not None and cfg.popularity_smoothing > 0:
        log_p = F.log_softmax(logits, dim=-1)[:, 1:]
        smooth = -(log_p * prior[1:]).sum(-1).mean()
        loss = (1 - cfg.popularity_smoothing) * loss + cfg.popularity_smoothing * smooth
    return loss, parts


def sampled_finetune_loss(
    model: M2SE, id_emb: ItemIdEmbedding, feats: ItemFeatures, ids: Tensor, targets: Tensor,
    cfg: TrainConfig, sample: NegativeSample, generator: torch.Generator | None = None,
    negatives: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """finetune_loss over a sample of the catalogue: candidates are the distinct items among the
    batch's targets and the shared negatives (`negatives`, else drawn from `sample`), so a
    history's positive is one column and other histories with the same target are never its
    negatives; logits are corrected by `sample.correction` (log-Q). Only the items of the step
    (histories, targets, negatives) are encoded. With the whole catalogue as `negatives` and no
    log-Q it is finetune_loss, term for term."""
    negatives = sample.draw(generator) if negatives is None else negatives  # the same on every rank
    all_targets, _ = gather(targets)  # under torchrun: the whole batch's targets are its in-batch negatives
    n = id_emb.weight.shape[0]
    drop = None
    if cfg.ids.dropout > 0:  # drawn over the whole catalogue, as finetune_loss draws it
        drop = torch.rand(n, device=ids.device, generator=generator) < cfg.ids.dropout
    touched, (local_ids,) = touched_items(ids, extra=torch.cat([all_targets, negatives]))
    z = model.encode_items(feats.take(touched), detach_pool=cfg.reference_quirks)  # (M, U, d)
    inputs, outputs = item_vectors(z, id_emb, drop, index=touched)
    h = model.encode_history(local_ids, inputs)
    columns = torch.unique(torch.cat([all_targets, negatives]))  # candidate items, sorted
    cands = candidates(outputs)[:, torch.searchsorted(touched, columns)]  # (M, C, d)
    logits = torch.einsum("mbd,mcd->bc", F.normalize(h, dim=-1), cands) / cfg.tau
    logits = logits - sample.correction(columns, len(all_targets))
    loss = F.cross_entropy(logits, torch.searchsorted(columns, targets))
    return loss, {"ce": float(loss.detach())}
