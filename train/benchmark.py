"""Baselines, ablations and the cold-start setting on one split, over several seeds.

    options = BenchmarkOptions(cfg=preset("demo"), seeds=(0, 1, 2), out=Path("mp4sr-bench"))
    result = run_benchmark(options)           # one metrics.json per setting / model / seed
    write_report(result, options, Path("mp4sr-bench/results.md"), "how it was run")  # train/report.py

Settings:
    normal      train on the leave-one-out split, test on every user's last item
    cold-start  train without a seeded fraction of the items (hold_out_items, then a catalogue
                without them), test on the users whose last item is one of them, ranking the whole
                catalogue: those items are scored from features only (SPEC section 4), which models
                without features cannot do. The same models are also tested on every user
                ("test_all"): there the new items must rank where they belong and no higher, which a
                model biased for or against items without an ID row cannot fake

Results directory (a run with a metrics.json is finished and skipped on rerun; one killed during
training resumes from its last completed epoch):
    <out>/<setting>/<model>/seed-<s>/run.json, stages/finetune/, metrics.json
    <out>/<setting>/pretrained/seed-<s>-<hash>/   pre-training, shared by the models whose
                                      settings differ in fine-tuning only (config.FINETUNE_ONLY)
    <out>/cache/                      preprocessed split
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mp4sr_train import config as config_lib
from mp4sr_train.baselines import SASRec
from mp4sr_train.checkpoint import load_state
from mp4sr_train.config import Config
from mp4sr_train.data import hold_out_items, load_or_preprocess
from mp4sr_train.data.preprocess import _strip_items
from mp4sr_train.data.types import Split, SplitData
from mp4sr_train.loop import (
    StageRunner,
    evaluate,
    evaluate_popularity,
    resolve_device,
    run_fingerprint,
    stored_fingerprint,
)
from mp4sr_train.model import M2SE, ItemFeatures, ItemIdEmbedding
from mp4sr_train.run import features_digest, load_item_features, log, resolve_inputs
from safetensors.torch import load_file

from mp4sr_rt.errors import UserError
from mp4sr_rt.io import write_json_atomic

SETTINGS = ("normal", "cold-start")
METRICS = ("recall@10", "recall@20", "ndcg@10", "ndcg@20")


@dataclass(frozen=True)
class ModelSpec:
    name: str  # --models name and directory name
    label: str  # name in the report
    role: str  # "MP4SR", "baseline" or "ablation"
    kind: str = "mp4sr"  # "popularity", "sasrec", "sasrec-features" or "mp4sr"
    pretrain: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted config overrides
    id_only: bool = False  # cannot score items unseen in training


def ablation(name: str, label: str, key: str, value: Any) -> ModelSpec:
    """MP4SR, pre-trained and fine-tuned, with one config value changed."""
    return ModelSpec(name, f"MP4SR, {label}", "ablation", pretrain=True, overrides={key: value})


_PAPER_IDS = dataclasses.asdict(config_lib.PAPER_IDS)
MODELS = (
    ModelSpec("mp4sr", "MP4SR", "MP4SR", pretrain=True),
    ModelSpec("popularity", "Popularity", "baseline", kind="popularity", id_only=True),
    # The baselines keep their published form: the plain N(0, 0.02) ID embedding.
    ModelSpec("sasrec", "SASRec (item IDs only)", "baseline", kind="sasrec", id_only=True,
              overrides={"train.ids": _PAPER_IDS}),
    ModelSpec("sasrec-features", "SASRecM (IDs + mean-pooled features)", "baseline", kind="sasrec-features",
              overrides={"train.ids": _PAPER_IDS}),
    ModelSpec("mp4sr-no-pretrain", "MP4SR without pre-training", "baseline"),
    ablation("no-mixup", "no sequence mixup", "train.use_mixup", False),
    ablation("no-cmcl", "no CMCL (lambda = 0)", "train.cmcl_weight", 0.0),
    ablation("no-nip", "no NIP", "train.use_nip", False),
    ablation("text-only", "text only", "model.modalities", ["text"]),
    ablation("image-only", "image only", "model.modalities", ["image"]),
    ablation("reference-quirks", "reference_quirks on", "train.reference_quirks", True),
    ablation("pretrain-absent", "pre-training on absent modalities too", "train.skip_absent_modalities", False),
    ablation("ids-paper", "the paper's ID embedding (scale 1, no ID dropout, none for new items)",
             "train.ids", _PAPER_IDS),
    ablation("ids-scale-1", "ID scale 1", "train.ids.scale", 1.0),
    ablation("ids-scale-3", "ID scale 3", "train.ids.scale", 3.0),
    ablation("ids-scale-30", "ID scale 30", "train.ids.scale", 30.0),
    ablation("ids-no-dropout", "no ID dropout", "train.ids.dropout", 0.0),
    ablation("ids-dropout-0.5", "ID dropout 0.5", "train.ids.dropout", 0.5),
    ablation("ids-no-projection", "no ID rows from features (zero for new items)", "train.ids.from_features", False),
    ablation("ids-untied", "candidate ID rows of their own (untied)", "train.ids.candidate_rows", "untied"),
    ablation("ids-residual", "candidate ID rows = input rows + a learned difference", "train.ids.candidate_rows",
             "residual"),
    ModelSpec("ids-untied-pretrain-3", "MP4SR, untied candidate ID rows, pre-training up to 3 epochs", "ablation",
              pretrain=True, overrides={"train.ids.candidate_rows": "untied", "train.pretrain.epochs": 3}),
    ablation("encoder-lr-0.1", "fine-tuning the encoders at 0.1 x lr", "train.finetune_encoder_lr", 0.1),
    ablation("encoder-lr-0", "the pre-trained encoders frozen in fine-tuning", "train.finetune_encoder_lr", 0.0),
    ablation("encoder-lr-0.3", "fine-tuning the encoders at 0.3 x lr", "train.finetune_encoder_lr", 0.3),
    ModelSpec("encoder-lr-0.1-40", "MP4SR, fine-tuning the encoders at 0.1 x lr, up to 40 epochs", "ablation",
              pretrain=True, overrides={"train.finetune_encoder_lr": 0.1, "train.finetune.epochs": 40}),
    ablation("pop-smooth-0.1", "popularity smoothing 0.1", "train.popularity_smoothing", 0.1),
    ablation("pop-smooth-0.3", "popularity smoothing 0.3", "train.popularity_smoothing", 0.3),
    # The baselines with popularity smoothing 0.3: that change is judged against baselines given it too.
    ModelSpec("sasrec-pop-smooth-0.3", "SASRec (item IDs only), popularity smoothing 0.3", "baseline", kind="sasrec",
              id_only=True, overrides={"train.ids": _PAPER_IDS, "train.popularity_smoothing": 0.3}),
    ModelSpec("sasrec-features-pop-smooth-0.3", "SASRecM (IDs + mean-pooled features), popularity smoothing 0.3",
              "baseline", kind="sasrec-features",
              overrides={"train.ids": _PAPER_IDS, "train.popularity_smoothing": 0.3}),
    ablation("tau-0.1", "temperature 0.1 (both stages)", "train.tau", 0.1),
    ablation("tau-0.05", "temperature 0.05 (both stages)", "train.tau", 0.05),
    ablation("dropout-0.5", "transformer dropout 0.5", "model.dropout", 0.5),
    ablation("width-128", "width d 128", "model.d", 128),
    ablation("pretrain-30", "pre-training up to 30 epochs", "train.pretrain.epochs", 30),
    ablation("pretrain-3", "pre-training up to 3 epochs", "train.pretrain.epochs", 3),
    ModelSpec("finetune-lr-3e-4", "MP4SR, fine-tuning lr 3e-4 for up to 40 epochs", "ablation", pretrain=True,
              overrides={"train.finetune.lr": 3e-4, "train.finetune.epochs": 40}),
    # The preset's learning rate, given time: the demo's fine-tuning stops at patience 4 while
    # validation NDCG@10 still climbs.
    ModelSpec("finetune-60-patience-12", "MP4SR, fine-tuning up to 60 epochs, patience 12", "ablation",
              pretrain=True, overrides={"train.finetune.epochs": 60, "train.finetune.patience": 12}),
    # The baselines at the fine-tuning schedule of finetune-lr-3e-4: a schedule change is judged
    # against baselines given the same schedule.
    ModelSpec("sasrec-lr-3e-4", "SASRec (item IDs only), lr 3e-4 for up to 40 epochs", "baseline", kind="sasrec",
              id_only=True,
              overrides={"train.ids": _PAPER_IDS, "train.finetune.lr": 3e-4, "train.finetune.epochs": 40}),
    ModelSpec("sasrec-features-lr-3e-4", "SASRecM (IDs + mean-pooled features), lr 3e-4 for up to 40 epochs",
              "baseline", kind="sasrec-features",
              overrides={"train.ids": _PAPER_IDS, "train.finetune.lr": 3e-4, "train.finetune.epochs": 40}),
    # The baselines with candidate ID rows of their own, as ids-untied gives MP4SR: whether a gain
    # from untying is MP4SR's or any ID model's.
    ModelSpec("sasrec-untied", "SASRec (item IDs only), untied candidate ID rows", "baseline", kind="sasrec",
              id_only=True, overrides={"train.ids": {**_PAPER_IDS, "candidate_rows": "untied"}}),
    ModelSpec("sasrec-features-untied", "SASRecM (IDs + mean-pooled features), untied candidate ID rows", "baseline",
              kind="sasrec-features", overrides={"train.ids": {**_PAPER_IDS, "candidate_rows": "untied"}}),
    # The large-catalogue training path forced on a small catalogue, against the exact softmax.
    ModelSpec("sampled-softmax", "MP4SR, sampled softmax (512 shared uniform negatives, log-Q)", "ablation",
              pretrain=True, overrides={"train.softmax.kind": "sampled", "train.softmax.negatives": 512}),
)
BY_NAME = {spec.name: spec for spec in MODELS}


def select_settings(names: str) -> tuple[str, ...]:
    """'all' or comma-separated setting names -> those settings, in the report's order."""
    if names.strip() == "all":
        return SETTINGS
    wanted = {n.strip() for n in names.split(",") if n.strip()}
    if not wanted or not wanted <= set(SETTINGS):
        raise UserError(f"--settings: unknown {', '.join(sorted(wanted - set(SETTINGS))) or 'empty list'}; "
                        f"choose 'all' or among: {', '.join(SETTINGS)}")
    return tuple(s for s in SETTINGS if s in wanted)


