"""What `mp4sr-rt export` is asked to build, checked once (export/run.py reads it, nothing else).

    config = ExportConfig(fp16=True, top_k=50)       # UserError naming the option if out of range
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mp4sr_rt.ann import KINDS as ANN_KINDS
from mp4sr_rt.errors import UserError


@dataclass(frozen=True)
class ExportConfig:
    fp16: bool = False  # fp16 weights and compute inside the recommender models, fp32 inputs and outputs
    top_k: int = 100  # the largest k the scorer returns (at most the catalogue: clamped with a note)
    max_batch: int = 4096  # largest batch of the TensorRT profile and of Triton
    trt: bool = False  # also build TensorRT engines
    topk_block: int = 0  # > 0: the scorer's top k in two stages over blocks of this many items
    int8_scan: int = 0  # > 0: scan the catalogue in int8 and rescore this many candidates
    encoders: bool = True  # also export the text / image encoders the run's features came from
    triton_dir: Path | None = None  # also write a Triton model repository there
    ann: str = "none"  # ivf | ivf-pq | hnsw: also a FAISS index over the table, for approximate top k
    ann_recall: float = 0.99  # the recall@k of the exact top k the index must reach (export --ann-recall)
    ann_k: int = 0  # the k of that contract (0: top_k); recall@10 is held to the target too

    def __post_init__(self) -> None:
        for name in ("top_k", "max_batch", "topk_block", "int8_scan", "ann_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise UserError(f"--{name.replace('_', '-')}: expected an integer, got {value!r}")
        for name, low in (("top_k", 1), ("max_batch", 1), ("topk_block", 0), ("int8_scan", 0), ("ann_k", 0)):
            if getattr(self, name) < low:
                raise UserError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(self, name)}")
        if self.topk_block and self.int8_scan:
            raise UserError("--topk-block and --int8-scan are two ways to scan the catalogue: choose one")
        if self.ann != "none" and self.ann not in ANN_KINDS:
            raise UserError(f"--ann: expected {', '.join(ANN_KINDS)} or none, got {self.ann!r}")
        if isinstance(self.ann_recall, bool) or not isinstance(self.ann_recall, (int, float)) or \
                not 0 < self.ann_recall <= 1:
            raise UserError(f"--ann-recall must lie in (0, 1], got {self.ann_recall!r}")
        if self.triton_dir is not None:
            object.__setattr__(self, "triton_dir", Path(self.triton_dir))

    @property
    def precision(self) -> str:
        return "fp16" if self.fp16 else "fp32"
