"""`mp4sr-rt serve`: the runtime behind Triton Inference Server (HTTP and gRPC, Open Inference
Protocol), and `mp4sr-rt catalogue add|remove`: catalogue changes committed to the artifacts.

    mp4sr-rt serve mp4sr-out/artifacts --http-port 8000 --grpc-port 8001 --metrics-port 8002
    mp4sr-rt serve --repository triton-repo       # a repository written by `export --triton`
    mp4sr-rt catalogue add mp4sr-out/artifacts new-items.jsonl
    mp4sr-rt catalogue remove mp4sr-out/artifacts item00042 item00043
"""

from __future__ import annotations

import re
import signal
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from mp4sr_rt.commands import user_errors
from mp4sr_rt.errors import UserError

if TYPE_CHECKING:
    from mp4sr_rt.serving.repository import ServeOptions
    from mp4sr_rt.serving.server import Ports

DEFAULT_ARTIFACTS = Path("mp4sr-out/artifacts")
BACKENDS = ("auto", "cpu", "cuda")


def python_models(repository: Path) -> list[str]:
    """The Python-backend models of a repository: what this server can load (Triton's
    onnxruntime backend is not in the nvidia-pytriton wheel)."""
    if not repository.is_dir():
        raise UserError(f"no model repository at {repository}")
    names = sorted(p.parent.name for p in repository.glob("*/config.pbtxt")
                   if re.search(r'^backend:\s*"python"', p.read_text(encoding="utf-8"), re.M))
    if not names:
        raise UserError(f"{repository}: no Python-backend model (write one with `mp4sr-rt export --triton`)")
    return names


@user_errors
def serve(
    artifacts: Annotated[Path, typer.Argument(help="Artifact directory written by `mp4sr-rt export`.")]
    = DEFAULT_ARTIFACTS,
    http_port: Annotated[int, typer.Option("--http-port", min=1, max=65535)] = 8000,
    grpc_port: Annotated[int, typer.Option("--grpc-port", min=1, max=65535)] = 8001,
    metrics_port: Annotated[int, typer.Option("--metrics-port", min=1, max=65535,
                                              help="Prometheus metrics at /metrics.")] = 8002,
    max_batch: Annotated[int, typer.Option("--max-batch", min=1, help="Histories per batch.")] = 256,
    max_delay_ms: Annotated[float, typer.Option(
        "--max-delay-ms", min=0, help="How long a request may wait for others to batch with.")] = 2.0,
    max_queue: Annotated[int, typer.Option(
        "--max-queue", min=0, help="Waiting requests beyond this are refused at once (overload); 0: no "
                                   "bound. A bound costs latency in Triton 2.51 (README).")] = 0,
    backend: Annotated[str, typer.Option("--backend", help="auto | cpu | cuda.")] = "auto",
    instances: Annotated[int, typer.Option("--instances", min=1, help="Model instances (processes).")] = 1,
    threads: Annotated[int, typer.Option(
        "--threads", min=0, help="onnxruntime threads per instance (0: one per core).")] = 0,
    repository: Annotated[Path | None, typer.Option(
        "--repository", help="Serve this model repository (from `export --triton`) as it is; "
                             "ARTIFACTS and the batching options are then its own.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", help="Triton's log on the terminal.")] = False,
) -> None:
    """Serve recommendations over HTTP and gRPC on Triton Inference Server until SIGTERM or Ctrl-C."""
    from mp4sr_rt.serving.repository import ServeOptions
    from mp4sr_rt.serving.server import Ports, distribution

    if backend not in BACKENDS:
        raise UserError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    ports = Ports(http_port, grpc_port, metrics_port)
    if len(set(vars(ports).values())) != 3:
        raise UserError(f"the HTTP, gRPC and metrics ports must differ, got {ports}")
    distribution()  # fail before any work if Triton is not installed
    # Until the server serves (TritonServer.wait forwards it from then on), SIGTERM stops like
    # Ctrl-C: the with-blocks below unwind, removing the server and its temporary files.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        _serve(artifacts, repository, ports, ServeOptions(max_batch, max_delay_ms, max_queue, backend, instances,
                                                          threads), verbose)
    except KeyboardInterrupt:
        print("stopped before the server was ready", file=sys.stderr)
        return
    finally:
        signal.signal(signal.SIGTERM, previous)
    print("stopped", file=sys.stderr)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _serve(artifacts: Path, repository: Path | None, ports: Ports, options: ServeOptions, verbose: bool) -> None:
    from mp4sr_rt.manifest import verify_artifacts
    from mp4sr_rt.serving.repository import artifacts_path, write_models
    from mp4sr_rt.serving.server import TritonServer

    with tempfile.TemporaryDirectory(prefix="mp4sr-repository-") as temporary:
        if repository is None:
            manifest = verify_artifacts(artifacts)
            repository = Path(temporary)
            models = write_models(repository, artifacts_path(artifacts), manifest, options)
        else:
            models = python_models(repository)
        start = time.perf_counter()
        with TritonServer(repository, ports, models, verbose=verbose) as server:
            server.wait_ready()
            print(f"serving {', '.join(models)} in {time.perf_counter() - start:.1f} s: "
                  f"HTTP :{ports.http}, gRPC :{ports.grpc}, metrics http://localhost:{ports.metrics}/metrics "
                  "(Ctrl-C or SIGTERM stops, finishing requests in flight)", file=sys.stderr, flush=True)
            status = server.wait()
            if status != 0:
                raise UserError(f"tritonserver exited with status {status}:\n{server.log_tail()}")


