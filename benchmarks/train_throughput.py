"""Training throughput on the demo data: sequences/s and epoch time for both stages.

Also times, in the same run, a reference-style step that pools and adapts the features of every
history position (as the MP4SR reference code does) instead of the item table once per step, so
the ratio between the two is measured side by side on the same machine load.

    python benchmarks/train_throughput.py [--steps 10] [--batch-size 512] [--device auto]
Prints JSON lines, then a table.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from mp4sr_train.config import preset
from mp4sr_train.data import default_demo_dir, demo_features, generate_demo, load_or_preprocess
from mp4sr_train.loop import _batches, resolve_device
from mp4sr_train.model import M2SE, ItemFeatures, ItemIdEmbedding
from mp4sr_train.run import load_item_features
from mp4sr_train.tasks import finetune_loss, nip_loss, pretrain_loss


def reference_style_loss(model: M2SE, feats: ItemFeatures, ids, targets, tau: float):
    """Pre-training NIP with the experts applied per history position (no item-table reuse)."""
    outs = []
    for m in range(2):
        x, mask = feats.modality(m)
        # (B * L, S, F): every history position pooled and adapted on its own
        pooled = model.pool[m](x[ids].flatten(0, 1), mask[ids].flatten(0, 1))
        outs.append(model.adaptor[m](pooled).view(*ids.shape, -1))
    seq = torch.stack(outs)  # (2, B, L, d)
    lengths = (ids != 0).sum(-1)
    h = F.normalize(model.encode_sequence(seq.flatten(0, 1), lengths.repeat(2)).view(2, len(ids), -1), dim=-1)
    e = F.normalize(model.encode_items(feats)[:, targets], dim=-1)
    return nip_loss(h[0], e[0], targets, tau) + nip_loss(h[1], e[1], targets, tau)


def time_steps(step, batches, n: int) -> float:
    step(*batches[0])  # warm-up
    t0 = time.perf_counter()
    count = 0
    for hist, targets in batches[1 : n + 1]:
        step(hist, targets)
        count += len(targets)
    return count / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    dev = resolve_device(args.device)
    cfg = preset("demo")
    data_dir = generate_demo(default_demo_dir())
    feats_file = data_dir / "features.safetensors"
    if not feats_file.is_file():
        demo_features(data_dir, feats_file)
    cache = Path(tempfile.gettempdir()) / "mp4sr-bench-cache"
    data, _ = load_or_preprocess(data_dir, cache, cfg.data.max_len, cfg.data.min_interactions)
    feats, _ = load_item_features(feats_file, data, dev)
    torch.manual_seed(0)
    model = M2SE(cfg.model, feats.text.shape[-1]).to(dev).train()
    id_emb = ItemIdEmbedding(data.num_items, cfg.model.d, torch.as_tensor(data.train_counts > 0)).to(dev)
    params = list(model.parameters()) + list(id_emb.parameters())
    opt = torch.optim.Adam(params, lr=1e-3)
    rng = np.random.default_rng(0)
    batches = [(torch.as_tensor(h, device=dev), torch.as_tensor(t, device=dev))
               for h, t in _batches(data.train, args.batch_size, rng)][: args.steps + 1]

    def train_step(loss_fn):
        def step(ids, targets):
            loss = loss_fn(ids, targets)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step

    stages = {
        "pretrain": lambda i, t: pretrain_loss(model, feats, i, t, cfg.train)[0],
        "finetune": lambda i, t: finetune_loss(model, id_emb, feats, i, t, cfg.train)[0],
        "pretrain_nip_per_position_reference_style": lambda i, t: reference_style_loss(
            model, feats, i, t, cfg.train.tau
        ),
        "pretrain_nip_item_table": lambda i, t: _nip_only(model, feats, i, t, cfg.train.tau),
    }
    rows = []
    for name, loss_fn in stages.items():
        seq_s = time_steps(train_step(loss_fn), batches, args.steps)
        row = {"stage": name, "device": str(dev), "batch_size": args.batch_size, "sequences_per_s": round(seq_s, 1),
               "epoch_s": round(len(data.train) / seq_s, 1), "train_sequences": len(data.train)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    ratio = rows[3]["sequences_per_s"] / rows[2]["sequences_per_s"]
    print(json.dumps({"item_table_vs_per_position_speedup": round(ratio, 2)}))
    print(f"\n{'stage':44s}{'seq/s':>10s}{'epoch s':>10s}")
    for r in rows:
        print(f"{r['stage']:44s}{r['sequences_per_s']:10.0f}{r['epoch_s']:10.1f}")
    print(f"item table once per step vs experts per position: {ratio:.1f}x faster")


def _nip_only(model, feats, ids, targets, tau):
    z = model.encode_items(feats)
    h = F.normalize(model.encode_history(ids, z), dim=-1)
    e = F.normalize(z[:, targets], dim=-1)
    return nip_loss(h[0], e[0], targets, tau) + nip_loss(h[1], e[1], targets, tau)


if __name__ == "__main__":
    main()
