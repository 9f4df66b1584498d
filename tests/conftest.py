"""Shared fixtures: a tiny seeded demo dataset and a tiny trained run, built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    from train.data import demo_features, generate_demo

    out = generate_demo(tmp_path_factory.mktemp("demo") / "data", n_items=60, n_users=120, seed=0)
    demo_features(out, out / "features.safetensors", dim=12)
    return out


@pytest.fixture(scope="session")
def tiny_run(tiny_data_dir, tmp_path_factory) -> Path:
    """A trained tiny run directory (pre-training + fine-tuning, 2 epochs each)."""
    from train.config import preset
    from train.run import train

    out = tmp_path_factory.mktemp("run") / "run"
    train(preset("tiny"), tiny_data_dir, tiny_data_dir / "features.safetensors", out, progress=False)
    return out


ARTIFACTS_TOP_K = 20  # < the 60 tiny items, so excluding seen items can exhaust the scorer's top K


@pytest.fixture(scope="session")
def tiny_artifacts(tiny_run, tmp_path_factory) -> Path:
    """The tiny run exported once per session."""
    from export.run import export

    out = tmp_path_factory.mktemp("artifacts") / "artifacts"
    export(tiny_run, out, top_k=ARTIFACTS_TOP_K)
    return out
