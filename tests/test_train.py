"""Training end to end: the CLI, the run directory, resume after a kill, and bad inputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from mp4sr_train import config as config_lib
from mp4sr_train.config import preset

from mp4sr_rt.errors import UserError

CLI = [sys.executable, "-m", "mp4sr_cli"]


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=600)


def test_tiny_run_directory(tiny_run):
    ckpt = tiny_run / "checkpoint"
    for name in ("model.safetensors", "items.safetensors", "config.json"):
        assert (ckpt / name).is_file()
    sidecar = json.loads((ckpt / "config.json").read_text())
    assert sidecar["schema"] == "mp4sr-checkpoint/1"
    assert config_lib.from_dict(sidecar["config"]) == preset("tiny")
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    for k in (5, 10, 20, 50):
        for m in ("recall", "ndcg", "mrr"):
            assert 0.0 <= metrics["finetune"]["test"][f"{m}@{k}"] <= 1.0
    assert "popularity" in metrics["baselines"]
    assert (tiny_run / "curves.png").stat().st_size > 1000


def test_checkpoint_roundtrip_scores_identically(tiny_run, tiny_data_dir, tmp_path):
    import torch
    from mp4sr_train.checkpoint import load_checkpoint, save_checkpoint
    from mp4sr_train.data import load_or_preprocess
    from mp4sr_train.loop import evaluate
    from mp4sr_train.run import load_item_features
    from mp4sr_train.tasks import full_scores

    ckpt = load_checkpoint(tiny_run / "checkpoint")
    data, _ = load_or_preprocess(tiny_data_dir, tiny_run / "cache", 8, 5)
    feats, _ = load_item_features(tiny_data_dir / "features.safetensors", data, torch.device("cpu"))
    with torch.inference_mode():
        torch.testing.assert_close(ckpt.model.encode_items(feats), ckpt.z)
        # The loaded model reproduces the test metrics training reported, figure for figure.
        metrics = json.loads((tiny_run / "metrics.json").read_text())
        reported = metrics["finetune"]["test"]
        assert evaluate(ckpt.model, feats, data.test, 128, ckpt.id_emb) == pytest.approx(reported, abs=1e-6)
        ids = torch.as_tensor(data.test.histories[:16])
        s = full_scores(ckpt.model, feats, ids, ckpt.id_emb)
    # Saved again and reloaded: the same scores, bit for bit.
    save_checkpoint(tmp_path / "again", ckpt)
    again = load_checkpoint(tmp_path / "again")
    with torch.inference_mode():
        torch.testing.assert_close(full_scores(again.model, feats, ids, again.id_emb), s, rtol=0, atol=0)


def test_cli_train_tiny_then_refuses_to_clobber(tiny_data_dir, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--preset", "tiny", "--data", tiny_data_dir, "--features",
            tiny_data_dir / "features.safetensors", "--out", out, "--epochs", "1", "--quiet"]
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    assert "NDCG@10 vs popularity" in r.stderr
    again = run_cli(*args)
    assert again.returncode == 2 and "--resume" in again.stderr and "Traceback" not in again.stderr
    resumed = run_cli(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "finished earlier" in resumed.stderr

    # A run (and checkpoint) written before a setting existed resumes and loads as one with its
    # default, which is what it trained with; a run made with another value is still refused.
    for path in (out / "run.json", out / "checkpoint" / "config.json"):
        stored = json.loads(path.read_text())
        assert stored["config"]["train"]["ids"].pop("candidate_rows") == "tied"
        path.write_text(json.dumps(stored))
    assert run_cli(*args, "--resume").returncode == 0
    from mp4sr_train.checkpoint import load_checkpoint

    assert not load_checkpoint(out / "checkpoint").id_emb.untied
    stored = json.loads((out / "run.json").read_text())
    stored["config"]["train"]["ids"]["candidate_rows"] = "untied"
    (out / "run.json").write_text(json.dumps(stored))
    refused = run_cli(*args, "--resume")
    assert refused.returncode == 2 and "different config" in refused.stderr


@pytest.mark.parametrize(("change", "message"), [
    (lambda m: [], "expected a JSON object, got list"),
    (lambda m: {**m, "features": None}, "features: expected an object"),
    (lambda m: {**m, "config": []}, "config: expected dict"),
    (lambda m: {**m, "item_ids": "abc"}, "item_ids: expected list"),
    (lambda m: {**m, "item_ids": m["item_ids"][:-1]}, "item_ids: expected \\d+ distinct"),
    (lambda m: {**m, "item_ids": [m["item_ids"][0], *m["item_ids"][:-1]]}, "item_ids: expected \\d+ distinct"),
    (lambda m: {**m, "train_counts": [-1] * len(m["train_counts"])}, "train_counts: expected \\d+ counts >= 0"),
    (lambda m: {**m, "stage": "bogus"}, "stage: expected pretrain or finetune"),
    (lambda m: {**m, "num_items": True}, "num_items: expected a positive integer"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_a_damaged_checkpoint_sidecar_is_named(tiny_run, tmp_path, change, message):
    import shutil

    from mp4sr_train.checkpoint import load_checkpoint

    ckpt = shutil.copytree(tiny_run / "checkpoint", tmp_path / "checkpoint")
    sidecar = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps(change(sidecar)))
    with pytest.raises(UserError, match=message):
        load_checkpoint(ckpt)


def test_resume_and_overwrite_together_are_refused(tmp_path):
    r = run_cli("train", "--out", tmp_path / "run", "--preset", "tiny", "--resume", "--overwrite")
    assert r.returncode == 2 and "choose one" in r.stderr and not (tmp_path / "run").exists()


def test_resume_after_kill_matches_uninterrupted_run(tiny_data_dir, tmp_path, monkeypatch):
    from mp4sr_train import loop
    from mp4sr_train.run import train

    cfg = config_lib.replace(preset("tiny"), {"train.pretrain.epochs": 2, "train.finetune.epochs": 2})
    feats = tiny_data_dir / "features.safetensors"
    full = train(cfg, tiny_data_dir, feats, tmp_path / "full", progress=False)

    calls = {"n": 0}
    real_epoch = loop.StageRunner._epoch

    def dying_epoch(self, epoch):
        calls["n"] += 1
        if calls["n"] == 3:  # killed during the first fine-tuning epoch
            raise KeyboardInterrupt
        return real_epoch(self, epoch)

    monkeypatch.setattr(loop.StageRunner, "_epoch", dying_epoch)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tiny_data_dir, feats, tmp_path / "killed", progress=False)
    monkeypatch.setattr(loop.StageRunner, "_epoch", real_epoch)
    resumed = train(cfg, tiny_data_dir, feats, tmp_path / "killed", resume=True, progress=False)
    assert resumed["finetune"]["test"] == pytest.approx(full["finetune"]["test"], abs=1e-6)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "/nonexistent/interactions.csv", "--features", "/nonexistent/f.safetensors"], "not found"),
        (["--preset", "huge"], "unknown preset"),
        (["--stage", "everything"], "unknown stage"),
        (["--device", "tpu"], "unknown device"),
        (["--epochs", "-3"], "Invalid value for '--epochs'"),
        (["--seed", "-1"], "config train.seed: expected an integer between 0 and"),
    ],
)
def test_cli_bad_input_is_one_clear_error(args, message, tmp_path):
    r = run_cli("train", "--out", tmp_path / "run", *args)
    assert r.returncode != 0
    assert message in r.stderr
    assert "Traceback" not in r.stderr


def test_features_file_that_does_not_match_the_data(tiny_data_dir, tmp_path):
    import numpy as np
    from mp4sr_train.features.store import FeatureArrays, read_features, save_features

    arrays = read_features(tiny_data_dir / "features.safetensors")
    keep = slice(0, len(arrays.item_ids) // 2)
    partial = FeatureArrays(arrays.item_ids[keep], *(np.asarray(getattr(arrays, k))[keep] for k in
                            ("text_feats", "text_mask", "image_feats", "image_mask")), meta=arrays.meta)
    save_features(tmp_path / "half.safetensors", partial)
    r = run_cli("train", "--preset", "tiny", "--data", tiny_data_dir, "--features",
                tmp_path / "half.safetensors", "--out", tmp_path / "run")
    assert r.returncode == 2 and "have no features" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    r = run_cli("train", "--preset", "tiny", "--data", tiny_data_dir, "--features",
                tmp_path / "junk.safetensors", "--out", tmp_path / "run2")
    assert r.returncode == 2 and "unreadable" in r.stderr


@pytest.mark.parametrize("key, value, message", [
    ("train.finetune.epochs", -3, "train.finetune.epochs: expected an integer >= 1, got -3"),
    ("train.pretrain.epochs", 2.5, "train.pretrain.epochs: expected an integer, got 2.5"),
    ("train.pretrain.lr", 0.0, "train.pretrain.lr: expected a number between"),
    ("train.tau", "0.07", "train.tau: expected a number, got '0.07'"),
    ("train.tau", float("nan"), "train.tau: expected a number, got nan"),
    ("train.ids.dropout", 1.0, "train.ids.dropout: expected a number between 0 and 0.99"),
    ("train.eval_batch_size", True, "train.eval_batch_size: expected an integer, got True"),
    ("model.d", 63, "model.d: 63 is not a multiple of n_heads (2)"),
    ("model.dropout", -0.1, "model.dropout: expected a number between 0 and 0.99"),
    ("data.min_interactions", 2, "data.min_interactions: expected an integer >= 3"),
])
def test_config_values_out_of_range_name_their_key(key, value, message):
    with pytest.raises(config_lib.UserError, match="config " + message.replace("(", r"\(").replace(")", r"\)")):
        config_lib.replace(preset("demo"), {key: value})


def test_config_rejects_unknown_keys():
    with pytest.raises(config_lib.UserError, match="unknown key"):
        config_lib.replace(preset("tiny"), {"train.pretrain.epochz": 3})
    with pytest.raises(config_lib.UserError, match="unknown key"):
        config_lib.from_dict({**config_lib.to_dict(preset("tiny")), "extra": 1})


def test_stages_run_separately_chain_through_the_run_directory(tiny_data_dir, tmp_path):
    base = ["train", "--preset", "tiny", "--data", tiny_data_dir, "--features",
            tiny_data_dir / "features.safetensors", "--out", tmp_path / "run", "--epochs", "1", "--quiet"]
    pre = run_cli(*base, "--stage", "pretrain")
    assert pre.returncode == 0, pre.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert "test" in metrics["pretrain"] and "finetune" not in metrics
    fine = run_cli(*base, "--stage", "finetune", "--resume")
    assert fine.returncode == 0, fine.stderr
    assert "starting from the pre-trained weights" in fine.stderr
    assert json.loads((tmp_path / "run" / "checkpoint" / "config.json").read_text())["stage"] == "finetune"


def test_paper_preset_keeps_the_paper_id_embedding_and_old_checkpoints_load_as_such(tiny_run, tmp_path):
    import shutil

    from mp4sr_train.checkpoint import load_checkpoint
    from safetensors.torch import load_file, save_file

    assert preset("paper").train.ids == config_lib.PAPER_IDS
    assert preset("demo").train.ids == config_lib.IdConfig()
    assert config_lib.IdConfig() != config_lib.PAPER_IDS
    # A checkpoint written before the ID settings existed was trained with the paper's embedding.
    old = tmp_path / "checkpoint"
    shutil.copytree(tiny_run / "checkpoint", old)
    sidecar = json.loads((old / "config.json").read_text())
    sidecar["config"]["train"].pop("ids")
    (old / "config.json").write_text(json.dumps(sidecar))
    projection = {"id_emb.project.weight", "id_emb.project.bias"}
    tensors = {k: v for k, v in load_file(str(old / "model.safetensors")).items() if k not in projection}
    save_file(tensors, str(old / "model.safetensors"))
    ckpt = load_checkpoint(old)
    assert ckpt.cfg.train.ids == config_lib.PAPER_IDS and ckpt.id_emb.project is None


def test_a_stored_config_without_a_setting_added_since_reads_as_the_run_made_it():
    values = config_lib.to_dict(preset("demo"))
    values["train"].pop("finetune_encoder_lr")
    values["train"]["ids"].pop("candidate_rows")
    upgraded = config_lib.from_dict(config_lib.upgrade(values))
    assert upgraded.train.finetune_encoder_lr == 1.0 and upgraded.train.ids.candidate_rows == "tied"
    assert "finetune_encoder_lr" not in values["train"]  # the input is left as it was
    values["train"].pop("ids")
    assert config_lib.from_dict(config_lib.upgrade(values)).train.ids == config_lib.PAPER_IDS
    # A value the stored config has is kept.
    kept = config_lib.to_dict(config_lib.replace(preset("demo"), {"train.finetune_encoder_lr": 0.5}))
    assert config_lib.from_dict(config_lib.upgrade(kept)).train.finetune_encoder_lr == 0.5


def test_fine_tuning_trains_the_pre_trained_encoders_at_their_own_learning_rate(tiny_data_dir, tmp_path):
    """`encoder_lr` (train.finetune_encoder_lr when fine-tuning a pre-trained model): the model's
    parameters step at lr times it, the ID embedding at lr; 0 freezes the encoders."""
    import torch
    from mp4sr_train.data import load_or_preprocess
    from mp4sr_train.loop import StageRunner
    from mp4sr_train.model import M2SE, ItemIdEmbedding
    from mp4sr_train.run import load_item_features

    cfg = preset("tiny")
    data, _ = load_or_preprocess(tiny_data_dir, tmp_path / "cache", cfg.data.max_len, cfg.data.min_interactions)
    feats, _ = load_item_features(tiny_data_dir / "features.safetensors", data, torch.device("cpu"))
    model = M2SE(cfg.model, feats.dim)
    id_emb = ItemIdEmbedding.create(cfg.train.ids, data.num_items, cfg.model.d,
                                    torch.as_tensor(data.train_counts > 0), len(cfg.model.modalities))
    runner = StageRunner("finetune", cfg.train.finetune, cfg, model, id_emb, feats, data, tmp_path / "ft",
                         progress=False, encoder_lr=0.0)
    assert [g["lr"] for g in runner.optimizer.param_groups] == [0.0, cfg.train.finetune.lr]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids_before = id_emb.weight.detach().clone()
    runner.run()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not torch.equal(id_emb.weight.detach(), ids_before)


def test_popularity_smoothing_with_the_sampled_softmax_is_one_clear_error(tiny_data_dir, tmp_path):
    r = run_cli("train", "--preset", "tiny", "--data", tiny_data_dir, "--features",
                tiny_data_dir / "features.safetensors", "--out", tmp_path / "run", "--epochs", "1", "--quiet",
                "--stage", "finetune", "--set", "train.popularity_smoothing=0.2",
                "--set", "train.softmax.kind=sampled")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "train.popularity_smoothing needs the full softmax" in r.stderr


def test_data_without_enough_users_fails_before_features_or_out_are_made(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "interactions.csv").write_text("user_id,item_id,timestamp\nu1,a,1\nu1,b,2\nu2,a,3\n")
    (data / "items.jsonl").write_text('{"item_id": "a", "title": "A red tent"}\n')
    r = run_cli("train", "--preset", "tiny", "--data", data, "--out", tmp_path / "run")
    assert r.returncode == 2 and "no user has at least 5 interactions" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()
    assert sorted(p.name for p in data.iterdir()) == ["interactions.csv", "items.jsonl"]  # no features written


def test_a_loaded_checkpoint_saved_again_records_its_own_hash(tiny_run, tmp_path):
    from mp4sr_train.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(tiny_run / "checkpoint")
    ckpt.meta["model_sha256"] = "stale"
    save_checkpoint(tmp_path / "again", ckpt)
    again = json.loads((tmp_path / "again" / "config.json").read_text())
    from mp4sr_rt.manifest import file_sha256

    assert again["model_sha256"] == file_sha256(tmp_path / "again" / "model.safetensors") != "stale"
    assert load_checkpoint(tmp_path / "again").item_ids == ckpt.item_ids


def test_cli_works_from_a_folder_with_its_own_train_and_export_modules(tiny_data_dir, tmp_path):
    """`python -m` puts the working folder first on sys.path: a user's train.py / export.py there
    must not shadow the installed packages (they install as mp4sr_train and mp4sr_export)."""
    work = tmp_path / "work"
    work.mkdir()
    for name in ("train", "export", "mp4sr"):
        (work / f"{name}.py").write_text(f"raise SystemExit('the user {name}.py was imported')\n")
    (work / "history.json").write_text('[["item00001", "item00002"]]\n')
    trained = run_cli("train", "--preset", "tiny", "--data", tiny_data_dir, "--features",
                      tiny_data_dir / "features.safetensors", "--out", "run", "--epochs", "1", "--quiet", cwd=work)
    assert trained.returncode == 0, trained.stderr
    exported = run_cli("export", "run", "--out", "artifacts", cwd=work)
    assert exported.returncode == 0, exported.stderr
    scored = run_cli("score", "history.json", "--artifacts", "artifacts", "-k", "3", cwd=work)
    assert scored.returncode == 0, scored.stderr
    assert len(json.loads(scored.stdout)[0]["items"]) == 3
