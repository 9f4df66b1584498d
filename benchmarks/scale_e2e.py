"""`mp4sr-rt train` end to end on generated catalogues: preprocessing, features on disk, both
training stages and the test, with each command's wall time and peak memory, 1 and 2 processes.

    python benchmarks/scale_e2e.py --runs 10000:full:1,10000:sampled:1,100000:sampled:1,100000:sampled:2 \
        --out docs/bench/scale-e2e.jsonl

Each run (ITEMS:PATH:PROCESSES) generates, under --work, a catalogue of ITEMS items in
clusters of --cluster-size items and ITEMS / 5 users who each buy --per-user items of one cluster (every item
bought about once: the catalogue is the whole generated one), timestamps in order; item features:
--text-slots and --image-slots slots of --dim dims per item, the item's cluster centre (a rank-32
space) plus noise, written block by block as --dtype (float16: half the bytes). Then, as
separate processes (peak RSS is each process's own, the largest of them with --nproc 2):
    preprocess   the CSV reader and the leave-one-out split
    train        `mp4sr-rt train` with the demo preset, one epoch per stage (a shortened schedule:
                 this measures cost, not quality), validation on 2,048 users, the test on all;
                 PATH full or sampled (train.softmax.kind; sampled maps the features file)
Prints JSON lines and a table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def generate(directory: Path, items: int, args: argparse.Namespace) -> tuple[Path, Path]:
    """interactions.csv and features.safetensors for a catalogue of `items` items (kept if there)."""
    from mp4sr_train.features.store import write_features_in_blocks

    data, features = directory / "data", directory / "features.safetensors"
    if features.is_file():
        return data, features
    rng = np.random.default_rng(items)
    clusters = max(1, items // args.cluster_size)
    cluster = np.arange(items) % clusters
    by_cluster = [np.flatnonzero(cluster == c) for c in range(clusters)]
    users = items // 5
    rows, pointer = [], np.zeros(clusters, dtype=np.int64)
    for user in range(users):
        c = int(rng.integers(clusters))
        members = by_cluster[c]
        for step in range(args.per_user):
            item = members[(pointer[c] + step) % len(members)]
            rows.append(f"u{user},i{item},{user * args.per_user + step}\n")
        pointer[c] += args.per_user
    data.mkdir(parents=True, exist_ok=True)
    (data / "interactions.csv").write_text("user_id,item_id,timestamp\n" + "".join(rows))
    basis = rng.standard_normal((32, args.dim)).astype(np.float32)
    centres = rng.standard_normal((clusters, 32)).astype(np.float32) @ basis
    ids = [f"i{i}" for i in range(items)]
    order = np.argsort(ids)  # the file's rows in id order, as extraction writes them

    def blocks():
        for start in range(0, items, 16_384):
            index = order[start:start + 16_384]
            parts = []
            for slots in (args.text_slots, args.image_slots):
                x = centres[cluster[index]][:, None, :] + rng.standard_normal(
                    (len(index), slots, args.dim), dtype=np.float32) * np.sqrt(args.dim / 32)
                parts += [x / np.linalg.norm(x, axis=-1, keepdims=True), np.ones((len(index), slots), np.uint8)]
            yield tuple(parts)

    write_features_in_blocks(features, [ids[i] for i in order], (args.text_slots, args.image_slots), args.dim,
                             {"encoder": "synthetic (benchmarks/scale_e2e.py)"}, blocks(), args.dtype)
    return data, features


def timed_process(command: list[str], env: dict[str, str]) -> tuple[float, float, float, str]:
    """Wall seconds; peak RSS in GB (the largest of the command's processes, from wait4), which
    counts the resident pages of a memory-mapped features file (page cache the kernel reclaims at
    will); the peak of the anonymous memory of all its processes together (RssAnon, sampled every
    0.2 s); and the command's standard output."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=err, text=True)
        anon = AnonSampler(proc.pid)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        peak_anon = anon.stop()
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            sys.exit(f"failed ({proc.returncode}): {' '.join(command)}\n{err.read()[-3000:]}")
        return seconds, usage.ru_maxrss / 2**20, peak_anon, out.read()


class AnonSampler(threading.Thread):
    """Peak over time of the summed RssAnon (GB) of a process and its descendants."""

    def __init__(self, root: int, every: float = 0.2):
        super().__init__(daemon=True)
        self.root, self.every, self.peak, self.done = root, every, 0.0, threading.Event()
        self.start()

    def run(self) -> None:
        while not self.done.wait(self.every):
            self.peak = max(self.peak, sum(_anon_kb(pid) for pid in _tree(self.root)) / 2**20)

    def stop(self) -> float:
        self.done.set()
        self.join()
        return self.peak


def _tree(root: int) -> list[int]:
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, parent in parents.items() if parent in frontier]
        tree += frontier
    return tree


