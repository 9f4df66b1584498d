"""Baselines, ablations and the cold-start setting on one split, over several seeds.

    options = BenchmarkOptions(cfg=preset("demo"), seeds=(0, 1, 2), out=Path("mp4sr-bench"))
    result = run_benchmark(options)           # one metrics.json per setting / model / seed
    write_report(result, options, Path("mp4sr-bench/results.md"), "how it was run")  # + results.png

Settings:
    normal      train on the leave-one-out split, test on every user's last item
    cold-start  train without a seeded fraction of the items (hold_out_items, then a catalogue
                without them), test on the users whose last item is one of them, ranking the whole
                catalogue: those items are scored from features only (SPEC section 4), which models
                without features cannot do

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

from mp4sr_rt.errors import UserError
from mp4sr_rt.io import atomic_write, write_json_atomic, write_text_atomic
from train import config as config_lib
from train.baselines import SASRec
from train.config import Config
from train.data import hold_out_items, load_or_preprocess
from train.data.preprocess import _strip_items
from train.data.types import Split, SplitData
from train.loop import StageRunner, evaluate, evaluate_popularity, resolve_device, run_fingerprint
from train.model import M2SE, ItemFeatures, ItemIdEmbedding
from train.run import features_digest, load_item_features, log, resolve_inputs

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


def ablation(name: str, label: str, key: str, value: Any, **more: Any) -> ModelSpec:
    """MP4SR, pre-trained and fine-tuned, with config values changed (`more`: further dotted keys
    with their dots written as double underscores)."""
    overrides = {key: value, **{k.replace("__", "."): v for k, v in more.items()}}
    return ModelSpec(name, f"MP4SR, {label}", "ablation", pretrain=True, overrides=overrides)


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
    ablation("ids-no-dropout", "no ID dropout", "train.ids.dropout", 0.0),
    ablation("ids-dropout-0.5", "ID dropout 0.5", "train.ids.dropout", 0.5),
    ablation("ids-no-projection", "no ID rows from features (zero for new items)", "train.ids.from_features", False),
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
    full.weight = torch.nn.Parameter(id_emb.weight.new_zeros(num_items + 1, id_emb.weight.shape[1]))
    full.known = known
    with torch.no_grad():
        full.weight[rows] = id_emb.weight
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
        return {"test": evaluate_popularity(sd.data, sd.test), "epochs": {}, "seconds": 0.0}
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
        )
        runner.resume()
        result = runner.run()
        epochs[stage], seconds = len(result.history), seconds + result.seconds
    if sd.kept is not None:
        id_emb = full_catalogue_ids(id_emb, sd.kept, sd.data.num_items)
    test = evaluate(model, inputs.feats, sd.test, cfg.train.eval_batch_size, id_emb)
    return {"test": test, "epochs": epochs, "seconds": seconds}


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
    fingerprint = {
        **run_fingerprint(cfg, inputs.data_key, inputs.features_sha),
        "stage": "all" if spec.pretrain else "finetune", "model": spec.name, "setting": setting,
        "cold_fraction": options.cold_fraction if setting == "cold-start" else None,
    }
    claim(directory, fingerprint)
    metrics_file = directory / "metrics.json"
    if metrics_file.is_file():
        return json.loads(metrics_file.read_text()), False
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
        if json.loads(run_file.read_text()) != expected:
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


# ---------------------------------------------------------------------------------------------
# Report


def summarise(results: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, tuple[float, float]]]:
    """(setting, model) -> metric -> (mean, standard deviation over seeds; 0 for one seed)."""
    grouped: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results:
        grouped.setdefault((r["setting"], r["model"]), []).append(r)
    summary = {}
    for key, runs in grouped.items():
        values = {m: [r["test"][m] for r in runs] for m in METRICS}
        values["seconds"] = [r["seconds"] for r in runs]
        values["epochs"] = [sum(r["epochs"].values()) for r in runs]
        summary[key] = {m: (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0)
                        for m, v in values.items()}
    return summary


def _cell(stat: tuple[float, float], digits: int = 4, bold: bool = False) -> str:
    text = f"{stat[0]:.{digits}f} ± {stat[1]:.{digits}f}"
    return f"**{text}**" if bold else text


def _schedule(cfg: Config, models: tuple[ModelSpec, ...]) -> str:
    full = config_lib.preset(cfg.preset).train
    stages = [("pre-training", cfg.train.pretrain, full.pretrain), ("fine-tuning", cfg.train.finetune, full.finetune)]
    if not any(spec.pretrain for spec in models):
        stages = stages[1:]
    text = ", ".join(f"{name} at most {_epochs(s.epochs)} (patience {s.patience}, lr {s.lr:g}, batch {s.batch_size})"
                     for name, s, _ in stages)
    if any(s.epochs < f.epochs for _, s, f in stages):
        text += (f". **Shortened schedule**: the `{cfg.preset}` preset runs "
                 + " and ".join(f"{_epochs(f.epochs)} of {name}" for name, _, f in stages)
                 + ", so these figures come from undertrained models and may rank them differently")
    return text


def _epochs(n: int) -> str:
    return f"{n} epoch" if n == 1 else f"{n} epochs"


def _findings(summary, setting: str, models: tuple[ModelSpec, ...], shortened: bool) -> list[str]:
    """Plain statements: MP4SR against each baseline, metric by metric, and the ablations that are
    not behind it. None for a shortened schedule, whose figures must not rank models."""
    mp4sr = summary.get((setting, "mp4sr"))
    if mp4sr is None:
        return []
    if shortened:
        return ["- Shortened schedule: these figures are not used to rank the models."]

    def versus(name: str, metric: str) -> str:
        mine, theirs = mp4sr[metric], summary[(setting, name)][metric]
        ratio = f"{mine[0] / theirs[0]:.2f}x" if theirs[0] > 0 else "the baseline scores 0"
        if abs(mine[0] - theirs[0]) <= max(mine[1], theirs[1]):
            verdict = "within one standard deviation"
        else:
            verdict = "ahead by more than one standard deviation" if mine[0] > theirs[0] else "behind"
        return f"{metric} {mine[0]:.4f} vs {theirs[0]:.4f} ({ratio}, {verdict})"

    lines = [f"- MP4SR against {spec.label}: " + "; ".join(versus(spec.name, m) for m in METRICS) + "."
             for spec in models if spec.role == "baseline" and spec.kind != "popularity"]
    for spec in models:
        if spec.role == "ablation":
            theirs, mine = summary[(setting, spec.name)]["ndcg@20"], mp4sr["ndcg@20"]
            if theirs[0] >= mine[0]:
                lines.append(f"- {spec.label} is not behind the default MP4SR on ndcg@20 ({theirs[0]:.4f} vs "
                             f"{mine[0]:.4f}{_within(theirs, mine)}).")
    return lines


def _within(a: tuple[float, float], b: tuple[float, float]) -> str:
    return ", within one standard deviation" if abs(a[0] - b[0]) <= max(a[1], b[1]) else ""


def _table(summary, setting: str, models: tuple[ModelSpec, ...]) -> list[str]:
    header = ["Model", "Role", "Recall@10", "Recall@20", "NDCG@10", "NDCG@20", "Epochs", "Training time (s)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    best = {m: max(summary[(setting, spec.name)][m][0] for spec in models) for m in METRICS}
    for spec in models:
        stats = summary[(setting, spec.name)]
        label = spec.label
        if setting == "cold-start" and spec.id_only:
            label += " — cannot score unseen items"
        cells = [_cell(stats[m], bold=stats[m][0] == best[m]) for m in METRICS]
        lines.append(f"| {label} | {spec.role} | " + " | ".join(cells)
                     + f" | {_cell(stats['epochs'], 1)} | {_cell(stats['seconds'], 1)} |")
    return lines


def write_report(result: BenchmarkResult, options: BenchmarkOptions, path: Path, command: str) -> None:
    """results.md (a table per setting) and results.png (bar chart with error bars) beside it."""
    results = result.runs
    summary = summarise(results)
    models, cfg = options.models, options.cfg
    inputs_desc = "the built-in demo dataset" if options.data is None else f"`{options.data}`"
    cold_users = sorted({r["test_users"] for r in results if r["setting"] == "cold-start"})
    normal_users = sorted({r["test_users"] for r in results if r["setting"] == "normal"})
    lines = [
        "# MP4SR benchmark: baselines, ablations, cold-start",
        "",
        f"Generated by `{command}`.",
        "",
        f"- Data: {inputs_desc} ({result.inputs}); leave-one-out split, full ranking over all items "
        "(SPEC section 5).",
        f"- Preset `{cfg.preset}`: {_schedule(cfg, models)}.",
        f"- Seeds {', '.join(map(str, options.seeds))}: each cell is the mean ± standard deviation over the seeds "
        "of the test metric at the best validation epoch (Recall@20).",
        *_setting_notes(options, normal_users, cold_users),
        "- Epochs: pre-training plus fine-tuning epochs run until early stopping (or the preset's maximum). "
        "Training time: wall-clock seconds of those epochs with their validation passes, on "
        f"{' and '.join(sorted({r['device'] for r in results}))}, on a machine shared with other "
        "jobs: a rough cost only. Models whose settings differ in fine-tuning alone share one pre-training; its "
        "time counts for each of them.",
        "- Every model trains with the same loss family as MP4SR's fine-tuning (full-catalogue cross-entropy of "
        "cosine scores / tau) and the same optimiser settings. SASRec and SASRecM keep their published ID "
        "embedding (N(0, 0.02), no dropout); MP4SR's fine-tuning defaults differ from the paper in its ID embedding "
        "(`train.ids`: scale 10, ID dropout 0.2, ID rows predicted from features for items without one; "
        "`--preset paper` keeps the paper's).",
        "",
        f"![Recall@20 and NDCG@20 per model, error bars one standard deviation]({path.with_suffix('.png').name})",
    ]
    for setting in options.settings:
        lines += ["", f"## {setting.capitalize()} setting", "", *_table(summary, setting, models)]
        findings = _findings(summary, setting, models, shortened="Shortened schedule" in _schedule(cfg, models))
        if findings:
            lines += ["", "Findings:", "", *findings]
    write_text_atomic(path, "\n".join(lines) + "\n")
    write_chart(summary, models, options.settings, path.with_suffix(".png"))


def _setting_notes(options: BenchmarkOptions, normal_users: list[int], cold_users: list[int]) -> list[str]:
    notes = []
    if "normal" in options.settings:
        notes.append(f"- Normal setting: {_range(normal_users)} test users.")
    if "cold-start" in options.settings:
        notes.append(
            f"- Cold-start setting: {options.cold_fraction:.0%} of the items, drawn with each run's seed, are left out "
            "of the training catalogue (never a target, a history item, a negative of the softmax or a validation "
            f"item, like items added after training); tested on the {_range(cold_users)} users whose test item is "
            "one of them, ranking the whole catalogue. MP4SR and SASRecM score those items from their features "
            "only; popularity and SASRec cannot score them (zero counts, no ID row), hence their zeros.")
    return notes


def _range(values: list[int]) -> str:
    return str(values[0]) if len(values) == 1 else f"{values[0]}-{values[-1]}"


def write_chart(summary, models: tuple[ModelSpec, ...], settings: tuple[str, ...], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(settings), figsize=(max(8, 0.7 * len(models) * len(settings)), 4.5),
                             sharey=True, squeeze=False)
    axes = axes[0]
    x = np.arange(len(models))
    width = 0.4
    for ax, setting in zip(axes, settings, strict=True):
        for offset, metric in ((-width / 2, "recall@20"), (width / 2, "ndcg@20")):
            stats = [summary[(setting, spec.name)][metric] for spec in models]
            ax.bar(x + offset, [s[0] for s in stats], width, yerr=[s[1] for s in stats], capsize=3, label=metric)
        ax.set_xticks(x, [spec.name for spec in models], rotation=45, ha="right")
        ax.set_title(f"{setting} setting")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)
