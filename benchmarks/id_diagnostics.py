"""Where the trained MP4SR's scores come from: the feature part z against the ID part of the item
vectors, and how items without a trained ID row (cold-start items) fare against trained ones.

    python benchmarks/id_diagnostics.py mp4sr-bench/demo --models mp4sr,ids-paper --seed 0

Reads finished `mp4sr-rt benchmark` runs (those with a metrics.json; the demo data, or --data and
--features as the benchmark had them) and prints one JSON line per setting and model:
    z_norm, id_norm          mean row norm of the feature part z (both modalities) and of the ID
                             rows of trained items (scale included)
    predicted_id_norm        mean norm of the rows predicted from features for untrained items
    cold_share_top20         cold-start setting: share of the held-out items among the top 20 of
                             the cold test users (they are ~10% of the catalogue and every target)
    target_rank_median       cold-start setting: median rank of the (held-out) target
    new_only                 cold-start setting: Recall@20 and NDCG@20 ranking each cold test user's
                             target among the held-out items alone: how well the features rank new
                             items, whatever the model's bias for or against items without an ID row
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from mp4sr_train import config as config_lib
from mp4sr_train.benchmark import BY_NAME, BenchmarkOptions, build_model, full_catalogue_ids, load_inputs, setting_data
from mp4sr_train.checkpoint import load_state
from mp4sr_train.metrics import metrics_from_ranks, target_ranks
from mp4sr_train.model import ItemIdEmbedding
from mp4sr_train.tasks import full_scores
from safetensors.torch import load_file


@torch.inference_mode()
def diagnose(out: Path, setting: str, name: str, seed: int, inputs, options: BenchmarkOptions) -> dict:
    spec = BY_NAME[name]
    cfg = config_lib.replace(options.cfg, {**spec.overrides, "train.seed": seed})
    sd = setting_data(inputs, setting, options.cold_fraction, seed)
    model = build_model(spec, cfg, inputs.feats.text.shape[-1])
    known = torch.as_tensor(sd.train_data.train_counts > 0)
    modalities = len(cfg.model.modalities) if spec.kind == "mp4sr" else 1
    id_emb = ItemIdEmbedding.create(cfg.train.ids, sd.train_data.num_items, cfg.model.d, known, modalities)
    load_state(load_file(str(out / setting / name / f"seed-{seed}" / "stages" / "finetune" / "best.safetensors")),
               model, id_emb)
    model.eval()
    if sd.kept is not None:
        id_emb = full_catalogue_ids(id_emb, sd.kept, sd.data.num_items)
    z = model.encode_items(inputs.feats)
    rows = id_emb(z)
    trained = id_emb.known
    untrained = ~trained
    untrained[0] = False
    result = {"setting": setting, "model": name, "seed": seed,
              "z_norm": float(z[:, 1:].norm(dim=-1).mean()),
              "id_norm": float(rows[trained].norm(dim=-1).mean()),
              "predicted_id_norm": float(rows[untrained].norm(dim=-1).mean()) if untrained.any() else None}
    if setting == "cold-start":
        ids = torch.as_tensor(sd.test.histories)
        scores = full_scores(model, inputs.feats, ids, id_emb, z)
        top = scores.topk(20, dim=-1).indices
        target = scores.gather(1, torch.as_tensor(sd.test.targets)[:, None])
        ranks = (scores > target).sum(-1) + 1
        result["cold_share_top20"] = float(untrained[top].float().mean())
        result["target_rank_median"] = float(np.median(ranks.numpy()))
        only_new = scores.masked_fill(~untrained, float("-inf"))
        new = metrics_from_ranks(target_ranks(only_new, torch.as_tensor(sd.test.targets)).numpy())
        result["new_only"] = {k: new[k] for k in ("recall@20", "ndcg@20")}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="results directory of `mp4sr-rt benchmark`")
    parser.add_argument("--models", default="mp4sr")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path)
    parser.add_argument("--features", type=Path)
    parser.add_argument("--preset", default="demo")
    args = parser.parse_args()
    options = BenchmarkOptions(cfg=config_lib.preset(args.preset), seeds=(args.seed,), out=args.out,
                               data=args.data, features=args.features, device="cpu", progress=False)
    inputs = load_inputs(options)
    for setting in ("normal", "cold-start"):
        for name in args.models.split(","):
            if (args.out / setting / name / f"seed-{args.seed}" / "metrics.json").is_file():  # finished runs only
                print(json.dumps(diagnose(args.out, setting, name, args.seed, inputs, options)), flush=True)


if __name__ == "__main__":
    main()