def _anon_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


PREPROCESS = """
import sys, time
from pathlib import Path
from mp4sr_train.data import load_or_preprocess
start = time.perf_counter()
data, _ = load_or_preprocess(sys.argv[1], Path(sys.argv[2]), 50, 5)
print(len(data.item_ids), len(data.user_ids), len(data.train), time.perf_counter() - start)
"""


def run(spec: str, args: argparse.Namespace) -> dict:
    items, path, procs = spec.split(":")
    items, procs = int(items), int(procs)
    directory = args.work / f"items-{items}"
    start = time.perf_counter()
    data, features = generate(directory, items, args)
    generate_s = time.perf_counter() - start
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, args.threads // procs))}
    cache = directory / "preprocess-cache"
    shutil.rmtree(cache, ignore_errors=True)  # measured from the CSV, not from an earlier run's cache
    seconds, rss, _, stdout = timed_process([str(BIN / "python"), "-c", PREPROCESS, str(data), str(cache)], env)
    n_items, n_users, n_train, _ = stdout.split()
    out = directory / f"run-{path}-{procs}"
    command = [str(BIN / "mp4sr-rt"), "train", "--data", str(data), "--features", str(features), "--out", str(out),
               "--overwrite", "--quiet", "--nproc", str(procs),
               "--set", f'train.softmax.kind="{path}"', "--set", "train.pretrain.epochs=1",
               "--set", "train.finetune.epochs=1", "--set", "train.valid_users=2048"]
    train_s, train_rss, train_anon, _ = timed_process(command, env)
    metrics = json.loads((out / "metrics.json").read_text())
    return {
        "items": int(n_items), "users": int(n_users), "training_sequences": int(n_train), "path": path,
        "processes": procs, "features_bytes": features.stat().st_size, "features_dtype": args.dtype,
        "generate_s": round(generate_s, 1), "preprocess_s": round(seconds, 1),
        "preprocess_peak_rss_gb": round(rss, 2), "train_s": round(train_s, 1), "train_peak_rss_gb": round(train_rss, 2),
        "train_peak_anon_gb": round(train_anon, 2),
        **{f"{stage}_sequences_per_s": round(metrics[stage]["sequences_per_second"], 1)
           for stage in ("pretrain", "finetune")},
        "test_ndcg@10": round(metrics["finetune"]["test"]["ndcg@10"], 4),
        "note": "one epoch per stage: a shortened schedule (cost, not quality)",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="10000:full:1,10000:sampled:1,100000:sampled:1,100000:sampled:2")
    parser.add_argument("--work", type=Path, default=ROOT / "mp4sr-bench" / "scale-e2e")
    parser.add_argument("--per-user", type=int, default=6)
    parser.add_argument("--cluster-size", type=int, default=100, help="items per cluster")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--text-slots", type=int, default=5)
    parser.add_argument("--image-slots", type=int, default=5)
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads in all (split among the processes)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    for spec in args.runs.split(","):
        rows.append(run(spec, args))
        print(json.dumps(rows[-1]), flush=True)
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"\n{'items':>8} {'path':<8} {'procs':>5} {'feat GB':>8} {'prep s':>7} {'prep GB':>8} {'train s':>8} "
          f"{'train GB':>9} {'anon GB':>8} {'pre seq/s':>10} {'fine seq/s':>11}")
    for r in rows:
        print(f"{r['items']:>8} {r['path']:<8} {r['processes']:>5} {r['features_bytes'] / 1e9:>8.2f} "
              f"{r['preprocess_s']:>7.1f} {r['preprocess_peak_rss_gb']:>8.2f} {r['train_s']:>8.1f} "
              f"{r['train_peak_rss_gb']:>9.2f} {r.get('train_peak_anon_gb', float('nan')):>8.2f} "
              f"{r['pretrain_sequences_per_s']:>10.1f} "
              f"{r['finetune_sequences_per_s']:>11.1f}")


if __name__ == "__main__":
    main()
