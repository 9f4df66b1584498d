"""Training cost against catalogue size: one fine-tuning step (forward, backward, Adam) and one
pre-training step on the full-catalogue path and the large-catalogue path (train.softmax
"sampled": the step encodes only its items, softmax over in-batch and shared negatives), and
block-wise evaluation, at 10k to 1M items, side by side in one run (the full path only up to
--full-max items: at 1M its pre-training step needed more than this machine's 24 GB).

    python benchmarks/scale.py --sizes 10000,30000,100000,1000000 --out docs/bench/scale-cpu.jsonl

Synthetic catalogue: low-rank item features (rank 16 plus noise), 4 text and 2 image slots of
64-d per item (a compact stand-in for 384-d sentence vectors, so that 1M items fit in memory),
histories of 50 items drawn uniformly. Model: the demo preset's (d 64, 2 layers). Batch 512.
Prints JSON lines and a table; the time per step of each path gives the crossover that
train.softmax.auto_above follows.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import numpy as np
import torch
from mp4sr_train import config as config_lib
from mp4sr_train.data.types import Split
from mp4sr_train.loop import evaluate
from mp4sr_train.model import M2SE, ItemFeatures, ItemIdEmbedding
from mp4sr_train.tasks import NegativeSample, finetune_loss, pretrain_loss


def catalogue(n: int, feat: int, seed: int) -> ItemFeatures:
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(16, feat, generator=g)
    def slots(s: int) -> torch.Tensor:
        codes = torch.randn(n + 1, 16, generator=g)
        x = (codes @ basis)[:, None, :] + 0.3 * torch.randn(n + 1, s, feat, generator=g)
        return x / x.norm(dim=-1, keepdim=True)
    text, image = slots(4), slots(2)
    return ItemFeatures(text, torch.ones(n + 1, 4, dtype=torch.bool), image, torch.ones(n + 1, 2, dtype=torch.bool))


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def measure(n: int, cfg: config_lib.Config, args: argparse.Namespace) -> list[dict]:
    """Step times of both paths and both stages, then one evaluation, at `n` items."""
    rows = []
    feats = catalogue(n, 64, seed=n)
    model = M2SE(cfg.model, 64)
    id_emb = ItemIdEmbedding.create(cfg.train.ids, n, cfg.model.d, torch.ones(n + 1, dtype=torch.bool), 2)
    optimizer = torch.optim.Adam(list(model.parameters()) + list(id_emb.parameters()), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, n + 1, (args.batch, cfg.data.max_len), generator=g)
    targets = torch.randint(1, n + 1, (args.batch,), generator=g)
    counts = np.bincount(targets.numpy(), minlength=n + 1) + 1
    sample = NegativeSample(counts, args.negatives, "uniform", log_q=True)

    def step(stage: str, sampled: bool) -> None:
        s = sample if sampled else None
        if stage == "finetune":
            loss, _ = finetune_loss(model, id_emb, feats, ids, targets, cfg.train, g, s)
        else:
            loss, _ = pretrain_loss(model, feats, ids, targets, cfg.train, g, s)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    model.train()
    for stage in ("pretrain", "finetune"):
        for sampled in (False, True):
            if not sampled and n > args.full_max:
                row = {"items": n, "stage": stage, "path": "full", "step_s": None, "sequences_per_s": None,
                       "peak_rss_gb": None, "note": f"not run: above --full-max {args.full_max}"}
                rows.append(row)
                print(json.dumps(row), flush=True)
                continue
            seconds = timed(lambda st=stage, sa=sampled: step(st, sa), args.repeats)
            row = {"items": n, "stage": stage, "path": "sampled" if sampled else "full",
                   "step_s": round(seconds, 4), "sequences_per_s": round(args.batch / seconds, 1),
                   "peak_rss_gb": round(peak_rss_gb(), 2)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    users = Split(torch.randint(1, n + 1, (args.eval_users, cfg.data.max_len), generator=g).numpy(),
                  torch.randint(1, n + 1, (args.eval_users,), generator=g).numpy())
    start = time.perf_counter()
    evaluate(model, feats, users, 256, id_emb)
    row = {"items": n, "stage": "evaluate", "path": "blocks" if n + 1 > 65_536 else "full",
           "users": args.eval_users, "seconds": round(time.perf_counter() - start, 2),
           "peak_rss_gb": round(peak_rss_gb(), 2)}
    rows.append(row)
    print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--negatives", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--eval-users", type=int, default=2048)
    parser.add_argument("--full-max", type=int, default=300_000,
                        help="largest catalogue to run the full path on (at 1M items it needs more than 24 GB)")
    parser.add_argument("--out", type=Path, default=None, help="JSON lines; the plot goes beside it (.png)")
    parser.add_argument("--replot", type=Path, default=None,
                        help="print the table and draw the plot of an earlier --out file, measuring nothing")
    args = parser.parse_args()
    if args.replot is not None:
        rows = [json.loads(line) for line in args.replot.read_text().splitlines() if line.strip()]
        print_table(rows, args)
        plot(rows, args.replot.with_suffix(".png"))
        return
    torch.manual_seed(0)
    cfg = config_lib.preset("demo")
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        rows += measure(n, cfg, args)
    print_table(rows, args)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
        plot(rows, args.out.with_suffix(".png"))


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    print(f"\nbatch {args.batch}, {args.negatives} shared negatives, demo model; peak RSS is the process's so far")
    print(f"{'items':>9} {'stage':<9} {'path':<8} {'step s':>8} {'seq/s':>9} {'peak RSS GB':>12}")
    for r in rows:
        if r["stage"] != "evaluate" and r["step_s"] is None:
            print(f"{r['items']:>9} {r['stage']:<9} {r['path']:<8} {r['note']}")
        elif r["stage"] != "evaluate":
            print(f"{r['items']:>9} {r['stage']:<9} {r['path']:<8} {r['step_s']:>8.3f} {r['sequences_per_s']:>9.0f} "
                  f"{r['peak_rss_gb']:>12.2f}")
        else:
            print(f"{r['items']:>9} {'evaluate':<9} {r['path']:<8} {r['seconds']:>8.2f} s for {r['users']} users")


def plot(rows: list[dict], path: Path) -> None:
    """Training sequences/s per stage and path, and the evaluation time, against catalogue size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (steps, evals) = plt.subplots(1, 2, figsize=(10, 4))
    for stage in ("pretrain", "finetune"):
        for path_name, style in (("full", "--"), ("sampled", "-")):
            points = [(r["items"], r["sequences_per_s"]) for r in rows
                      if r["stage"] == stage and r["path"] == path_name and r.get("sequences_per_s")]
            if points:
                steps.plot(*zip(*points, strict=True), style, marker="o", label=f"{stage}, {path_name}")
    steps.set(xscale="log", xlabel="catalogue items", ylabel="training sequences / s", title="training step")
    steps.legend()
    points = [(r["items"], r["seconds"]) for r in rows if r["stage"] == "evaluate"]
    evals.plot(*zip(*points, strict=True), marker="o")
    evals.set(xscale="log", yscale="log", xlabel="catalogue items", ylabel="seconds",
              title=f"evaluation, {rows[-1].get('users', '?')} users")
    for ax in (steps, evals):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
