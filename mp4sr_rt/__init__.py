"""mp4sr_rt: the MP4SR serving runtime (numpy + onnxruntime, never torch, train or export).

    from mp4sr_rt import Scorer, MicroBatcher
    scorer = Scorer("mp4sr-out/artifacts")       # backend="auto" | "cpu" | "cuda" | "tensorrt"
    rec = scorer.score([["item00012", "item00007"]], k=10)[0]
    with MicroBatcher(lambda hs: scorer.score(hs, k=10)) as batcher:
        rec = batcher.submit(["item00012"]).result()       # from many threads at once

Names are imported on first use, so `mp4sr-rt --help` does not pay for numpy and onnxruntime.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Scorer": "mp4sr_rt.scorer",
    "Recommendation": "mp4sr_rt.scorer",
    "MicroBatcher": "mp4sr_rt.batching",
    "Overloaded": "mp4sr_rt.batching",
    "BatcherClosed": "mp4sr_rt.batching",
    "parse_histories": "mp4sr_rt.histories",
    "UserError": "mp4sr_rt.errors",
    "ArtifactError": "mp4sr_rt.errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mp4sr_rt' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
