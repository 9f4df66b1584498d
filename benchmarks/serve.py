"""`mp4sr-rt serve` against the in-process runtime, side by side in one run: throughput and p50 / p99
latency at 1, 8 and 32 concurrent clients, for

    scorer        Scorer.score([history]) called from each client thread (no server, no batching)
    microbatcher  MicroBatcher over Scorer.score (in-process batching, --max-delay-ms)
    http, grpc    Triton Inference Server (mp4sr-rt serve), one tritonclient per client thread

on the same histories (each client cycles through its own share), and where the server's time
goes: Triton's own per-request queue and compute times (its Prometheus counters) against the
latency the clients see. Run it in the serving environment:

    .venv-serve/bin/python benchmarks/serve.py --artifacts mp4sr-out/artifacts --out docs/bench/serve-cpu

Prints JSON lines and a table, and writes OUT.jsonl and OUT.png (with matplotlib installed).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

from mp4sr_rt.batching import MicroBatcher
from mp4sr_rt.manifest import verify_artifacts
from mp4sr_rt.scorer import Scorer
from mp4sr_rt.serving.repository import ServeOptions, artifacts_path, write_models
from mp4sr_rt.serving.server import Ports, TritonServer, free_ports


def histories(artifacts: Path, n: int, seed: int) -> list[list[str]]:
    """Histories of 5 to 50 catalogue items, item popularity-weighted like real logs."""
    vocabulary = json.loads((artifacts / "items.json").read_text())
    items = [str(i) for i in vocabulary["items"]]
    weights = np.asarray(vocabulary["popularity"], np.float64) + 1.0
    rng = np.random.default_rng(seed)
    return [list(rng.choice(items, size=rng.integers(5, 51), p=weights / weights.sum())) for _ in range(n)]


def run_clients(clients: int, requests: int, call) -> tuple[float, list[float]]:
    """`clients` threads issuing `requests` calls in all, `call(client, i)`; (seconds, latencies)."""
    latencies: list[float] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def work(c: int) -> None:
        own = []
        try:
            for i in range(c, requests, clients):
                start = time.perf_counter()
                call(c, i)
                own.append(time.perf_counter() - start)
        except BaseException as e:  # re-raised below: a failed request must not vanish from the figures
            errors.append(e)
        with lock:
            latencies.extend(own)

    threads = [threading.Thread(target=work, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} client(s) failed") from errors[0]
    return time.perf_counter() - start, latencies


def triton_counters(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as r:
        text = r.read().decode()
    out = {}
    for name in ("nv_inference_request_success", "nv_inference_exec_count", "nv_inference_request_duration_us",
                 "nv_inference_queue_duration_us", "nv_inference_compute_infer_duration_us"):
        m = re.search(rf'^{name}{{model="mp4sr",version="1"}} ([0-9.e+]+)$', text, re.M)
        out[name] = float(m.group(1)) if m else 0.0
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` and every process below it (from /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            stats[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        total += stats.get(p, (0, 0.0))[1]
        todo += [c for c, (parent, _) in stats.items() if parent == p]
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", type=Path, default=Path("mp4sr-out/artifacts"))
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--requests", type=int, default=2000, help="requests per system and concurrency")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--max-delay-ms", type=float, default=2.0)
    parser.add_argument("--instances", type=int, default=1)
    parser.add_argument("--max-queue", type=int, default=0, help="the server's queue bound (0: none)")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime threads per server instance")
    parser.add_argument("--out", type=Path, default=None, help="OUT.jsonl and OUT.png")
    args = parser.parse_args()

    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    manifest = verify_artifacts(args.artifacts)
    pool = histories(args.artifacts, args.requests, seed=0)
    scorer = Scorer(args.artifacts)
    http, grpc, metrics = free_ports(3)
    rows = []
    with tempfile.TemporaryDirectory() as repo:
        options = ServeOptions(max_delay_ms=args.max_delay_ms, instances=args.instances, max_queue=args.max_queue,
                               threads=args.threads)
        models = write_models(Path(repo), artifacts_path(args.artifacts), manifest, options)
        with TritonServer(Path(repo), Ports(http, grpc, metrics), models) as server:
            server.wait_ready()
            def remote(mod, url):
                cache = threading.local()  # a tritonclient per thread (the HTTP one is gevent-based)

                def call(c: int, i: int) -> None:
                    if not hasattr(cache, "client"):
                        cache.client = mod.InferenceServerClient(url)
                    h = mod.InferInput("history", [1, len(pool[i])], "BYTES")
                    h.set_data_from_numpy(np.array([pool[i]], dtype=object))
                    k = mod.InferInput("k", [1, 1], "INT32")
                    k.set_data_from_numpy(np.array([[args.k]], np.int32))
                    cache.client.infer("mp4sr", [h, k]).as_numpy("items")
                return call

            for clients in [int(c) for c in args.clients.split(",")]:
                with MicroBatcher(lambda hs: scorer.score(hs, k=args.k), max_batch=256,
                                  max_delay_ms=args.max_delay_ms) as batcher:
                    systems = {
                        "scorer": lambda c, i: scorer.score([pool[i]], k=args.k),
                        "microbatcher": lambda c, i, b=batcher: b.submit(pool[i]).result(),
                        "http": remote(httpclient, f"127.0.0.1:{http}"),
                        "grpc": remote(grpcclient, f"127.0.0.1:{grpc}"),
                    }
                    for name, call in systems.items():
                        run_clients(clients, min(64, args.requests), call)  # warm-up
                        before = triton_counters(metrics) if name in ("http", "grpc") else None
                        server_cpu, own_cpu = cpu_seconds(server.process.pid), time.process_time()
                        seconds, latencies = run_clients(clients, args.requests, call)
                        own_cpu = time.process_time() - own_cpu
                        server_cpu = cpu_seconds(server.process.pid) - server_cpu
                        latencies.sort()
                        row = {"system": name, "clients": clients, "requests": args.requests,
                               "throughput_per_s": round(args.requests / seconds, 1),
                               "p50_ms": round(1000 * statistics.median(latencies), 3),
                               "p99_ms": round(1000 * latencies[int(0.99 * (len(latencies) - 1))], 3),
                               # CPU per request: this process (the clients, or the in-process
                               # scorer) and the server's processes; both share the machine.
                               "client_cpu_ms": round(1000 * own_cpu / args.requests, 3),
                               "server_cpu_ms": round(1000 * server_cpu / args.requests, 3)}
                        if before is not None:
                            after = triton_counters(metrics)
                            d = {k: after[k] - before[k] for k in after}
                            n = max(d["nv_inference_request_success"], 1)
                            per_request = {k: round(d[k] / n / 1000, 3) for k in d}
                            row.update({"server_request_ms": per_request["nv_inference_request_duration_us"],
                                        "server_queue_ms": per_request["nv_inference_queue_duration_us"],
                                        "server_compute_ms": per_request["nv_inference_compute_infer_duration_us"],
                                        "batch_mean": round(n / max(d["nv_inference_exec_count"], 1), 2)})
                        rows.append(row)
                        print(json.dumps(row), flush=True)
    by = {(r["system"], r["clients"]): r for r in rows}
    print(f"\n{manifest.num_items} items, k {args.k}, {args.requests} requests per cell, histories of 5-50 items; "
          f"server: {args.instances} instance(s), max delay {args.max_delay_ms} ms, "
          f"queue bound {args.max_queue or 'none'}")
    print(f"{'system':<13}{'clients':>8}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'vs scorer':>11}"
          f"{'srv req ms':>12}{'srv queue':>11}{'srv compute':>13}{'batch':>7}{'cpu ms: here':>14}{'server':>8}")
    for r in rows:
        ratio = r["throughput_per_s"] / by[("scorer", r["clients"])]["throughput_per_s"]
        print(f"{r['system']:<13}{r['clients']:>8}{r['throughput_per_s']:>10.0f}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}"
              f"{ratio:>10.2f}x{r.get('server_request_ms', float('nan')):>12.3f}"
              f"{r.get('server_queue_ms', float('nan')):>11.3f}{r.get('server_compute_ms', float('nan')):>13.3f}"
              f"{r.get('batch_mean', float('nan')):>7.1f}{r['client_cpu_ms']:>14.3f}{r['server_cpu_ms']:>8.3f}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib is not installed: no plot")
            return
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for name in dict.fromkeys(r["system"] for r in rows):
            mine = [r for r in rows if r["system"] == name]
            axes[0].plot([r["clients"] for r in mine], [r["throughput_per_s"] for r in mine], "o-", label=name)
            axes[1].plot([r["clients"] for r in mine], [r["p99_ms"] for r in mine], "o-", label=name)
        for ax, label in zip(axes, ("requests / s", "p99 latency (ms)"), strict=True):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("concurrent clients")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        axes[0].legend()
        fig.tight_layout()
        fig.savefig(args.out.with_suffix(".png"), dpi=120)


if __name__ == "__main__":
    main()
