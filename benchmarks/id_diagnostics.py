"""Where the trained MP4SR's scores come from: the feature part z against the ID part of the item
vectors, and how items without a trained ID row (cold-start items) fare against trained ones.

    python benchmarks/id_diagnostics.py mp4sr-bench/demo --models mp4sr,ids-paper --seed 0

Reads finished `mp4sr-rt benchmark` runs (those with a metrics.json; the demo data, or --data and
--features as the benchmark had them) and prints one JSON line per setting and model:
    z_norm, id_norm          mean row norm of the feature part z (both modalities) and of the ID
                             rows of trained items (scale included)
    predicted_id_norm        mean norm of the rows predicted from features for untrained items
    feature_only             Recall@20 and NDCG@10 with every item scored without its ID row (the
                             rows predicted from features for all): what the features alone carry
                             about items training saw, to set beside benchmarks/oracle.py's
                             "topics only" (what a feature that shows only an item's topic is worth)
    cold_share_top20         cold-start setting: share of the held-out items among the top 20 of
                             the cold test users (they are ~10% of the catalogue and every target)
    target_rank_median       cold-start setting: median rank of the (held-out) target
    new_only                 cold-start setting: Recall@20 and NDCG@20 ranking each cold test user's
                             target among the held-out items alone: how well the features rank new
                             items, whatever the model's bias for or against items without an ID row
    offsets                  with --offsets: the cold-start model tested on every user with a constant
                             added to each new item's score: NDCG@20 of the cold test users, of the
                             others and of all, and the new items' share of the top 20 (the price of
                             a bias for new items, measured)
    neighbours               with --neighbours: the same figures when each new item's ID row is not the
                             one the model predicts from its features but the mean of the trained rows
                             of its K nearest trained items (cosine of the item vectors z; plain mean,
                             and weighted by training counts): another way to place new items, whose
                             trade-off between the cold test users and the others it measures
    ridge                    with --ridge: how much of the trained items' ID rows their item vectors z
                             predict (ridge regression z -> ID row, 5-fold cross-validated over the
                             trained items: `explained`, the share of the rows' variance predicted on
                             held-out items), and offset_sweep's figures when each new item's ID row is
                             the regression's prediction (at the penalty cross-validation chose) rather
                             than the jointly trained projection's
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from mp4sr_train import config as config_lib
from mp4sr_train.benchmark import BenchmarkOptions, load_finished, load_inputs
from mp4sr_train.metrics import metrics_from_ranks, target_ranks
from mp4sr_train.model import candidates, score
from mp4sr_train.tasks import full_scores


@torch.inference_mode()
def diagnose(out: Path, setting: str, name: str, seed: int, inputs, options: BenchmarkOptions,
             offsets: tuple[float, ...] = (), neighbours: tuple[int, ...] = (), ridge: bool = False) -> dict:
    model, id_emb, sd = load_finished(name, setting, seed, inputs, options)
    z = model.encode_items(inputs.feats)
    rows = id_emb(z)
    trained = id_emb.known
    untrained = ~trained
    untrained[0] = False
    result = {"setting": setting, "model": name, "seed": seed,
              "z_norm": float(z[:, 1:].norm(dim=-1).mean()),
              "id_norm": float(rows[trained].norm(dim=-1).mean()),
              "predicted_id_norm": float(rows[untrained].norm(dim=-1).mean()) if untrained.any() else None}
    if setting == "normal":
        every = torch.ones(len(id_emb.known), dtype=torch.bool)
        scores = all_scores(model, inputs.feats, sd.test, id_emb, z, drop=every)
        found = metrics_from_ranks(target_ranks(scores, torch.as_tensor(sd.test.targets)).numpy())
        result["feature_only"] = {k: found[k] for k in ("recall@20", "ndcg@10")}
    if setting == "cold-start":
        scores = all_scores(model, inputs.feats, sd.test, id_emb, z)
        targets = torch.as_tensor(sd.test.targets)
        top = scores.topk(20, dim=-1).indices
        result["cold_share_top20"] = float(untrained[top].float().mean())
        result["target_rank_median"] = float(np.median(target_ranks(scores, targets).numpy()))
        only_new = scores.masked_fill(~untrained, float("-inf"))
        new = metrics_from_ranks(target_ranks(only_new, targets).numpy())
        result["new_only"] = {k: new[k] for k in ("recall@20", "ndcg@20")}
        if offsets:
            result["offsets"] = offset_sweep(model, inputs.feats, sd.test_all, id_emb, z, untrained, offsets)
        if neighbours:
            counts = torch.as_tensor(sd.data.train_counts, dtype=torch.float32)
            result["neighbours"] = neighbour_sweep(model, sd.test_all, z, rows, trained, untrained, counts, neighbours)
        if ridge:
            result["ridge"] = ridge_sweep(model, sd.test_all, z, rows, trained, untrained)
    return result


def neighbour_sweep(model, split, z, rows, trained, untrained, counts, ks) -> list[dict]:
    """offset_sweep's figures when each new item's ID row (both sides: a tied model) is the mean of
    the trained rows of its k nearest trained items by cosine of z, plain or weighted by counts."""
    known = trained.clone()
    known[0] = False
    flat = F.normalize(z.permute(1, 0, 2).flatten(1), dim=-1)  # (N + 1, M d)
    similar = flat[untrained] @ flat[known].T
    out = []
    for k in ks:
        nearest = similar.topk(min(k, int(known.sum())), dim=1).indices
        for weighted in (False, True):
            w = counts[known][nearest] if weighted else torch.ones(nearest.shape)
            new_rows = ((w / w.sum(1, keepdim=True))[..., None] * rows[known][nearest]).sum(1)
            out.append({"k": k, "weighted": weighted, **imputed_placement(model, split, z, rows, untrained, new_rows)})
    return out


def ridge_sweep(model, split, z, rows, trained, untrained, penalties=(0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0),
                folds: int = 5) -> dict:
    """How far the item vectors z predict the trained ID rows (ridge regression, `folds`-fold
    cross-validation over the trained items), and the placement of new items given the
    regression's rows at the penalty with the least held-out error."""
    known = trained.clone()
    known[0] = False
    x_all = z.permute(1, 0, 2).flatten(1).double()  # (N + 1, M d)
    x, y = x_all[known], rows[known].double()
    total = float(((y - y.mean(0)) ** 2).sum())

    def fit(xa, ya, penalty):
        xm, ym = xa.mean(0), ya.mean(0)
        a = xa - xm
        w = torch.linalg.solve(a.T @ a + penalty * torch.eye(a.shape[1], dtype=a.dtype), a.T @ (ya - ym))
        return lambda xb: (xb - xm) @ w + ym

    parts = torch.randperm(len(x), generator=torch.Generator().manual_seed(0)).chunk(folds)
    errors = {}
    for penalty in penalties:
        error = 0.0
        for part in parts:
            train = torch.ones(len(x), dtype=torch.bool)
            train[part] = False
            error += float(((fit(x[train], y[train], penalty)(x[part]) - y[part]) ** 2).sum())
        errors[penalty] = error
    best = min(errors, key=errors.get)
    new_rows = fit(x, y, best)(x_all[untrained]).float()
    return {"penalty": best, "explained": round(1 - errors[best] / total, 4),
            **imputed_placement(model, split, z, rows, untrained, new_rows)}


