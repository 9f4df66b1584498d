"""The export command of `mp4sr-rt` (assembled by mp4sr_cli): a trained run directory -> ONNX
artifacts + manifest (docs/artifacts.md). torch and the exporter are imported inside the command."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from mp4sr_rt.commands import user_errors


@user_errors
def export(
    run_dir: Path = typer.Argument(Path("mp4sr-out"), help="Run directory written by `mp4sr-rt train`."),
    out: Path | None = typer.Option(None, help="Artifact directory (default: RUN_DIR/artifacts), replaced atomically."),
    fp16: bool = typer.Option(False, help="fp16 weights and compute inside, fp32 inputs and outputs."),
    top_k: int = typer.Option(100, help="Largest k the scorer returns (callers slice smaller k)."),
    max_batch: int = typer.Option(4096, help="Largest batch for the TensorRT profile and Triton."),
    trt: bool = typer.Option(False, help="Also build TensorRT engines (needs TensorRT >= 10 and a GPU)."),
    triton: Path | None = typer.Option(None, help="Also write a Triton model repository to this directory."),
    topk_block: int = typer.Option(
        0, help="Top k in two stages over blocks of this many items (0: one top k over the "
                "catalogue). Exact; for GPUs, where one top k over a large catalogue is slow."),
    int8_scan: int = typer.Option(
        0, metavar="CANDIDATES",
        help="Scan the catalogue in int8 and rescore this many candidates in full precision "
             "(0: off). For large catalogues on the CPU; the runtime rescans the rare history "
             "whose top k the int8 error bound cannot certify."),
    ann: str = typer.Option(
        "none", help="Also build a FAISS index over the item table for approximate top k: ivf, ivf-pq "
                     "(the fastest at 1M items, README), hnsw or none. Its search setting is tuned until "
                     "--ann-recall is met (else the export fails)."),
    ann_recall: float = typer.Option(
        0.99, help="Recall of the exact top k (k = --ann-k, and 10) the index must reach on held-out histories."),
    ann_k: int = typer.Option(0, help="The k of --ann-recall (0: --top-k); the k a service asks for."),
    encoders: bool = typer.Option(
        True, help="Also export the text and image encoders the run's features were made with "
                   "(new items from raw text and images); --no-encoders leaves them out."),
) -> None:
    """Export the run's model to ONNX behind a parity gate; prints a JSON summary on stdout."""
    from mp4sr_export.config import ExportConfig
    from mp4sr_export.run import export as run_export

    config = ExportConfig(fp16=fp16, top_k=top_k, max_batch=max_batch, trt=trt, topk_block=topk_block,
                          int8_scan=int8_scan, encoders=encoders, triton_dir=triton, ann=ann, ann_recall=ann_recall,
                          ann_k=ann_k)
    manifest = run_export(run_dir, out, config)
    out = out if out is not None else run_dir / "artifacts"
    print(json.dumps({"artifacts": str(out), "triton": str(triton) if triton else None,
                      "precision": manifest.precision, "top_k": manifest.top_k,
                      "modalities": list(manifest.modalities), "parity": manifest.parity}))
