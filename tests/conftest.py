"""Shared fixtures: a tiny seeded demo dataset and a tiny trained run, built once per session."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    from mp4sr_train.data import demo_features, generate_demo

    out = generate_demo(tmp_path_factory.mktemp("demo") / "data", n_items=60, n_users=120, seed=0)
    demo_features(out, out / "features.safetensors", dim=12)
    return out


@pytest.fixture(scope="session")
def tiny_run(tiny_data_dir, tmp_path_factory) -> Path:
    """A trained tiny run directory (pre-training + fine-tuning, 2 epochs each)."""
    from mp4sr_train.config import preset
    from mp4sr_train.run import train

    out = tmp_path_factory.mktemp("run") / "run"
    train(preset("tiny"), tiny_data_dir, tiny_data_dir / "features.safetensors", out, progress=False)
    return out


ARTIFACTS_TOP_K = 20  # < the 60 tiny items, so excluding seen items can exhaust the scorer's top K


@pytest.fixture(scope="session")
def tiny_artifacts(tiny_run, tmp_path_factory) -> Path:
    """The tiny run exported once per session."""
    from mp4sr_export.run import export

    out = tmp_path_factory.mktemp("artifacts") / "artifacts"
    export(tiny_run, out, top_k=ARTIFACTS_TOP_K)
    return out


TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="session")
def extractor_run(tiny_run, tiny_data_dir, tmp_path_factory) -> Path:
    """The tiny run, its features re-described as made by `mp4sr-rt features` with a tiny BERT
    (12-d, like the run's features) and a tiny CLIP: what the export reads to find the extractors."""
    import torch
    from mp4sr_train.data import read_dataset
    from mp4sr_train.features.cache import FeatureCache
    from mp4sr_train.features.extract import extract
    from mp4sr_train.features.image import Clip
    from mp4sr_train.features.store import read_features
    from mp4sr_train.features.text import TextEncoder, resolve_checkpoint
    from transformers import BertConfig, BertModel

    tmp_path = tmp_path_factory.mktemp("extractors")
    bert = tmp_path / "bert"
    bert.mkdir()
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(resolve_checkpoint(None) / name, bert / name)
    torch.manual_seed(0)
    BertModel(BertConfig(hidden_size=12, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
                         max_position_embeddings=64)).save_pretrained(bert)
    clip_config = tmp_path / "tiny-clip.json"
    clip_config.write_text(json.dumps(TINY_CLIP))
    with FeatureCache(tmp_path / "cache") as cache:
        extract(read_dataset(tiny_data_dir), tmp_path / "features.safetensors", TextEncoder.load(bert),
                Clip.load(str(clip_config)), cache=cache, image_tokens=3, progress=False)
    meta = read_features(tmp_path / "features.safetensors").meta
    run = tmp_path / "run"
    shutil.copytree(tiny_run / "checkpoint", run / "checkpoint")
    sidecar = json.loads((run / "checkpoint" / "config.json").read_text())
    sidecar["features"] = {k: v for k, v in meta.items() if k != "item_ids"}
    sidecar["data"] = str(tiny_data_dir)
    (run / "checkpoint" / "config.json").write_text(json.dumps(sidecar))
    return run


@pytest.fixture(scope="session")
def extractor_artifacts(extractor_run, tmp_path_factory) -> Path:
    """extractor_run exported (fp32) with its text and image encoders."""
    from mp4sr_export.run import export

    out = tmp_path_factory.mktemp("extractor-artifacts") / "artifacts"
    export(extractor_run, out, top_k=ARTIFACTS_TOP_K)
    return out