def imputed_placement(model, split, z, rows, untrained, new_rows) -> dict[str, float]:
    """placement() of every user of `split` when the new items' ID rows are `new_rows` (a tied model)."""
    imputed = rows.clone()
    imputed[untrained] = new_rows
    inputs = z + imputed
    scores = torch.cat([score(model.encode_history(torch.as_tensor(split.histories[i : i + 500]), inputs),
                              candidates(inputs)) for i in range(0, len(split), 500)])
    targets = torch.as_tensor(split.targets)
    return placement(scores, targets, untrained, untrained[targets].numpy())


def all_scores(model, feats, split, id_emb, z, batch: int = 500, drop: torch.Tensor | None = None) -> torch.Tensor:
    """Scores of every item for every history of `split` (padding column -inf); `drop` as full_scores."""
    parts = [full_scores(model, feats, torch.as_tensor(split.histories[i : i + batch]), id_emb, z, drop)
             for i in range(0, len(split), batch)]
    scores = torch.cat(parts)
    scores[:, 0] = float("-inf")
    return scores


def offset_sweep(model, feats, split, id_emb, z, untrained, offsets) -> list[dict]:
    """NDCG@20 of the cold test users (new-item targets), of the others and of all users, and the
    new items' share of the top 20, when `offset` is added to every new item's (cosine) score."""
    scores = all_scores(model, feats, split, id_emb, z)
    targets = torch.as_tensor(split.targets)
    cold = untrained[targets].numpy()
    rows = []
    for offset in offsets:
        rows.append({"offset": offset, **placement(scores + offset * untrained.to(scores.dtype), targets, untrained,
                                                   cold)})
    return rows


def placement(scores, targets, untrained, cold) -> dict[str, float]:
    """The new items' share of the top 20 and NDCG@20 of the cold test users (`cold`: their target
    is new), of the others and of all, for scores (B, N + 1) of every item."""
    ranks = target_ranks(scores, targets).numpy()
    return {"share_top20": float(untrained[scores.topk(20, dim=-1).indices].float().mean()),
            **{f"ndcg@20_{part}": metrics_from_ranks(ranks[mask])["ndcg@20"]
               for part, mask in (("cold", cold), ("other", ~cold), ("all", np.ones_like(cold)))}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="results directory of `mp4sr-rt benchmark`")
    parser.add_argument("--models", default="mp4sr")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path)
    parser.add_argument("--features", type=Path)
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--offsets", default="", help="comma-separated score offsets for new items, e.g. 0,0.1,0.2")
    parser.add_argument("--neighbours", default="", help="comma-separated K: new items' ID rows from their K nearest "
                                                          "trained items (a tied model), e.g. 10,50")
    parser.add_argument("--ridge", action="store_true",
                        help="new items' ID rows from a ridge regression of the trained rows on the item vectors")
    args = parser.parse_args()
    options = BenchmarkOptions(cfg=config_lib.preset(args.preset), seeds=(args.seed,), out=args.out,
                               data=args.data, features=args.features, device="cpu", progress=False)
    inputs = load_inputs(options)
    offsets = tuple(float(x) for x in args.offsets.split(",") if x.strip())
    neighbours = tuple(int(x) for x in args.neighbours.split(",") if x.strip())
    for setting in ("normal", "cold-start"):
        for name in args.models.split(","):
            if (args.out / setting / name / f"seed-{args.seed}" / "metrics.json").is_file():  # finished runs only
                print(json.dumps(diagnose(args.out, setting, name, args.seed, inputs, options, offsets, neighbours,
                                         args.ridge)),
                      flush=True)


if __name__ == "__main__":
    main()