catalogue_app = typer.Typer(help="Add or remove catalogue items; the change persists in the artifacts.",
                            no_args_is_help=True)


@catalogue_app.command("add")
@user_errors
def catalogue_add(
    artifacts: Annotated[Path, typer.Argument(help="Artifact directory.")],
    items: Annotated[Path | None, typer.Argument(
        help="items.jsonl (item_id, text fields, images relative to the file), through the "
             "artifacts' text and image encoders.")] = None,
    features: Annotated[Path | None, typer.Option(
        "--features", help=".npz of precomputed features: ids (strings), text_feats, text_mask, "
                           "image_feats, image_mask (as add_items takes them).")] = None,
) -> None:
    """Add items: recommendable and usable in histories at once, by this and every running server."""
    from mp4sr_rt import catalogue
    from mp4sr_rt.commands.score import add_new_items
    from mp4sr_rt.scorer import Scorer

    if (items is None) == (features is None):
        raise UserError("give an items.jsonl file or --features FILE.npz (one of the two)")
    scorer = Scorer(artifacts)
    if items is not None:
        version = catalogue.update(scorer, lambda s: add_new_items(s, items))
    else:
        ids, arrays = _read_new_features(features)
        version = catalogue.update(scorer, lambda s: s.add_items(ids, **arrays))
    print(f"catalogue version {version}: {scorer.num_items} items, {len(scorer.removed)} removed",
          file=sys.stderr)


def _read_new_features(path: Path) -> tuple[list[str], dict[str, Any]]:
    """(ids, feature arrays) of a `catalogue add --features` file, checked."""
    import numpy as np

    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise UserError(f"{path}: one array (.npy); expected an .npz of named arrays: ids, text_feats, ...")
        with loaded as f:
            arrays = {name: f[name] for name in f.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(f"{path}: not a readable .npz file ({e})") from None
    ids = arrays.pop("ids", None)
    if ids is None or ids.ndim != 1 or ids.dtype.kind not in "Uiu":
        raise UserError(f"{path}: needs a 1-d array 'ids' of strings or integers")
    keys = [str(i) for i in ids.tolist()]
    bad = next((k for k in keys if not k or k != k.strip()), None)
    if bad is not None:
        raise UserError(f"{path}: item id {bad!r} is empty or has leading or trailing spaces")
    return keys, arrays


@catalogue_app.command("remove")
@user_errors
def catalogue_remove(
    artifacts: Annotated[Path, typer.Argument(help="Artifact directory.")],
    ids: Annotated[list[str], typer.Argument(help="Item ids never to recommend again.")],
) -> None:
    """Remove items (sold out, withdrawn): never recommended again; they still count in histories."""
    from mp4sr_rt import catalogue
    from mp4sr_rt.scorer import Scorer

    scorer = Scorer(artifacts)
    version = catalogue.update(scorer, lambda s: s.remove_items(ids))
    print(f"catalogue version {version}: {scorer.num_items} items, {len(scorer.removed)} removed",
          file=sys.stderr)
