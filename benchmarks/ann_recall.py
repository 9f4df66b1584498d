"""Recall of the runtime's approximate top k against its exact scan, on fresh random histories.

    python benchmarks/ann_recall.py ARTIFACTS [--histories 2000] [--k 10] [--seed 5]

ARTIFACTS: a directory exported with `--ann`. The histories (1 to L random catalogue items, seeded)
are neither those the export tuned and checked on nor the serving benchmark's. Both scorers run
Scorer.score end to end (seen items excluded). Prints the mean recall@k with its standard error,
and the same counting as hits the returned items that tie with the exact k-th score (within
1e-5 relative), so that float rounding between the two paths is not counted as a miss.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from mp4sr_rt.errors import UserError
from mp4sr_rt.manifest import verify_artifacts
from mp4sr_rt.scorer import Scorer


def main() -> None:
    try:
        run()
    except UserError as e:  # a directory that is not an export, a damaged one: one line, exit 1
        raise SystemExit(f"error: {e}") from None


def run() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("artifacts")
    p.add_argument("--histories", type=int, default=2000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    manifest = verify_artifacts(args.artifacts)
    if manifest.ann is None:
        raise SystemExit(f"{args.artifacts}: no approximate index (export --ann)")
    approx = Scorer(args.artifacts, backend="cpu", threads=args.threads)
    exact = Scorer(args.artifacts, backend="cpu", ann=False, threads=args.threads)
    items = json.loads((Path(args.artifacts) / manifest.vocabulary).read_text())["items"]
    rng = np.random.default_rng(args.seed)
    histories = [[items[j] for j in rng.integers(0, len(items), size=n)]
                 for n in rng.integers(1, manifest.max_len + 1, size=args.histories)]
    strict, tied = [], []
    for start in range(0, len(histories), 100):
        batch = histories[start:start + 100]
        for got, want in zip(approx.score(batch, k=args.k), exact.score(batch, k=args.k), strict=True):
            strict.append(len(set(got.items) & set(want.items)) / args.k)
            kth = want.scores[-1]
            tied.append(sum(s >= kth - 1e-5 * max(1.0, abs(kth)) for s in got.scores) / args.k)
    strict, tied = np.array(strict), np.array(tied)
    print(json.dumps({"artifacts": str(args.artifacts), "items": manifest.num_items, "ann": manifest.ann.kind,
                      "search": manifest.ann.search, "histories": len(histories), "k": args.k,
                      f"recall_at_{args.k}": round(float(strict.mean()), 4),
                      "standard_error": round(float(strict.std() / np.sqrt(len(strict))), 4),
                      f"recall_at_{args.k}_ties_as_hits": round(float(tied.mean()), 4)}))


if __name__ == "__main__":
    main()