def select_models(names: str) -> tuple[ModelSpec, ...]:
    """'all' or comma-separated model names -> their specs, in the report's order."""
    if names.strip() == "all":
        return MODELS
    wanted = {n.strip() for n in names.split(",") if n.strip()}
    unknown = sorted(wanted - set(BY_NAME))
    if unknown or not wanted:
        raise UserError(f"--models: unknown {', '.join(unknown) or 'empty list'}; choose 'all' or among: "
                        f"{', '.join(BY_NAME)}")
    return tuple(spec for spec in MODELS if spec.name in wanted)


@dataclass(frozen=True)
class BenchmarkOptions:
    cfg: Config  # the preset, with any epoch override; each run sets its own seed and overrides
    seeds: tuple[int, ...]
    out: Path
    models: tuple[ModelSpec, ...] = MODELS
    data: Path | None = None  # None: the built-in demo dataset
    features: Path | None = None
    cold_fraction: float = 0.1
    settings: tuple[str, ...] = SETTINGS
    device: str = "auto"
    progress: bool = True


@dataclass
class Inputs:
    """What every run shares: the split, the item features and what identifies them."""

    data: SplitData
    feats: ItemFeatures
    data_key: str
    features_sha: str  # of the values (features_digest)
    features_meta: dict[str, str]
    device: torch.device

    def describe(self) -> str:
        """The data and the features in words, for the report."""
        meta = self.features_meta
        text = (f"{self.data.num_items} items, {len(self.data.user_ids)} users, {len(self.data.train)} training "
                f"sequences; features: {meta.get('dim', '?')}-d from {meta.get('encoder', '?')}")
        if meta.get("clip_model", "none") != "none":
            untrained = meta.get("clip_weights", "null") == "null"
            weights = "a randomly initialised tower (no --clip-weights)" if untrained else "trained weights"
            text += f", image words chosen by CLIP {meta['clip_model']} with {weights}"
        if self.feats.present() != ("text", "image"):
            text += f"; modalities present: {', '.join(self.feats.present()) or 'none'}"
        return text


