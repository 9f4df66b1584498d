"""Training stages with early stopping, per-epoch resumable state, and evaluation.

Run directory:
    run.json                       what the run was started with (resume checks it matches)
    stages/<stage>/last.safetensors, best.safetensors, state.json
    checkpoint/                    the selected model (train/checkpoint.py)
    metrics.json, curves.png
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from mp4sr_train import config as config_lib
from mp4sr_train.checkpoint import load_state, state_tensors
from mp4sr_train.config import Config, StageConfig
from mp4sr_train.data.types import Split, SplitData
from mp4sr_train.distributed import World
from mp4sr_train.metrics import RankAccumulator, metrics_from_ranks, popularity_scores
from mp4sr_train.model import M2SE, ItemFeatures, ItemIdEmbedding, candidates, item_vectors
from mp4sr_train.tasks import NegativeSample, finetune_loss, full_scores, pretrain_loss
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from mp4sr_rt.errors import UserError
from mp4sr_rt.io import atomic_write, write_json_atomic

SELECT_METRIC = "recall@20"


@dataclass
class StageResult:
    best_epoch: int
    valid: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0  # training and validation time of all its epochs, across resumes
    sequences_per_second: float = 0.0


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    if name not in ("cpu", "cuda"):
        raise UserError(f"unknown device {name!r}; choose auto, cpu or cuda")
    return torch.device(name)


EVAL_CHUNK = 65_536  # items per block of a large catalogue's scores: memory B x EVAL_CHUNK, whatever N


@torch.inference_mode()
def evaluate(
    model: M2SE, feats: ItemFeatures, split: Split, batch_size: int,
    id_emb: ItemIdEmbedding | None = None, chunk: int = EVAL_CHUNK,
) -> dict[str, float]:
    """Full ranking of every item for each history of `split` (SPEC section 5). A catalogue
    larger than `chunk` items is encoded and ranked block by block (exact ranks, counted across
    the blocks), so that beyond the item table the memory does not grow with its size."""
    model.eval()
    dev = feats.device
    blocks = len(feats) > chunk or feats.is_mapped  # a mapped catalogue is only ever read in blocks
    z = encode_items_chunked(model, feats, chunk) if blocks else model.encode_items(feats)
    cands = None
    if blocks:
        inputs, outputs = item_vectors(z, id_emb)
        cands = candidates(outputs)
    acc = RankAccumulator()
    for start in range(0, len(split), batch_size):
        hist = split.histories[start : start + batch_size]
        width = max(int((hist != 0).sum(1).max()), 1)  # trailing padding changes nothing
        ids = torch.as_tensor(hist[:, :width], device=dev)
        targets = torch.as_tensor(split.targets[start : start + batch_size], device=dev)
        if cands is None:
            acc.add(full_scores(model, feats, ids, id_emb, z), targets)
        else:
            acc.ranks.append(chunked_ranks(model.encode_history(ids, inputs), cands, targets, chunk).cpu().numpy())
    return acc.result()


def encode_items_chunked(model: M2SE, feats: ItemFeatures, chunk: int) -> torch.Tensor:
    """model.encode_items, `chunk` items at a time: (M, N + 1, d), row 0 (padding) zero."""
    n, dev = len(feats), feats.device
    parts = []
    for start in range(0, n, chunk):
        index = torch.arange(start, min(start + chunk, n), device=dev)
        if start:  # encode_items zeroes its first row (padding): put the padding item first
            index = torch.cat([torch.zeros(1, dtype=index.dtype, device=dev), index])
        parts.append(model.encode_items(feats.take(index))[:, 1 if start else 0:])
    return torch.cat(parts, dim=1)


def chunked_ranks(h: torch.Tensor, cands: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """target_ranks of score(h, cands) (ties against the target, padding never ranked),
    counted `chunk` candidates at a time: (B,)."""
    u = F.normalize(h, dim=-1)  # (M, B, d)
    t = torch.einsum("mbd,mbd->b", u, cands[:, targets])
    ranks = torch.zeros(len(targets), dtype=torch.long, device=h.device)
    for start in range(0, cands.shape[1], chunk):
        s = torch.einsum("mbd,mnd->bn", u, cands[:, start : start + chunk])
        if start == 0:
            s[:, 0] = float("-inf")
        columns = torch.arange(start, start + s.shape[1], device=h.device)
        ahead = (s >= t[:, None]) & (columns != targets[:, None])  # the target's own column never counts
        ranks += ahead.sum(1)
    return ranks


def sample_split(split: Split, users: int, seed: int) -> Split:
    """`users` histories of `split` drawn with `seed` (in their order), or all of them for 0."""
    if users <= 0 or users >= len(split):
        return split
    rows = np.sort(np.random.default_rng(seed).choice(len(split), users, replace=False))
    return Split(split.histories[rows], split.targets[rows])


def evaluate_popularity(data: SplitData, split: Split) -> dict[str, float]:
    """The popularity baseline's metrics. Its scores are one vector, the same for every history
    and without ties, so each target's rank is its place in that vector's order: O(N) memory,
    not a (users, items) score matrix."""
    scores = popularity_scores(data.train_counts).numpy()
    place = np.empty(len(scores), dtype=np.int64)
    place[np.argsort(-scores, kind="stable")] = np.arange(len(scores))
    return metrics_from_ranks(place[split.targets])


def _batches(split: Split, batch_size: int, rng: np.random.Generator, bucket: int = 32):
    """Shuffled batches of similar history length, trimmed to their longest history.

    Right padding makes trimming exact (positions count from the left). Sorting by length within
    random groups of `bucket` batches keeps batches random while skipping most of the padding."""
    order = rng.permutation(len(split))
    lengths = (split.histories != 0).sum(1)
    group = batch_size * bucket
    batches = []
    for start in range(0, len(order), group):
        chunk = order[start : start + group]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    for b in rng.permutation(len(batches)):
        idx = batches[b]
        width = max(int(lengths[idx].max()), 1)
        yield split.histories[idx, :width], split.targets[idx]


class StepLoss(torch.nn.Module):
    """A stage's training loss as a module's forward, which DistributedDataParallel wraps."""

    def __init__(self, runner: StageRunner):
        super().__init__()
        self.model, self.id_emb = runner.model, runner.id_emb
        self._loss = runner._loss

    def forward(self, ids: torch.Tensor, targets: torch.Tensor):
        return self._loss(ids, targets)


class StageRunner:
    """Runs one stage (pretrain or finetune) with early stopping and per-epoch checkpoints; under
    torchrun (`world`, train/distributed.py) each rank trains on its share of every batch through
    DistributedDataParallel and rank 0 alone writes."""

    def __init__(
        self, name: str, stage_cfg: StageConfig, cfg: Config, model: M2SE,
        id_emb: ItemIdEmbedding | None, feats: ItemFeatures, data: SplitData, directory: Path,
        progress: bool = True, world: World | None = None, encoder_lr: float = 1.0,
    ):
        self.world = world or World()
        progress = progress and self.world.main
        self.name, self.stage_cfg, self.cfg = name, stage_cfg, cfg
        self.model, self.id_emb, self.feats, self.data = model, id_emb, feats, data
        self.dir = directory
        self.progress = progress
        # `encoder_lr`: the model's own parameters learn at lr times this, the ID embedding at lr
        # (fine-tuning a pre-trained model: train.finetune_encoder_lr).
        groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": stage_cfg.lr * encoder_lr}]
        if id_emb is not None:
            groups.append({"params": [p for p in id_emb.parameters() if p.requires_grad]})
        self.params = [p for group in groups for p in group["params"]]
        self.optimizer = torch.optim.Adam(groups, lr=stage_cfg.lr, weight_decay=stage_cfg.weight_decay)
        self.generator = torch.Generator(device=feats.device).manual_seed(cfg.train.seed)
        # A large catalogue (train.softmax): steps encode only their items, fine-tuning's softmax
        # runs over in-batch and shared sampled negatives with the log-Q correction.
        sm = cfg.train.softmax
        counts = np.bincount(data.train.targets, minlength=data.num_items + 1)  # training-target counts
        self.sample = None
        if sm.sampled(data.num_items):
            self.sample = NegativeSample(counts, sm.negatives, sm.distribution, sm.log_q, feats.device)
        # Fine-tuning with popularity smoothing: the prior is the training targets' distribution.
        self.prior = None
        if cfg.train.popularity_smoothing > 0 and id_emb is not None:
            if self.sample is not None:
                raise UserError("train.popularity_smoothing needs the full softmax over the catalogue; this "
                                f"catalogue ({data.num_items} items) trains with the sampled one: set "
                                "train.softmax.kind=full, or train.popularity_smoothing=0")
            prior = torch.as_tensor(counts, dtype=torch.float32)
            prior[0] = 0.0
            self.prior = (prior / prior.sum()).to(feats.device)
        self.step: torch.nn.Module = StepLoss(self)
        if self.world.size > 1:
            from torch.nn.parallel import DistributedDataParallel

            dev = feats.device
            # Some parameters get no gradient in some steps (the ID projection when no item lost
            # its row, a modality's tower in a one-modality model): find_unused_parameters.
            self.step = DistributedDataParallel(self.step, device_ids=[dev] if dev.type == "cuda" else None,
                                                find_unused_parameters=True)
        self.state: dict[str, Any] = {"epoch": 0, "best_epoch": 0, "best": -1.0, "history": [], "done": False}

    # -- persistence -------------------------------------------------------------------------
    def _save(self, file: str, with_optimizer: bool) -> None:
        if not self.world.main:
            return
        tensors = state_tensors(self.model, self.id_emb)
        if with_optimizer:
            for i, p in enumerate(self.params):
                for key, value in self.optimizer.state.get(p, {}).items():
                    tensors[f"opt.{i}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
            tensors["rng.generator"] = self.generator.get_state().cpu()
            tensors["rng.torch"] = torch.get_rng_state()
        atomic_write(self.dir / file, lambda p: save_file(tensors, str(p)))

    def resume(self) -> bool:
        """Load the last completed epoch if there is one; True when the stage already finished."""
        state_file = self.dir / "state.json"
        if not state_file.is_file():
            return False
        self.state = json.loads(state_file.read_text())
        tensors = load_file(str(self.dir / "last.safetensors"), device=str(self.feats.device))
        load_state(tensors, self.model, self.id_emb)
        for i, p in enumerate(self.params):
            slots = {k.split(".")[2]: v for k, v in tensors.items() if k.startswith(f"opt.{i}.")}
            if slots:
                self.optimizer.state[p] = slots
        self.generator.set_state(tensors["rng.generator"].cpu())
        torch.set_rng_state(tensors["rng.torch"].cpu())
        return bool(self.state["done"])

    def load_best(self) -> None:
        tensors = load_file(str(self.dir / "best.safetensors"), device=str(self.feats.device))
        load_state(tensors, self.model, self.id_emb)

    # -- training ----------------------------------------------------------------------------
    def _loss(self, ids: torch.Tensor, targets: torch.Tensor):
        if self.name == "pretrain":
            return pretrain_loss(self.model, self.feats, ids, targets, self.cfg.train, self.generator, self.sample)
        return finetune_loss(self.model, self.id_emb, self.feats, ids, targets, self.cfg.train, self.generator,
                             self.sample, self.prior)

    def _epoch(self, epoch: int) -> tuple[float, float]:
        self.model.train()
        if self.id_emb is not None:
            self.id_emb.train()
        dev = self.feats.device
        rng = np.random.default_rng(self.cfg.train.seed * 100_003 + epoch)
        n = len(self.data.train)
        total, count, start = 0.0, 0, time.perf_counter()
        bar = tqdm(
            _batches(self.data.train, self.stage_cfg.batch_size, rng),
            total=math.ceil(n / self.stage_cfg.batch_size), desc=f"{self.name} {epoch}",
            unit="batch", disable=not self.progress, leave=False, file=sys.stderr,
        )
        for hist, targets in bar:
            if self.world.size > 1:  # equal shares (gather needs them): the remainder rows are left out
                n = len(targets) // self.world.size * self.world.size
                if n == 0:
                    continue
                hist, targets = self.world.shard(hist[:n]), self.world.shard(targets[:n])
            ids = torch.as_tensor(hist, device=dev)
            tgt = torch.as_tensor(targets, device=dev)
            loss, _ = self.step(ids, tgt)
            if not torch.isfinite(loss):
                raise RuntimeError(f"{self.name}: non-finite loss at epoch {epoch}")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, self.stage_cfg.grad_clip)
            self.optimizer.step()
            total += float(loss.detach()) * len(tgt)
            count += len(tgt)
            speed = count * self.world.size / (time.perf_counter() - start)  # every rank's sequences
            bar.set_postfix(loss=f"{total / count:.4f}", seq_s=f"{speed:.0f}", refresh=False)
        return total / max(count, 1), count * self.world.size / (time.perf_counter() - start)

    def run(self) -> StageResult:
        self.dir.mkdir(parents=True, exist_ok=True)
        sc = self.stage_cfg
        valid_split = sample_split(self.data.valid, self.cfg.train.valid_users, self.cfg.train.seed)
        while not self.state["done"]:
            epoch = self.state["epoch"] + 1
            t0 = time.perf_counter()
            loss, seq_per_s = self._epoch(epoch)
            valid = evaluate(self.model, self.feats, valid_split, self.cfg.train.eval_batch_size, self.id_emb)
            self.state["history"].append({"epoch": epoch, "loss": loss, "valid": valid, "seq_per_s": seq_per_s,
                                          "seconds": time.perf_counter() - t0})
            improved = valid[SELECT_METRIC] > self.state["best"]
            if improved:
                self.state.update(best=valid[SELECT_METRIC], best_epoch=epoch)
                self._save("best.safetensors", with_optimizer=False)
            self.state["epoch"] = epoch
            self.state["done"] = epoch >= sc.epochs or epoch - self.state["best_epoch"] >= sc.patience
            if self.progress:  # rank 0 only
                mark = " *" if improved else ""
                print(f"{self.name} epoch {epoch:3d}  loss {loss:.4f}  valid {SELECT_METRIC} "
                      f"{valid[SELECT_METRIC]:.4f}  ndcg@10 {valid['ndcg@10']:.4f}  "
                      f"{seq_per_s:.0f} seq/s{mark}", file=sys.stderr)
            # Last state after best: a kill between the two writes resumes from a consistent pair.
            self._save("last.safetensors", with_optimizer=True)
            if self.world.main:
                write_json_atomic(self.dir / "state.json", self.state)
        self.world.barrier()  # rank 0 has written best.safetensors
        self.load_best()
        best = self.state["history"][self.state["best_epoch"] - 1]
        speeds = [h["seq_per_s"] for h in self.state["history"]]
        return StageResult(
            best_epoch=self.state["best_epoch"], valid=best["valid"], history=self.state["history"],
            seconds=sum(h.get("seconds", 0.0) for h in self.state["history"]),
            sequences_per_second=float(np.median(speeds)),
        )


def run_fingerprint(cfg: Config, data_key: str, features_sha: str) -> dict[str, Any]:
    return {"config": config_lib.to_dict(cfg), "data": data_key, "features_sha256": features_sha}


def stored_fingerprint(path: Path) -> dict[str, Any]:
    """A run.json as run_fingerprint would write it today: a config written before a setting existed
    reads as having the value the run trained with (config.upgrade), so it matches a run made with
    that value today and no other."""
    stored = json.loads(path.read_text())
    try:
        config = config_lib.from_dict(config_lib.upgrade(stored["config"]))
        stored["config"] = json.loads(json.dumps(config_lib.to_dict(config)))
    except (UserError, KeyError, TypeError):
        pass  # a setting this version no longer has: the comparison tells it apart
    return stored


def check_or_write_run(out: Path, fingerprint: dict[str, Any], resume: bool, overwrite: bool) -> None:
    """Refuse to clobber an existing run unless asked; refuse to resume a different run."""
    run_file = out / "run.json"
    if run_file.is_file() and overwrite:
        for sub in ("stages", "checkpoint", "run.json", "metrics.json", "curves.png"):
            target = out / sub
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
    elif run_file.is_file() and not resume:
        raise UserError(f"{out} already holds a training run; pass --resume to continue it "
                        "or --overwrite to start again (or choose another --out)")
    elif run_file.is_file():
        previous = stored_fingerprint(run_file)
        current = json.loads(json.dumps(fingerprint))  # as stored: tuples become lists
        changed = [k for k in current if previous.get(k) != current[k]]
        if changed:
            raise UserError(f"--resume: {out} was started with a different {', '.join(changed)}; "
                            "use --overwrite or another --out")
        return
    write_json_atomic(run_file, fingerprint)
