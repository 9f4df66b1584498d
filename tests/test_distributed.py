"""Training across processes: `mp4sr-rt train --nproc 2` (torchrun, DistributedDataParallel, gloo)
against a single process with the same global batch, and a 2-process run killed and resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

CLI = [sys.executable, "-m", "mp4sr_cli", "train"]
# No random draws that depend on the batch's split across ranks (dropout, item drop, mixup, ID
# dropout): then a 2-process step is the single-process step up to summation order.
DETERMINISTIC = ["--set", "model.dropout=0", "--set", "model.adaptor_dropout=0", "--set", "train.drop_max=0",
                 "--set", "train.use_mixup=false", "--set", "train.ids.dropout=0"]
# The stated tolerance: test metrics absolute; weights max |diff|. Summation order differs across
# ranks, and where a gradient is near zero Adam turns that noise into steps of about lr (1e-3)
# either way: 1e-2 is ten such steps over the run's 64.
TOLERANCE = {"metrics": 0.01, "weights": 1e-2}


def train(data: Path, out: Path, *extra: object, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [*CLI, "--preset", "tiny", "--data", data, "--features", data / "features.safetensors", "--out", out,
           "--quiet", *DETERMINISTIC, *extra]
    r = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, timeout=600)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.mark.parametrize("softmax", ["full", "sampled"])
def test_two_processes_train_what_one_process_trains(tiny_data_dir, tmp_path, softmax):
    path = ["--set", f"train.softmax.kind={softmax}", "--set", "train.softmax.negatives=16"]
    train(tiny_data_dir, tmp_path / "one", *path)
    r = train(tiny_data_dir, tmp_path / "two", "--nproc", 2, *path)
    assert "distributed: 2 processes (gloo)" in r.stderr
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    for key, value in one["finetune"]["test"].items():
        assert abs(two["finetune"]["test"][key] - value) <= TOLERANCE["metrics"], key
    assert one["finetune"]["best_epoch"] == two["finetune"]["best_epoch"]
    a = load_file(str(tmp_path / "one" / "stages" / "finetune" / "best.safetensors"))
    b = load_file(str(tmp_path / "two" / "stages" / "finetune" / "best.safetensors"))
    assert a.keys() == b.keys()
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a if a[k].numel())
    assert worst <= TOLERANCE["weights"], worst
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())


def worker_ranks(out: Path) -> dict[int, int]:
    """{rank: pid} of the torchrun workers training into `out`."""
    ranks = {}
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(out).encode() in cmdline and any(v.startswith(b"TORCHELASTIC_RUN_ID=") for v in environ):
            rank = next(int(v.split(b"=")[1]) for v in environ if v.startswith(b"RANK="))
            ranks[rank] = int(entry.name)
    return ranks


EPOCHS = ["--epochs", 25, "--set", "train.pretrain.patience=25", "--set", "train.finetune.patience=25"]


@pytest.fixture(scope="module")
def whole(tiny_data_dir, tmp_path_factory) -> Path:
    """An uninterrupted 2-process run of 25 + 25 epochs."""
    out = tmp_path_factory.mktemp("whole") / "run"
    train(tiny_data_dir, out, "--nproc", 2, *EPOCHS)
    return out


@pytest.mark.parametrize("victim", [1, 0])
def test_a_killed_two_process_run_resumes_to_the_uninterrupted_result(tiny_data_dir, whole, tmp_path, victim):
    epochs = EPOCHS
    out = tmp_path / "killed"
    cmd = [*CLI, "--preset", "tiny", "--data", tiny_data_dir, "--features", tiny_data_dir / "features.safetensors",
           "--out", out, "--quiet", *DETERMINISTIC, "--nproc", 2, *epochs]
    launcher = subprocess.Popen(list(map(str, cmd)), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state = out / "stages" / "pretrain" / "state.json"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and launcher.poll() is None:
        try:
            if json.loads(state.read_text())["epoch"] >= 2:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    assert launcher.poll() is None, "the run ended before it could be killed"
    ranks = worker_ranks(out)
    assert sorted(ranks) == [0, 1], ranks
    os.kill(ranks[victim], signal.SIGKILL)
    assert launcher.wait(120) != 0
    epoch = json.loads(state.read_text())["epoch"]
    assert epoch < 25 and not (out / "metrics.json").exists()
    r = train(tiny_data_dir, out, "--nproc", 2, "--resume", *epochs)
    assert r.returncode == 0
    reference = json.loads((whole / "metrics.json").read_text())
    resumed = json.loads((out / "metrics.json").read_text())
    for key, value in reference["finetune"]["test"].items():
        assert abs(resumed["finetune"]["test"][key] - value) <= TOLERANCE["metrics"], key
    a = load_file(str(whole / "checkpoint" / "model.safetensors"))
    b = load_file(str(out / "checkpoint" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert max(float((a[k].float() - b[k].float()).abs().max()) for k in a if a[k].numel()) <= TOLERANCE["weights"]