@dataclass
class BenchmarkResult:
    runs: list[dict[str, Any]]  # one metrics.json each
    inputs: str  # Inputs.describe()


def cold_test(test: Split, held: np.ndarray) -> Split:
    """The test rows whose target is a held-out item."""
    rows = held[test.targets]
    return Split(histories=test.histories[rows], targets=test.targets[rows])


@dataclass
class SettingData:
    """What one setting trains on and tests on."""

    data: SplitData  # counts and splits in the full catalogue's index space
    train_data: SplitData  # what training sees: in the cold-start setting, a catalogue without the held-out items
    train_feats: ItemFeatures
    kept: np.ndarray | None  # full index of each training-catalogue item (row 0 padding); None: the same catalogue
    test: Split  # full catalogue

    @property
    def test_all(self) -> Split | None:
        """Cold-start setting: every test user, whatever the target (None in the normal setting)."""
        return None if self.kept is None else self.data.test


def drop_items(data: SplitData, feats: ItemFeatures, held: np.ndarray) -> tuple[SplitData, ItemFeatures, np.ndarray]:
    """The catalogue without the `held` items, re-indexed: training never sees them, neither as
    targets nor as negatives of the full-catalogue softmax nor in validation, like items added after
    training. Returns the data, the features and the full index of each remaining item."""
    kept = np.flatnonzero(~held)  # row 0 (padding) is never held out
    new_index = np.cumsum(~held) - 1  # full index -> training-catalogue index, for kept items

    def reindex(split: Split) -> Split:
        split = _strip_items(split, held)
        return Split(histories=new_index[split.histories], targets=new_index[split.targets])

    reduced = SplitData(
        item_ids=tuple(data.item_ids[i - 1] for i in kept[1:]), user_ids=data.user_ids,
        train=reindex(data.train), valid=reindex(data.valid), test=reindex(data.test),
        train_counts=data.train_counts[kept],
    )
    rows = torch.as_tensor(kept, device=feats.text.device)
    return reduced, ItemFeatures(*(t[rows] for t in (feats.text, feats.text_mask, feats.image, feats.image_mask))), kept


