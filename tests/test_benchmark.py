"""`mp4sr-rt benchmark`: baselines train, cold-start rows are the held-out targets, finished runs are
skipped on rerun, and the report is written."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import Result
from mp4sr_train.config import TrainConfig, preset, replace
from mp4sr_train.model import M2SE, ItemFeatures
from mp4sr_train.tasks import full_scores, pretrain_loss
from typer.testing import CliRunner

from mp4sr_cli import app

MODELS = "mp4sr,popularity,sasrec,sasrec-features,mp4sr-no-pretrain,text-only"


def run_benchmark_cli(data_dir: Path, out: Path, *extra: str) -> Result:
    args = ["benchmark", "--data", data_dir, "--features", data_dir / "features.safetensors", "--preset", "tiny",
            "--seeds", "2", "--epochs", "1", "--models", MODELS, "--out", out, "--quiet", *extra]
    return CliRunner().invoke(app, list(map(str, args)))


@pytest.fixture(scope="module")
def bench(tiny_data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench") / "bench"
    result = run_benchmark_cli(tiny_data_dir, out)
    assert result.exit_code == 0, result.output
    return out


def test_every_model_produces_finite_metrics(bench):
    out = bench
    for setting in ("normal", "cold-start"):
        for model in MODELS.split(","):
            for seed in (0, 1):
                metrics = json.loads((out / setting / model / f"seed-{seed}" / "metrics.json").read_text())
                assert all(math.isfinite(v) and 0 <= v <= 1 for v in metrics["test"].values()), (setting, model)
                assert metrics["test_users"] > 0


def test_id_only_models_cannot_rank_held_out_items(bench):
    out = bench
    for model in ("popularity", "sasrec"):
        metrics = json.loads((out / "cold-start" / model / "seed-0" / "metrics.json").read_text())
        assert metrics["test"]["recall@20"] == 0.0, model


def test_report_has_a_table_per_setting_and_a_chart(bench):
    out = bench
    report = (out / "results.md").read_text()
    assert "## Normal setting" in report and "## Cold-start setting" in report
    assert "## Cold-start setting, every test user" in report
    assert "SASRec (item IDs only) — cannot score unseen items" in report
    assert "Shortened schedule" in report
    assert "these figures are not used to rank the models" in report and "MP4SR against" not in report
    assert "--epochs 1" in report
    assert (out / "results.png").stat().st_size > 1000


def test_rerun_skips_finished_runs(bench, tiny_data_dir):
    out = bench
    files = sorted(out.glob("*/*/seed-*/metrics.json"))
    before = [f.stat().st_mtime_ns for f in files]
    result = run_benchmark_cli(tiny_data_dir, out)
    assert result.exit_code == 0, result.output
    assert result.stderr.count("finished earlier") == len(files) == 2 * 2 * len(MODELS.split(","))
    assert [f.stat().st_mtime_ns for f in files] == before


def test_cold_start_models_are_also_tested_on_every_user(bench, tiny_data_dir):
    """`test_all`: every test user (the ID-only models rank the trained items' targets); a run finished
    without it gets it on rerun from its best checkpoint, equal to what training computed."""
    out = bench
    normal = json.loads((out / "normal" / "mp4sr" / "seed-0" / "metrics.json").read_text())
    for model in MODELS.split(","):
        metrics = json.loads((out / "cold-start" / model / "seed-0" / "metrics.json").read_text())
        assert metrics["test_all_users"] == normal["test_users"] > metrics["test_users"], model
        assert metrics["test_all"]["recall@20"] > 0, model
    files = [out / "cold-start" / model / "seed-1" / "metrics.json" for model in ("mp4sr", "popularity", "sasrec")]
    written = [json.loads(f.read_text()) for f in files]
    for f, metrics in zip(files, written, strict=True):
        f.write_text(json.dumps({k: v for k, v in metrics.items() if not k.startswith("test_all")}))
    result = run_benchmark_cli(tiny_data_dir, out)
    assert result.exit_code == 0, result.output
    for f, metrics in zip(files, written, strict=True):
        again = json.loads(f.read_text())
        assert again["test_all_users"] == metrics["test_all_users"]
        assert again["test_all"] == pytest.approx(metrics["test_all"], abs=1e-6), f


def test_rerun_with_other_settings_is_refused(bench, tiny_data_dir):
    out = bench
    result = run_benchmark_cli(tiny_data_dir, out, "--cold-fraction", "0.2")
    assert result.exit_code != 0
    assert "holds a run made with other settings" in result.stderr


def test_cold_test_rows_are_exactly_the_held_out_targets(tiny_data_dir, tmp_path):
    from mp4sr_train.benchmark import cold_test
    from mp4sr_train.data import hold_out_items, load_or_preprocess

    data, _ = load_or_preprocess(tiny_data_dir, tmp_path / "cache", 8, 5)
    cold, held = hold_out_items(data, 0.1, seed=0)
    test = cold_test(cold.test, held)
    assert len(test) == int(held[data.test.targets].sum()) > 0
    assert held[test.targets].all()
    assert (cold.train_counts[held] == 0).all()


def test_cold_start_training_never_sees_held_out_items(tiny_data_dir, tmp_path):
    from mp4sr_train.benchmark import drop_items, full_catalogue_ids
    from mp4sr_train.data import hold_out_items, load_or_preprocess
    from mp4sr_train.model import ItemIdEmbedding
    from mp4sr_train.run import load_item_features

    data, _ = load_or_preprocess(tiny_data_dir, tmp_path / "cache", 8, 5)
    feats, _ = load_item_features(tiny_data_dir / "features.safetensors", data, torch.device("cpu"))
    cold, held = hold_out_items(data, 0.1, seed=0)
    reduced, reduced_feats, kept = drop_items(cold, feats, held)
    assert reduced.num_items == data.num_items - held.sum() and not held[kept].any()
    # Re-indexing keeps the training rows and the features of every remaining item.
    np.testing.assert_array_equal(kept[reduced.train.histories], cold.train.histories)
    np.testing.assert_array_equal(kept[reduced.train.targets], cold.train.targets)
    torch.testing.assert_close(reduced_feats.text, feats.text[kept])
    # Validation loses the held-out targets and history items too.
    assert len(reduced.valid) == int((~held[data.valid.targets]).sum())
    assert not held[kept[reduced.valid.histories]][reduced.valid.histories != 0].any()
    # Back in the full catalogue the held-out items have no ID row: features only.
    id_emb = ItemIdEmbedding(reduced.num_items, 4, torch.as_tensor(reduced.train_counts > 0))
    full = full_catalogue_ids(id_emb, kept, data.num_items)
    z_full, z = torch.zeros(1, data.num_items + 1, 4), torch.zeros(1, reduced.num_items + 1, 4)
    torch.testing.assert_close(full(z_full)[kept], id_emb(z))
    assert not full.known[torch.as_tensor(held)].any() and (full(z_full)[torch.as_tensor(held)] == 0).all()


def test_unknown_model_is_one_clear_error(tiny_data_dir, tmp_path):
    result = run_benchmark_cli(tiny_data_dir, tmp_path / "bench", "--models", "mp4sr,bert4rec")
    assert result.exit_code != 0
    assert "unknown bert4rec" in result.stderr


def tiny_feats(n: int = 30, feat: int = 12) -> ItemFeatures:
    g = torch.Generator().manual_seed(0)
    return ItemFeatures(torch.randn(n + 1, 3, feat, generator=g), torch.ones(n + 1, 3, dtype=torch.bool),
                        torch.randn(n + 1, 2, feat, generator=g), torch.ones(n + 1, 2, dtype=torch.bool))


@pytest.mark.parametrize("modality", ["text", "image"])
def test_single_modality_model_uses_only_its_features(modality):
    cfg = replace(preset("tiny"), {"model.modalities": [modality]})
    torch.manual_seed(0)
    model = M2SE(cfg.model, 12).train()
    feats = tiny_feats()
    ids, targets = torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0]]), torch.tensor([7, 9])
    loss, parts = pretrain_loss(model, feats, ids, targets, TrainConfig())
    assert set(parts) == {f"nip_{modality}"}  # no mixup partner, no CMCL
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    # Scaling the other modality's features leaves the scores unchanged.
    unused = "image" if modality == "text" else "text"
    other = dataclasses.replace(feats, **{unused: getattr(feats, unused) * 3})
    model.eval()
    with torch.inference_mode():
        torch.testing.assert_close(full_scores(model, feats, ids), full_scores(model, other, ids))


def test_models_differing_in_fine_tuning_share_one_pre_training(tiny_data_dir, tmp_path):
    out = tmp_path / "bench"
    args = ["benchmark", "--data", tiny_data_dir, "--features", tiny_data_dir / "features.safetensors",
            "--preset", "tiny", "--seeds", "1", "--epochs", "1", "--models", "mp4sr,ids-paper,text-only",
            "--settings", "normal", "--out", out, "--quiet"]
    result = CliRunner().invoke(app, list(map(str, args)))
    assert result.exit_code == 0, result.output
    assert not (out / "cold-start").exists()
    # ids-paper changes only fine-tuning settings: it reuses mp4sr's pre-training; text-only changes the model.
    assert len(list((out / "normal" / "pretrained").iterdir())) == 2
    runs = {m: json.loads((out / "normal" / m / "seed-0" / "metrics.json").read_text()) for m in ("mp4sr", "ids-paper")}
    assert runs["mp4sr"]["epochs"] == runs["ids-paper"]["epochs"] == {"pretrain": 1, "finetune": 1}
    assert runs["mp4sr"]["test"] != runs["ids-paper"]["test"]
    # The shared pre-training's time counts for both models.
    stage = json.loads(next((out / "normal" / "pretrained").glob("*/state.json")).read_text())
    assert all(r["seconds"] > stage["history"][0]["seconds"] > 0 for r in runs.values())
    report = (out / "results.md").read_text()
    assert "## Normal setting" in report and "## Cold-start setting" not in report


def test_unknown_setting_is_one_clear_error(tiny_data_dir, tmp_path):
    result = run_benchmark_cli(tiny_data_dir, tmp_path / "bench", "--settings", "warm")
    assert result.exit_code != 0
    assert "--settings: unknown warm" in result.stderr


def test_findings_compare_mp4sr_with_each_baseline_by_the_spread():
    from mp4sr_train.benchmark import BY_NAME
    from mp4sr_train.report import _findings

    def stats(value: float, std: float) -> dict:
        return {m: (value, std) for m in ("recall@10", "recall@20", "ndcg@10", "ndcg@20")}

    summary = {("normal", "mp4sr"): stats(0.30, 0.01), ("normal", "sasrec"): stats(0.25, 0.01),
               ("normal", "sasrec-features"): stats(0.295, 0.01), ("normal", "popularity"): stats(0.05, 0.0),
               ("normal", "no-cmcl"): stats(0.31, 0.0)}
    models = tuple(BY_NAME[n] for n in ("mp4sr", "popularity", "sasrec", "sasrec-features", "no-cmcl"))
    lines = _findings(summary, "normal", models, shortened=False)
    assert lines[0].startswith("- MP4SR against SASRec (item IDs only): recall@10 0.3000 vs 0.2500 (1.20x, "
                               "ahead by more than one standard deviation)")
    assert "ndcg@20 0.3000 vs 0.2950 (1.02x, within one standard deviation)" in lines[1]
    assert lines[2].startswith("- MP4SR, no CMCL (lambda = 0) is not behind the default MP4SR")
    assert len(lines) == 3  # popularity is no comparison worth a line
    one_seed = _findings(summary, "normal", models, shortened=False, seeds=1)
    assert "recall@10 0.3000 vs 0.2500 (1.20x, one seed: no spread measured)" in one_seed[0]
    assert _findings(summary, "normal", models, shortened=True) == [
        "- Shortened schedule: these figures are not used to rank the models."]


def test_every_model_override_names_a_config_key_of_every_preset():
    from mp4sr_train import config as config_lib
    from mp4sr_train.benchmark import MODELS

    for name in ("demo", "tiny", "paper"):
        cfg = config_lib.preset(name)
        for spec in MODELS:
            changed = config_lib.replace(cfg, spec.overrides)
            for dotted, value in spec.overrides.items():
                node = config_lib.to_dict(changed)
                for key in dotted.split("."):
                    node = node[key]
                expected = tuple(value) if isinstance(value, list) else value  # sequences load as tuples
                assert node == expected, (name, spec.name, dotted)


def test_first_seed_runs_the_later_seeds_that_a_run_over_all_of_them_reuses(tiny_data_dir, tmp_path):
    out = tmp_path / "bench"
    common = ["benchmark", "--data", tiny_data_dir, "--features", tiny_data_dir / "features.safetensors",
              "--preset", "tiny", "--epochs", "1", "--models", "popularity,sasrec", "--settings", "normal",
              "--out", out, "--quiet"]
    later = CliRunner().invoke(app, list(map(str, [*common, "--first-seed", "1", "--seeds", "1"])))
    assert later.exit_code == 0, later.output
    assert sorted(p.name for p in (out / "normal" / "sasrec").iterdir()) == ["seed-1"]
    every = CliRunner().invoke(app, list(map(str, [*common, "--seeds", "2"])))
    assert every.exit_code == 0, every.output
    assert every.stderr.count("finished earlier") == 2  # seed 1 of both models; seed 0 trained now
    assert "Seeds 0, 1" in (out / "results.md").read_text()
