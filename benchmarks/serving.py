"""Serving benchmark: PyTorch eager from the checkpoint against every runtime backend present.

    python benchmarks/serving.py                                   # demo, 100k and 1M items
    python benchmarks/serving.py --sizes demo,100000 --batches 1,256 --iters 100   # 2-core CPU
    python benchmarks/serving.py --backends cuda --out $OUT        # a GPU machine

Catalogues: the demo model's own (the checkpoint in --run, exported here), and synthetic ones:
the same model with a random item table of N items (d = 64), saved as a checkpoint and exported
by the project's exporter, parity gate included. Without a checkpoint in --run the demo
architecture runs with untrained weights ("demo-shape"): timings depend on shapes, not weights.

Every system gets the same artifacts and the same histories (random, 1 to L items):
- torch-eager: the model's own forward (encode_history, user . table, top-k) in eager PyTorch,
  on the GPU when there is one, fed id arrays built beforehand and padded only to the batch's
  longest history: a lower bound for a PyTorch service, and the reference of every ratio;
- torch-rewritten: the same, with the exported scorer's graph (the last layer at the last
  position alone, train/model.py encode_last): how much of the runtime's lead is that rewrite;
- runtime-<backend>: Scorer.score end to end, original item ids in and out (k = 10, seen items
  excluded); with --int8-scan C also runtime-<backend>-int8, on artifacts exported with
  `--int8-scan C` (int8 catalogue scan, C candidates rescored; its record gives `rescanned`,
  the share of histories the bound sent back to the host's full-precision scan);
- direct-<backend> / batcher-<backend>: --clients threads each sending one history at a time,
  straight to Scorer.score or through the MicroBatcher.
Batch 1 gives latency p50/p99; larger batches give throughput (histories per second). Results:
JSON lines on stdout and in --out/serving.jsonl, a table, and --out/serving.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from mp4sr_export.onnx import serving_vectors  # noqa: E402
from mp4sr_export.run import export  # noqa: E402
from mp4sr_export.wrappers import Scorer as ScorerModule  # noqa: E402
from mp4sr_train.checkpoint import Checkpoint, load_checkpoint, save_checkpoint  # noqa: E402
from mp4sr_train.config import preset  # noqa: E402
from mp4sr_train.model import M2SE, user_vector  # noqa: E402

from mp4sr_rt.backends import BackendUnavailable  # noqa: E402
from mp4sr_rt.batching import MicroBatcher  # noqa: E402
from mp4sr_rt.errors import UserError  # noqa: E402
from mp4sr_rt.manifest import MANIFEST  # noqa: E402
from mp4sr_rt.scorer import SCORE_BUDGET, Scorer  # noqa: E402

K = 10
DEMO_FEAT_DIM = 64  # feature size of an untrained demo-shape model (only the item tower sees it)
WARMUP = 10  # untimed calls per batch size: enough to meet every padded width
DEMO_ITEMS = 2000  # the built-in demo dataset's catalogue (train/data/demo.py)


def main() -> None:
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = base_checkpoint(args.run)
    records: list[dict] = []
    with open(args.out / "serving.jsonl", "w", encoding="utf-8") as jsonl:
        def emit(record: dict) -> None:
            records.append(record)
            line = json.dumps(record)
            print(line, flush=True)
            jsonl.write(line + "\n")
            jsonl.flush()

        for size in args.sizes:
            try:
                name, variants, ckpt = catalogue(size, base, args, emit)
            except UserError as e:  # e.g. an fp16 export refused by the parity gate
                emit({"catalogue": size, "system": "export", "skipped": str(e)})
                continue
            bench_catalogue(name, variants, ckpt, device, args, emit)
    print(table(records))
    plot(records, args.out / "serving.png")
    print(f"wrote {args.out / 'serving.jsonl'} and {args.out / 'serving.png'}", file=sys.stderr)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, default=ROOT / "mp4sr-out",
                   help="run directory with the demo checkpoint (default: mp4sr-out)")
    p.add_argument("--sizes", default="demo,100000,1000000",
                   help="catalogues: 'demo' and/or synthetic item counts, comma-separated")
    p.add_argument("--batches", default="1,256,4096", help="batch sizes, comma-separated")
    p.add_argument("--backends", default="cpu,cuda,tensorrt",
                   help="runtime backends to try; absent ones are reported as skipped")
    p.add_argument("--iters", type=int, default=200, help="timed calls at batch 1")
    p.add_argument("--min-seconds", type=float, default=1.0,
                   help="least timed seconds per larger batch (at least 3 calls)")
    p.add_argument("--clients", type=int, default=16, help="client threads (direct calls, then the batcher)")
    p.add_argument("--client-seconds", type=float, default=3.0, help="duration of each client run")
    p.add_argument("--max-delay-ms", type=float, default=1.0,
                   help="the batcher's wait for a fuller batch (0: whatever is queued)")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads of PyTorch and of the CPU backend alike (0: their defaults)")
    p.add_argument("--fp16", action="store_true", help="export fp16 artifacts (fp16 item table)")
    p.add_argument("--topk-block", type=int, default=0,
                   help="export the scorer with a two-stage top k over blocks of this many items")
    p.add_argument("--int8-scan", type=int, default=0, metavar="C",
                   help="also time artifacts exported with --int8-scan C (C < the smallest catalogue)")
    p.add_argument("--ann", default="", help="also time artifacts with these approximate indexes "
                   "(export --ann), comma-separated: ivf, ivf-pq, hnsw; synthetic catalogues only")
    p.add_argument("--ann-recall", type=float, default=0.99, help="their recall target (export --ann-recall)")
    p.add_argument("--ann-k", type=int, default=0, help="the k of that target (export --ann-k; 0: the top K, 100)")
    p.add_argument("--work", type=Path, default=ROOT / "mp4sr-out" / "bench-work",
                   help="exported catalogues, reused by later runs with the same settings")
    p.add_argument("--out", type=Path, default=ROOT / "mp4sr-out" / "bench")
    args = p.parse_args()
    args.sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    args.batches = sorted({int(b) for b in args.batches.split(",")})
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    args.ann = [a.strip() for a in args.ann.split(",") if a.strip()]
    return args


# -- catalogues ------------------------------------------------------------------------------

def base_checkpoint(run: Path) -> Checkpoint | None:
    if (run / "checkpoint" / "config.json").is_file():
        return load_checkpoint(run / "checkpoint")
    print(f"note: no checkpoint in {run}: the demo architecture with untrained weights "
          "(timings depend on shapes only)", file=sys.stderr)
    return None


def catalogue(size: str, base: Checkpoint | None, args,
              emit: Callable[[dict], None]) -> tuple[str, dict[str, Path], Checkpoint]:
    """(name, artifact directories by system suffix, checkpoint) of one catalogue, exported once
    into --work: "" the plain export, "-int8" the --int8-scan one, "-ann-<kind>" the indexed ones.
    A variant whose export a gate refuses is reported as skipped; the others still run."""
    precision = ("fp16" if args.fp16 else "fp32") + (f"-block{args.topk_block}" if args.topk_block else "")
    if size == "demo" and base is not None:
        run, name = args.run, "demo"
        work = args.work / f"demo-{base.meta['model_sha256'][:12]}-{precision}"
    else:
        items = int(size) if size != "demo" else DEMO_ITEMS
        name = "demo-shape" if size == "demo" else label(items)
        model = base.meta["model_sha256"][:12] if base else "untrained"
        run = args.work / f"synthetic-{items}-{model}"
        if not (run / "checkpoint" / "config.json").is_file():
            save_checkpoint(run / "checkpoint", synthetic(base, items))
        work = run / precision
    variants = {"": work / "artifacts"}
    if args.int8_scan:
        variants["-int8"] = work.with_name(f"{work.name}-int8-{args.int8_scan}") / "artifacts"
    for kind in args.ann if size != "demo" else []:
        variants[f"-ann-{kind}"] = work.with_name(f"{work.name}-ann-{kind}-{args.ann_recall}"
                                                  + (f"-k{args.ann_k}" if args.ann_k else "")) / "artifacts"
    for suffix, artifacts in list(variants.items()):
        if not (artifacts / MANIFEST).is_file():
            t0 = time.perf_counter()
            kind = suffix.removeprefix("-ann-") if suffix.startswith("-ann-") else "none"
            try:
                export(run, artifacts, fp16=args.fp16, top_k=100, topk_block=args.topk_block,
                       int8_scan=args.int8_scan if suffix == "-int8" else 0, ann=kind, ann_recall=args.ann_recall,
                       ann_k=args.ann_k)
            except UserError as e:  # a gate refused it (parity, recall): nothing was written
                if not suffix:
                    raise
                emit({"catalogue": name, "system": f"runtime-cpu{suffix}", "skipped": str(e)})
                del variants[suffix]
                continue
            print(f"{name}{suffix}: exported in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return name, variants, load_checkpoint(run / "checkpoint")


def label(items: int) -> str:
    return f"{items / 1e6:g}M" if items >= 1_000_000 else f"{items / 1e3:g}k" if items >= 1000 else str(items)


def synthetic(base: Checkpoint | None, items: int) -> Checkpoint:
    """The base model (or an untrained demo-shape one) over a catalogue of `items` generated items
    (train/data/demo.py catalogue_features: clustered topics, as in the demo data), their vectors
    from the model's own item tower: a table shaped like a trained one, not uniform noise. The
    items are feature-only (no ID rows), as new catalogue items are."""
    from mp4sr_train.data.demo import catalogue_centres, catalogue_features

    cfg = base.cfg if base else preset("demo")
    model = base.model if base else M2SE(cfg.model, DEMO_FEAT_DIM).eval()
    topics = max(256, items // 200)  # about 200 items per topic at any size
    centres = catalogue_centres(model.feat_dim, seed=items, topics=topics)
    parts, chunk = [torch.zeros(len(cfg.model.modalities), 1, cfg.model.d)], 50_000
    with torch.inference_mode():
        for start in range(0, items, chunk):
            f = catalogue_features(min(chunk, items - start), model.feat_dim, seed=start, centres=centres)
            slots = {"text": (f["text"], f["text_mask"]), "image": (f["image"], f["image_mask"])}
            z = [model.adaptor[m](model.pool_slots(m, *map(torch.as_tensor, slots[name])))[1:]
                 for m, name in enumerate(cfg.model.modalities)]
            parts.append(torch.stack(z))
    z = torch.cat(parts, dim=1)  # (M, N + 1, d), row 0 the padding item
    counts = torch.randint(0, 100, (items + 1,), generator=torch.Generator().manual_seed(items))
    counts[0] = 0
    meta = {"stage": "synthetic", "item_ids": [f"s{i}" for i in range(items)],
            "train_counts": counts.tolist(), "features": {}}
    return Checkpoint(cfg, model, None, z, meta)


# -- systems ---------------------------------------------------------------------------------

class TorchEager:
    """Eager PyTorch: ids (B, L) -> top-K, in chunks of the runtime's row budget, so that neither
    side materialises more than 1 GiB of scores at once.

    `rewritten` False: the model's own forward (encode_history: every layer at every position),
    what a PyTorch service would run. True: the exported scorer's graph (export/wrappers.py:
    the last layer at the last position alone) in eager PyTorch, to tell the rewrite's share of
    the runtime's speed from the engine's."""

    def __init__(self, ckpt: Checkpoint, device: str, top_k: int, rewritten: bool = False):
        self.device = device
        self.module = ScorerModule(ckpt.model, *serving_vectors(ckpt), top_k).to(device).eval()
        self.forward = self.module if rewritten else self._model_forward
        self.system = "torch-rewritten" if rewritten else "torch-eager"
        rows = max(1, SCORE_BUDGET // (len(ckpt.item_ids) + 1))
        self.chunk = 1 << (rows.bit_length() - 1)  # the runtime's chunk size

    def _model_forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.module
        user = user_vector(m.model.encode_history(ids, m.inputs))
        return torch.topk(user @ m.table_t + m.pad_bias, m.k, dim=-1)

    def __call__(self, ids: np.ndarray) -> None:
        with torch.inference_mode():
            for start in range(0, len(ids), self.chunk):
                chunk = ids[start:start + self.chunk]
                width = int((chunk != 0).sum(axis=1).max())  # the chunk's longest history
                batch = torch.from_numpy(chunk[:, :width]).to(self.device)
                scores, items = self.forward(batch)[:2]
                scores.cpu(), items.cpu()  # what a service returns; also waits for the GPU


def bench_catalogue(name: str, variants: dict[str, Path], ckpt: Checkpoint, device: str, args,
                    emit: Callable[[dict], None]) -> None:
    manifest = json.loads((variants[""] / MANIFEST).read_text())
    histories = make_histories(ckpt.item_ids, manifest["max_len"], max(args.batches))
    index = {item: i + 1 for i, item in enumerate(ckpt.item_ids)}
    ids = np.zeros((len(histories), manifest["max_len"]), dtype=np.int64)
    for row, h in zip(ids, histories, strict=True):
        row[: len(h)] = [index[i] for i in h]
    common = {"catalogue": name, "items": len(ckpt.item_ids), "precision": manifest["precision"],
              "topk_block": manifest.get("topk_block", 0)}

    for rewritten in (False, True):
        reference = TorchEager(ckpt, device, manifest["top_k"], rewritten)
        bench_torch(reference, ids, args, lambda r: emit({**common, **r}))
    for suffix, artifacts in variants.items():
        labels = {**common, "int8_scan": args.int8_scan if suffix == "-int8" else 0}
        if suffix.startswith("-ann-"):
            labels |= ann_figures(artifacts, histories)
        for backend in args.backends:
            bench_runtime(artifacts, backend, histories, args, suffix, lambda r, at=labels: emit({**at, **r}))


def ann_figures(artifacts: Path, histories: list[list[str]], rows: int = 2000) -> dict:
    """The index's settings and build cost, and the runtime's recall@10 against the exact scan of
    the same artifacts on the benchmark's histories (not those the export tuned on): as many as
    the largest batch, 256 with --batches 1,256, a standard error of about 0.003 at recall 0.99;
    benchmarks/ann_recall.py measures it on more."""
    from mp4sr_rt.manifest import verify_artifacts

    manifest = verify_artifacts(artifacts)
    spec = manifest.ann
    sample = histories[:rows]
    got = Scorer(artifacts, backend="cpu").score(sample, k=K)
    want = Scorer(artifacts, backend="cpu", ann=False).score(sample, k=K)
    recall = float(np.mean([len(set(g.items) & set(w.items)) / K for g, w in zip(got, want, strict=True)]))
    return {"ann": f"{spec.kind} {spec.params} {spec.search}", "ann_recall_at_10": round(recall, 4),
            "ann_build_s": spec.build_seconds, "ann_index_mb": round(manifest.files[spec.file].bytes / 2**20, 1)}


def bench_torch(reference: TorchEager, ids: np.ndarray, args, emit: Callable[[dict], None]) -> None:
    for record in measure(lambda rows: reference(ids[rows]), len(ids), args):
        emit({"system": reference.system, "device": reference.device, **record})


def bench_runtime(artifacts: Path, backend: str, histories: list[list[str]], args, suffix: str,
                  emit: Callable[[dict], None]) -> None:
    try:
        scorer = Scorer(artifacts, backend=backend, threads=args.threads)
    except BackendUnavailable as e:
        emit({"system": f"runtime-{backend}{suffix}", "skipped": str(e)})
        return
    device = scorer.backend.description
    scored = 0

    def run(rows: range) -> None:
        nonlocal scored
        scored += len(rows)
        scorer.score([histories[i] for i in rows], k=K)

    records = measure(run, len(histories), args)
    # The share of the scored histories the host ranked again (int8 scan), over all the calls.
    rescanned = {"rescanned": round(scorer.rescans / scored, 4)}
    for record in records:
        emit({"system": f"runtime-{backend}{suffix}", "device": device, **rescanned, **record})
    for mode in ("direct", "batcher"):
        emit({"system": f"{mode}-{backend}{suffix}", "device": device, **clients(scorer, histories, mode, args)})


def make_histories(item_ids: list[str], max_len: int, count: int) -> list[list[str]]:
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, max_len + 1, size=count)
    return [[item_ids[j] for j in rng.integers(0, len(item_ids), size=n)] for n in lengths]


def measure(run: Callable[[range], None], pool: int, args) -> list[dict]:
    """Batch 1: latency over --iters calls; larger batches: throughput over >= --min-seconds."""
    records = []
    for batch in args.batches:
        calls = [range(i * batch, (i + 1) * batch) for i in range(max(1, pool // batch))]
        for rows in calls[:WARMUP]:  # lazy allocations, one CUDA graph capture per shape
            run(rows)
        if batch == 1:
            ms = timed_calls(run, calls, args.iters, 0.0)
        else:
            ms = timed_calls(run, calls, 3, args.min_seconds)
        records.append({"batch": batch, **summary(ms), "histories_per_s": round(batch * 1000 / ms.mean(), 1)})
    return records


def timed_calls(run: Callable[[range], None], calls: list[range], min_calls: int,
                min_seconds: float, max_seconds: float = 60.0) -> np.ndarray:
    """Milliseconds per call, cycling through `calls`; a slow system stops at max_seconds."""
    times = []
    start = time.perf_counter()
    while len(times) < min_calls or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        run(calls[len(times) % len(calls)])
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > max_seconds:
            break
    return np.array(times) * 1000


def summary(ms: np.ndarray) -> dict:
    return {"calls": len(ms), "p50_ms": round(float(np.median(ms)), 4),
            "p99_ms": round(float(np.percentile(ms, 99)), 4)}


def clients(scorer: Scorer, histories: list[list[str]], mode: str, args) -> dict:
    """--clients threads, each sending one history at a time for --client-seconds."""
    latencies: list[float] = []
    lock = threading.Lock()
    stop = time.perf_counter() + args.client_seconds
    batcher = MicroBatcher(lambda hs: scorer.score(hs, k=K), max_batch=256, max_delay_ms=args.max_delay_ms)
    call = (lambda h: batcher.submit(h).result()) if mode == "batcher" else (lambda h: scorer.score([h], k=K))

    def client(offset: int) -> None:
        mine = []
        i = offset
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            call(histories[i % len(histories)])
            mine.append(time.perf_counter() - t0)
            i += args.clients
        with lock:
            latencies.extend(mine)

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    batcher.close()
    return {"clients": args.clients, **summary(np.array(latencies) * 1000),
            "histories_per_s": round(len(latencies) / elapsed, 1)}


# -- report ----------------------------------------------------------------------------------

def table(records: list[dict]) -> str:
    """One line per (catalogue, system): batch-1 latency and its ratio to PyTorch eager,
    throughput per larger batch, and for the client runs their throughput and p99."""
    batches = sorted({r["batch"] for r in records if r.get("batch", 1) > 1})
    head = (f"{'catalogue':11s}{'system':22s}{'b1 p50 ms':>10s}{'b1 p99 ms':>10s}{'vs torch':>9s}"
            + "".join(f"{f'b{b} hist/s':>13s}" for b in batches)
            + f"{'clients hist/s':>15s}{'p99 ms':>9s}{'recall@10':>10s}")
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        groups.setdefault((r["catalogue"], r["system"]), []).append(r)
    lines = [head, "-" * len(head)]
    for (cat, system), rows in groups.items():
        if "skipped" in rows[0]:
            lines.append(f"{cat:11s}{system:22s}  skipped: {rows[0]['skipped']}")
            continue
        by_batch = {r["batch"]: r for r in rows if "batch" in r}
        torch_b1 = groups.get((cat, "torch-eager"), [{}])[0]
        cells = ["", "", ""] + [""] * len(batches) + ["", "", ""]
        if 1 in by_batch:
            b1 = by_batch[1]
            cells[:3] = [f"{b1['p50_ms']:.3f}", f"{b1['p99_ms']:.3f}",
                         f"{b1['p50_ms'] / torch_b1['p50_ms']:.2f}x" if torch_b1.get("batch") == 1 else ""]
        for j, b in enumerate(batches):
            cells[3 + j] = f"{by_batch[b]['histories_per_s']:.0f}" if b in by_batch else ""
        if "clients" in rows[0]:
            cells[-3:-1] = [f"{rows[0]['histories_per_s']:.0f}", f"{rows[0]['p99_ms']:.2f}"]
        if "ann_recall_at_10" in rows[0]:
            cells[-1] = f"{rows[0]['ann_recall_at_10']:.4f}"
        widths = [10, 10, 9] + [13] * len(batches) + [15, 9, 10]
        lines.append(f"{cat:11s}{system:22s}" + "".join(f"{c:>{w}s}" for c, w in zip(cells, widths, strict=True)))
    return "\n".join(lines)


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in records if "batch" in r]
    cats = list(dict.fromkeys(r["catalogue"] for r in timed))
    systems = list(dict.fromkeys(r["system"] for r in timed))
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(1, len(systems))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for j, system in enumerate(systems):
        p50 = [next((r["p50_ms"] for r in timed if r["catalogue"] == c and r["system"] == system
                     and r["batch"] == 1), np.nan) for c in cats]
        colour = colours[j % len(colours)]
        left.bar(np.arange(len(cats)) + j * width, p50, width, label=system, color=colour)
        for c, style in zip(cats, ("-", "--", ":", "-."), strict=False):
            points = sorted((r["batch"], r["histories_per_s"]) for r in timed
                            if r["catalogue"] == c and r["system"] == system)
            if len(points) > 1:
                right.plot(*zip(*points, strict=True), style, marker="o", color=colour, label=f"{system} ({c})")
    left.set(title="latency at batch 1 (p50)", ylabel="ms", yscale="log",
             xticks=np.arange(len(cats)) + 0.4 - width / 2, xticklabels=cats)
    right.set(title="throughput", xlabel="batch", ylabel="histories / s", xscale="log", yscale="log")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