def setting_data(inputs: Inputs, setting: str, fraction: float, seed: int) -> SettingData:
    """Training and test data of a setting; the cold-start items are drawn with the run's seed."""
    if setting == "normal":
        return SettingData(inputs.data, inputs.data, inputs.feats, None, inputs.data.test)
    data, held = hold_out_items(inputs.data, fraction, seed)
    test = cold_test(data.test, held)
    if not len(test):
        raise UserError(f"cold-start: no test target is among the {int(held.sum())} held-out items "
                        f"(seed {seed}); raise --cold-fraction")
    return SettingData(data, *drop_items(data, inputs.feats, held), test)


def full_catalogue_ids(id_emb: ItemIdEmbedding, kept: np.ndarray, num_items: int) -> ItemIdEmbedding:
    """Trained ID rows placed in the full catalogue; the items training never saw get none."""
    rows = torch.as_tensor(kept, device=id_emb.weight.device)
    known = torch.zeros(num_items + 1, dtype=torch.bool, device=rows.device)
    known[rows] = id_emb.known
    full = copy.deepcopy(id_emb)  # the same settings and feature projection, if any
    full.known = known
    for name in ("weight", "out_weight") if id_emb.untied else ("weight",):
        trained = getattr(id_emb, name)
        setattr(full, name, torch.nn.Parameter(trained.new_zeros(num_items + 1, trained.shape[1])))
        with torch.no_grad():
            getattr(full, name)[rows] = trained
    return full


def build_model(spec: ModelSpec, cfg: Config, feat_dim: int) -> torch.nn.Module:
    if spec.kind == "mp4sr":
        return M2SE(cfg.model, feat_dim)
    return SASRec(cfg.model, feat_dim, use_features=spec.kind == "sasrec-features")


