"""The benchmark's report: a table per setting, findings, and a chart, from finished runs' metrics.

    result = run_benchmark(options)                                      # train/benchmark.py
    write_report(result, options, Path("mp4sr-bench/results.md"), "the command")   # + results.png
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from mp4sr_train import config as config_lib
from mp4sr_train.benchmark import METRICS, BenchmarkOptions, BenchmarkResult, ModelSpec
from mp4sr_train.config import Config

from mp4sr_rt.io import atomic_write, write_text_atomic

ALL_USERS = "cold-start-all"  # the cold-start runs tested on every user
TITLES = {"normal": "Normal setting", "cold-start": "Cold-start setting",
          ALL_USERS: "Cold-start setting, every test user"}
CHART_TITLES = {"normal": "normal", "cold-start": "cold-start: new-item targets", ALL_USERS: "cold-start: every user"}


def report_settings(settings: tuple[str, ...], summary) -> tuple[str, ...]:
    """The settings the report shows: after cold-start, its all-users test where the runs have one."""
    shown = []
    for setting in settings:
        shown.append(setting)
        if setting == "cold-start" and any(key[0] == ALL_USERS for key in summary):
            shown.append(ALL_USERS)
    return tuple(shown)


def summarise(results: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, tuple[float, float]]]:
    """(setting, model) -> metric -> (mean, standard deviation over seeds; 0 for one seed)."""
    grouped: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results:
        grouped.setdefault((r["setting"], r["model"]), []).append(r)
        if "test_all" in r:  # the cold-start models tested on every user: a setting of its own in the report
            grouped.setdefault((ALL_USERS, r["model"]), []).append({**r, "test": r["test_all"]})
    summary = {}
    for key, runs in grouped.items():
        values = {m: [r["test"][m] for r in runs] for m in METRICS}
        values["seconds"] = [r["seconds"] for r in runs]
        values["epochs"] = [sum(r["epochs"].values()) for r in runs]
        summary[key] = {m: (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0)
                        for m, v in values.items()}
    return summary


def _cell(stat: tuple[float, float], digits: int = 4, bold: bool = False, spread: bool = True) -> str:
    text = f"{stat[0]:.{digits}f} ± {stat[1]:.{digits}f}" if spread else f"{stat[0]:.{digits}f}"
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


def _findings(summary, setting: str, models: tuple[ModelSpec, ...], shortened: bool, seeds: int = 2) -> list[str]:
    """Plain statements: MP4SR against each baseline, metric by metric, and the ablations that are
    not behind it. None for a shortened schedule, whose figures must not rank models; with one
    seed there is no spread to weigh a gap against, and the statements say so."""
    mp4sr = summary.get((setting, "mp4sr"))
    if mp4sr is None:
        return []
    if shortened:
        return ["- Shortened schedule: these figures are not used to rank the models."]

    def versus(name: str, metric: str) -> str:
        mine, theirs = mp4sr[metric], summary[(setting, name)][metric]
        ratio = f"{mine[0] / theirs[0]:.2f}x" if theirs[0] > 0 else "the baseline scores 0"
        if seeds < 2:
            verdict = "one seed: no spread measured"
        elif abs(mine[0] - theirs[0]) <= max(mine[1], theirs[1]):
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


def _table(summary, setting: str, models: tuple[ModelSpec, ...], spread: bool = True) -> list[str]:
    header = ["Model", "Role", "Recall@10", "Recall@20", "NDCG@10", "NDCG@20", "Epochs", "Training time (s)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    best = {m: max(summary[(setting, spec.name)][m][0] for spec in models) for m in METRICS}
    for spec in models:
        stats = summary[(setting, spec.name)]
        label = spec.label
        if setting == "cold-start" and spec.id_only:
            label += " — cannot score unseen items"
        cells = [_cell(stats[m], bold=stats[m][0] == best[m], spread=spread) for m in METRICS]
        lines.append(f"| {label} | {spec.role} | " + " | ".join(cells)
                     + f" | {_cell(stats['epochs'], 1, spread=spread)} | {_cell(stats['seconds'], 1, spread=spread)} |")
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
        (f"- Seeds {', '.join(map(str, options.seeds))}: each cell is the mean ± standard deviation over the seeds "
         "of the test metric at the best validation epoch (Recall@20)." if len(options.seeds) > 1 else
         f"- **One seed** ({options.seeds[0]}): each cell is the test metric at the best validation epoch "
         "(Recall@20); with no spread measured, gaps between models are indicative only."),
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
    settings = report_settings(options.settings, summary)
    for setting in settings:
        several = len(options.seeds) > 1
        lines += ["", f"## {TITLES[setting]}", "", *_table(summary, setting, models, spread=several)]
        findings = _findings(summary, setting, models, shortened="Shortened schedule" in _schedule(cfg, models),
                             seeds=len(options.seeds))
        if findings:
            lines += ["", "Findings:", "", *findings]
    write_text_atomic(path, "\n".join(lines) + "\n")
    write_chart(summary, models, settings, path.with_suffix(".png"))


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
            "only; popularity and SASRec cannot score them (zero counts, no ID row), hence their zeros. Every test "
            "target there is a new item, so a model that favours items without an ID row gains, whatever it costs "
            "elsewhere.")
        notes.append(
            "- Cold-start setting, every test user: the same cold-start models tested on all users (about "
            f"{options.cold_fraction:.0%} of whose targets are new items), ranking the whole catalogue: the new items "
            "must rank where they belong and no higher, as in a catalogue with new items in production.")
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
        ax.set_title(CHART_TITLES[setting])
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)