def train_and_test(
    spec: ModelSpec, cfg: Config, inputs: Inputs, sd: SettingData, directory: Path, pretrained: Path,
    progress: bool,
) -> dict[str, Any]:
    """Pre-train (if the model does) in `pretrained`, fine-tune in `directory` and test; both stages
    resume from their last epoch, and a finished pre-training is loaded rather than repeated."""
    if spec.kind == "popularity":
        return {**popularity_metrics(sd), "epochs": {}, "seconds": 0.0}
    torch.manual_seed(cfg.train.seed)
    model = build_model(spec, cfg, inputs.feats.text.shape[-1]).to(inputs.device)
    epochs, seconds, id_emb = {}, 0.0, None
    for stage in ("pretrain", "finetune") if spec.pretrain else ("finetune",):
        if stage == "finetune":  # created here, as in `train`: pre-training draws nothing for it
            # Items unseen in training get no trained ID row (SPEC section 4).
            known = torch.as_tensor(sd.train_data.train_counts > 0)
            modalities = len(cfg.model.modalities) if spec.kind == "mp4sr" else 1
            id_emb = ItemIdEmbedding.create(cfg.train.ids, sd.train_data.num_items, cfg.model.d, known,
                                            modalities).to(inputs.device)
        runner = StageRunner(
            stage, getattr(cfg.train, stage), cfg, model, id_emb, sd.train_feats, sd.train_data,
            pretrained if stage == "pretrain" else directory / "stages" / stage, progress,
            encoder_lr=cfg.train.finetune_encoder_lr if stage == "finetune" and spec.pretrain else 1.0,
        )
        runner.resume()
        result = runner.run()
        epochs[stage], seconds = len(result.history), seconds + result.seconds
    return {**test_metrics(model, id_emb, cfg, inputs, sd), "epochs": epochs, "seconds": seconds}


def test_metrics(
    model: torch.nn.Module, id_emb: ItemIdEmbedding | None, cfg: Config, inputs: Inputs, sd: SettingData,
) -> dict[str, Any]:
    """The test metrics of a trained model: "test", and in the cold-start setting "test_all" too."""
    if sd.kept is not None:
        id_emb = full_catalogue_ids(id_emb, sd.kept, sd.data.num_items)
    result = {"test": evaluate(model, inputs.feats, sd.test, cfg.train.eval_batch_size, id_emb)}
    if sd.test_all is not None:
        result["test_all"] = evaluate(model, inputs.feats, sd.test_all, cfg.train.eval_batch_size, id_emb)
        result["test_all_users"] = len(sd.test_all)
    return result


def load_trained(spec: ModelSpec, cfg: Config, inputs: Inputs, sd: SettingData, directory: Path,
                 ) -> tuple[torch.nn.Module, ItemIdEmbedding]:
    """A finished run's model and ID embedding (training catalogue) from its best checkpoint."""
    model = build_model(spec, cfg, inputs.feats.text.shape[-1]).to(inputs.device)
    known = torch.as_tensor(sd.train_data.train_counts > 0)
    modalities = len(cfg.model.modalities) if spec.kind == "mp4sr" else 1
    id_emb = ItemIdEmbedding.create(cfg.train.ids, sd.train_data.num_items, cfg.model.d, known,
                                    modalities).to(inputs.device)
    tensors = load_file(str(directory / "stages" / "finetune" / "best.safetensors"), device=str(inputs.device))
    load_state(tensors, model, id_emb)
    return model.eval(), id_emb


def load_finished(name: str, setting: str, seed: int, inputs: Inputs, options: BenchmarkOptions,
                  ) -> tuple[torch.nn.Module, ItemIdEmbedding, SettingData]:
    """The model of a finished run in `options.out`, its ID embedding over the full catalogue (in
    the cold-start setting, the held-out items have no trained row) and the setting's data."""
    spec = BY_NAME[name]
    cfg = config_lib.replace(options.cfg, {**spec.overrides, "train.seed": seed})
    if spec.kind == "mp4sr":
        cfg, _ = config_lib.present_modalities(cfg, inputs.feats.present())
    sd = setting_data(inputs, setting, options.cold_fraction, seed)
    model, id_emb = load_trained(spec, cfg, inputs, sd, options.out / setting / name / f"seed-{seed}")
    if sd.kept is not None:
        id_emb = full_catalogue_ids(id_emb, sd.kept, sd.data.num_items)
    return model, id_emb, sd


def popularity_metrics(sd: SettingData) -> dict[str, Any]:
    result = {"test": evaluate_popularity(sd.data, sd.test)}
    if sd.test_all is not None:
        result["test_all"], result["test_all_users"] = evaluate_popularity(sd.data, sd.test_all), len(sd.test_all)
    return result


def pretrained_dir(options: BenchmarkOptions, setting: str, cfg: Config, inputs: Inputs) -> Path:
    """Where a pre-training lives: shared by the models whose runs differ in fine-tuning settings only."""
    key = {"config": config_lib.pretrain_view(cfg), "data": inputs.data_key, "features": inputs.features_sha,
           "cold_fraction": options.cold_fraction if setting == "cold-start" else None}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return options.out / setting / "pretrained" / f"seed-{cfg.train.seed}-{digest}"


def run_one(
    spec: ModelSpec, setting: str, seed: int, inputs: Inputs, options: BenchmarkOptions,
) -> tuple[dict[str, Any], bool]:
    """One setting / model / seed: its metrics and whether they were computed now (False: a finished
    run was found)."""
    directory = options.out / setting / spec.name / f"seed-{seed}"
    cfg = config_lib.replace(options.cfg, {**spec.overrides, "train.seed": seed})
    if spec.kind == "mp4sr":  # the baselines pool every modality's features whatever the config says
        cfg, _ = config_lib.present_modalities(cfg, inputs.feats.present())
    fingerprint = {
        **run_fingerprint(cfg, inputs.data_key, inputs.features_sha),
        "stage": "all" if spec.pretrain else "finetune", "model": spec.name, "setting": setting,
        "cold_fraction": options.cold_fraction if setting == "cold-start" else None,
    }
    claim(directory, fingerprint)
    metrics_file = directory / "metrics.json"
    if metrics_file.is_file():
        metrics = json.loads(metrics_file.read_text())
        if setting == "cold-start" and "test_all" not in metrics:  # finished before "test_all" existed
            sd = setting_data(inputs, setting, options.cold_fraction, seed)
            if spec.kind == "popularity":
                metrics.update(popularity_metrics(sd))
            else:
                metrics.update(test_metrics(*load_trained(spec, cfg, inputs, sd, directory), cfg, inputs, sd))
            write_json_atomic(metrics_file, metrics)
        return metrics, False
    sd = setting_data(inputs, setting, options.cold_fraction, seed)
    pretrained = pretrained_dir(options, setting, cfg, inputs)
    result = train_and_test(spec, cfg, inputs, sd, directory, pretrained, options.progress)
    # "seconds": training and validation time of every epoch of both stages (a shared pre-training
    # counts for each model that uses it), not the wall time of this call.
    metrics = {"model": spec.name, "setting": setting, "seed": seed, "test_users": len(sd.test),
               "device": str(inputs.device), **result}
    write_json_atomic(metrics_file, metrics)
    return metrics, True


def claim(directory: Path, fingerprint: dict[str, Any]) -> None:
    """Record what a run directory holds; refuse to mix runs made with other settings."""
    run_file = directory / "run.json"
    expected = json.loads(json.dumps(fingerprint))  # tuples -> lists, as read back
    if run_file.is_file():
        if stored_fingerprint(run_file) != expected:
            raise UserError(f"{directory} holds a run made with other settings (config, data or features); "
                            "choose another --out or delete that directory")
        return
    directory.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_file, expected)


def load_inputs(options: BenchmarkOptions) -> Inputs:
    data_path, features_path = resolve_inputs(options.data, options.features)
    cfg = options.cfg
    data, _ = load_or_preprocess(data_path, options.out / "cache", cfg.data.max_len, cfg.data.min_interactions)
    device = resolve_device(options.device)
    feats, meta = load_item_features(features_path, data, device)
    return Inputs(data, feats, str(data_path.resolve()), features_digest(feats), meta, device)


def run_benchmark(options: BenchmarkOptions) -> BenchmarkResult:
    """Every selected model in both settings for every seed; returns their metrics."""
    inputs = load_inputs(options)
    log(f"benchmark: {inputs.describe()} | {len(options.models)} models x {len(options.settings)} settings "
        f"x {len(options.seeds)} seeds | {options.out}")
    runs = [(setting, spec, seed) for seed in options.seeds for setting in options.settings
            for spec in options.models]
    results = []
    for i, (setting, spec, seed) in enumerate(runs, 1):
        metrics, ran = run_one(spec, setting, seed, inputs, options)
        status = f"{metrics['seconds']:.0f} s" if ran else "finished earlier"
        test = metrics["test"]
        log(f"[{i}/{len(runs)}] {setting} / {spec.name} / seed {seed}: recall@20 {test['recall@20']:.4f} "
            f"ndcg@20 {test['ndcg@20']:.4f} ({status})")
        results.append(metrics)
    return BenchmarkResult(results, inputs.describe())
