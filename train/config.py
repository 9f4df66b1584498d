"""One frozen dataclass per concern, named presets, and strict loading (unknown keys are errors)."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from mp4sr_rt.errors import UserError


def _check(obj: Any, **ranges: tuple[float | None, float | None, bool]) -> None:
    """Range checks of a config's numeric fields: name=(low, high, integer), bounds inclusive
    (None: unbounded). The message names the field; `_build` prefixes where it sits."""
    for name, (low, high, integer) in ranges.items():
        value = getattr(obj, name)
        kind = "an integer" if integer else "a number"
        numeric = isinstance(value, int) or (not integer and isinstance(value, float))
        if isinstance(value, bool) or not numeric or value != value:  # value != value: NaN
            raise UserError(f"{name}: expected {kind}, got {value!r}")
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f">= {low}" if high is None else f"between {low} and {high}"
            raise UserError(f"{name}: expected {kind} {bounds}, got {value!r}")


@dataclass(frozen=True)
class DataConfig:
    max_len: int = 50  # L: histories keep their last 50 items (SPEC section 2)
    min_interactions: int = 5  # users with fewer are dropped (SPEC section 5)

    def __post_init__(self) -> None:
        _check(self, max_len=(1, None, True), min_interactions=(3, None, True))


@dataclass(frozen=True)
class ModelConfig:
    d: int = 64  # hidden size of the adaptor and the transformer
    n_layers: int = 2
    n_heads: int = 2
    inner: int = 256  # feed-forward width
    dropout: float = 0.2  # hidden and attention dropout of the transformer
    adaptor_dropout: float = 0.2  # dropout inside each MoE expert
    n_experts: int = 8
    pool_hidden: int = 64  # width of the attention-pooling scorer W1
    max_len: int = 50  # number of learned positions
    layer_norm_eps: float = 1e-12  # the reference's value (BERT convention)
    # Feature modalities the item encoder uses and the score sums over. One modality (an ablation)
    # has nothing to mix or contrast with, so pre-training then skips mixup and CMCL.
    modalities: tuple[str, ...] = ("text", "image")

    def __post_init__(self) -> None:
        _check(self, d=(1, None, True), n_layers=(1, None, True), n_heads=(1, None, True), inner=(1, None, True),
               dropout=(0, 0.99, False), adaptor_dropout=(0, 0.99, False), n_experts=(1, None, True),
               pool_hidden=(1, None, True), max_len=(1, None, True), layer_norm_eps=(0, 1, False))
        if self.d % self.n_heads:
            raise UserError(f"d: {self.d} is not a multiple of n_heads ({self.n_heads})")
        names = self.modalities
        if not names or len(set(names)) < len(names) or not set(names) <= {"text", "image"}:
            raise UserError(f"modalities: distinct names among text, image expected; got {names}")


@dataclass(frozen=True)
class StageConfig:
    epochs: int
    lr: float
    batch_size: int = 1024
    weight_decay: float = 0.0
    patience: int = 20  # early stopping on validation Recall@20, in epochs
    grad_clip: float = 5.0

    def __post_init__(self) -> None:
        _check(self, epochs=(1, None, True), lr=(1e-12, 10, False), batch_size=(1, None, True),
               weight_decay=(0, 10, False), patience=(1, None, True), grad_clip=(1e-12, None, False))


CANDIDATE_ROWS = ("tied", "untied", "residual")


@dataclass(frozen=True)
class IdConfig:
    """Fine-tuning's item-ID embedding (SPEC section 4); pre-training has none."""

    init_std: float = 0.02  # N(0, init_std) at the start of fine-tuning
    # The rows used are scale * weight. Adam moves each weight by about lr per step whatever its
    # size, so the ID part grows relative to the item vectors z (row norm ~1.7) about `scale`
    # times faster; at 1 (the paper) it stays a small correction of z (norm ~0.3 after fine-tuning).
    scale: float = 10.0
    # Share of the trained items whose ID row is dropped at each fine-tuning step (the same items
    # in histories and among the candidates), so the model learns to rank items without one.
    dropout: float = 0.2
    # Items without an ID row (dropped ones, and those never seen in training) get a row predicted
    # from their feature vectors rather than none (ItemIdEmbedding).
    from_features: bool = True
    # tied: an item's ID row is the same as a history input and as a candidate (the paper);
    # untied: candidates have rows of their own; residual: the input row plus a learned difference
    # that starts at zero (ItemIdEmbedding).
    candidate_rows: str = "tied"

    def __post_init__(self) -> None:
        _check(self, init_std=(0, 10, False), scale=(1e-6, 1e6, False), dropout=(0, 0.99, False))
        if self.candidate_rows not in CANDIDATE_ROWS:
            raise UserError(f"candidate_rows: expected one of {', '.join(CANDIDATE_ROWS)}, got {self.candidate_rows!r}")


@dataclass(frozen=True)
class SoftmaxConfig:
    """How a training step scores the catalogue. `full`: every item, every step (the paper's
    fine-tuning softmax, exact). `sampled`: the step encodes only the items it touches (its
    histories, targets and negatives) and fine-tuning's softmax runs over the batch's targets
    (in-batch negatives) plus `negatives` shared items drawn per step, each logit corrected by
    the log of its expected count in that sample (log-Q). `auto`: sampled above `auto_above` items."""

    kind: str = "auto"
    auto_above: int = 20_000  # measured: level with the full path at 10k items, 1.7x faster at 30k, 5x at 100k
    negatives: int = 8192  # shared negatives per step
    distribution: str = "uniform"  # uniform | popularity (proportional to training-target counts)
    log_q: bool = True

    def __post_init__(self) -> None:
        _check(self, auto_above=(1, None, True), negatives=(1, None, True))
        if self.kind not in ("auto", "full", "sampled"):
            raise UserError(f"kind: expected auto, full or sampled, got {self.kind!r}")
        if self.distribution not in ("uniform", "popularity"):
            raise UserError(f"distribution: expected uniform or popularity, got {self.distribution!r}")

    def sampled(self, num_items: int) -> bool:
        return self.kind == "sampled" or (self.kind == "auto" and num_items > self.auto_above)


# SPEC section 4, `--preset paper`
PAPER_IDS = IdConfig(scale=1.0, dropout=0.0, from_features=False, candidate_rows="tied")


@dataclass(frozen=True)
class TrainConfig:
    pretrain: StageConfig = field(default_factory=lambda: StageConfig(epochs=300, lr=1e-3))
    finetune: StageConfig = field(
        default_factory=lambda: StageConfig(epochs=300, lr=1e-4, weight_decay=1e-3)
    )
    tau: float = 0.07  # temperature of every softmax over scores
    cmcl_weight: float = 0.01  # lambda in  NIP_text + NIP_image + lambda * CMCL
    drop_max: float = 0.2  # item random drop ratio r ~ U(0, drop_max)
    mixup_max: float = 0.5  # sequence mixup probability p ~ U(0, mixup_max)
    use_mixup: bool = True
    use_nip: bool = True
    # Leave out of the model a modality no item has (`present_modalities`): in a text-only
    # catalogue every image vector would be the one learned missing vector, so an image tower,
    # image NIP, mixup and CMCL would carry nothing. False: the model keeps model.modalities.
    skip_absent_modalities: bool = True
    # Reproduce the reference code instead of the paper's intent: same-target logits set to 0
    # (still counted in the softmax) and attention pooling that never receives gradients.
    reference_quirks: bool = False
    eval_batch_size: int = 1024
    # Validate (early stopping, model selection) on this many users, a sample drawn once with the
    # seed; 0: all of them. Testing always uses every user.
    valid_users: int = 0
    seed: int = 0
    ids: IdConfig = field(default_factory=IdConfig)
    # Fine-tuning a pre-trained model: the learning rate of its item and sequence encoders is
    # finetune.lr times this (the new item-ID embedding keeps finetune.lr). A model fine-tuned
    # from scratch trains everything at finetune.lr.
    finetune_encoder_lr: float = 1.0
    # Fine-tuning's cross-entropy puts this share of its target mass on the training items'
    # popularity (target counts) instead of the next item alone: label smoothing towards a prior.
    popularity_smoothing: float = 0.0
    softmax: SoftmaxConfig = field(default_factory=SoftmaxConfig)

    def __post_init__(self) -> None:
        _check(self, tau=(1e-6, 100, False), cmcl_weight=(0, None, False), drop_max=(0, 0.99, False),
               mixup_max=(0, 1, False), eval_batch_size=(1, None, True), valid_users=(0, None, True),
               seed=(0, 2**63 - 1, True), finetune_encoder_lr=(0, 10, False),
               popularity_smoothing=(0, 0.99, False))


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    preset: str = "paper"


def _paper() -> Config:
    """The reference settings (SPEC sections 2, 3 and 5), the paper's ID embedding included."""
    return Config(train=TrainConfig(ids=PAPER_IDS), preset="paper")


def _demo() -> Config:
    """Fits `make demo` in a few minutes on a 2-core CPU: fewer epochs, shorter patience, and a
    fine-tuning lr of 1e-3 because 1e-4 needs far more epochs than the budget allows."""
    return Config(
        model=ModelConfig(),
        train=TrainConfig(
            pretrain=StageConfig(epochs=8, lr=1e-3, batch_size=512, patience=3),
            finetune=StageConfig(epochs=20, lr=1e-3, batch_size=512, weight_decay=1e-3, patience=4),
        ),
        preset="demo",
    )


def _tiny() -> Config:
    """Seconds per run: for tests."""
    return Config(
        data=DataConfig(max_len=8),
        model=ModelConfig(d=16, n_layers=1, inner=32, n_experts=2, pool_hidden=8, max_len=8),
        train=TrainConfig(
            pretrain=StageConfig(epochs=2, lr=1e-3, batch_size=64, patience=2),
            finetune=StageConfig(epochs=2, lr=1e-3, batch_size=64, patience=2),
            eval_batch_size=128,
        ),
        preset="tiny",
    )


PRESETS = {"paper": _paper, "demo": _demo, "tiny": _tiny}


def preset(name: str) -> Config:
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]()


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    if not isinstance(values, dict):
        raise UserError(f"config {where}: expected an object, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise UserError(f"config {where}: unknown key(s) {', '.join(unknown)}")
    kwargs = {}
    for name, value in values.items():
        sub = _NESTED.get((cls, name))
        path = f"{where}.{name}" if where else name
        if sub is not None:
            kwargs[name] = _build(sub, value, path)
        elif isinstance(value, list):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    try:
        return cls(**kwargs)
    except UserError as e:
        raise UserError(f"config {where + '.' if where else ''}{e}") from None


_NESTED = {
    (Config, "data"): DataConfig,
    (Config, "model"): ModelConfig,
    (Config, "train"): TrainConfig,
    (TrainConfig, "pretrain"): StageConfig,
    (TrainConfig, "finetune"): StageConfig,
    (TrainConfig, "ids"): IdConfig,
    (TrainConfig, "softmax"): SoftmaxConfig,
}

# Config parts that only fine-tuning reads: runs that differ in these alone share pre-training.
FINETUNE_ONLY = ("train.finetune", "train.ids", "train.finetune_encoder_lr", "train.popularity_smoothing")


def pretrain_view(cfg: Config) -> dict[str, Any]:
    """`to_dict(cfg)` with the fine-tuning-only parts left out: what pre-training depends on."""
    values = to_dict(cfg)
    for dotted in FINETUNE_ONLY:
        *parents, leaf = dotted.split(".")
        node = values
        for key in parents:
            node = node[key]
        node.pop(leaf)
    return values


def present_modalities(cfg: Config, present: tuple[str, ...]) -> tuple[Config, tuple[str, ...]]:
    """With `train.skip_absent_modalities`, the config without the model modalities that no item
    of the data has (`present`: ItemFeatures.present()); returns it and the modalities left out.
    A catalogue with none of the model's modalities keeps them all."""
    kept = tuple(m for m in cfg.model.modalities if m in present)
    if not cfg.train.skip_absent_modalities or not kept or kept == cfg.model.modalities:
        return cfg, ()
    dropped = tuple(m for m in cfg.model.modalities if m not in kept)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, modalities=kept)), dropped


# Settings added after runs and checkpoints were already being written, with the value that
# reproduces what such a run did (not necessarily today's default): a stored config without one
# reads as having that value (`upgrade`).
ADDED = {
    "train.ids": dataclasses.asdict(PAPER_IDS),
    "train.ids.candidate_rows": "tied",
    "train.finetune_encoder_lr": 1.0,
    "train.popularity_smoothing": 0.0,
}


def upgrade(values: dict[str, Any]) -> dict[str, Any]:
    """A stored config (to_dict output, any version) with the settings added since it was written
    filled in as ADDED says; a copy, the input unchanged."""
    values = copy.deepcopy(values)
    for dotted, value in ADDED.items():
        *parents, leaf = dotted.split(".")
        node = values
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf not in node:
            node[leaf] = copy.deepcopy(value)
    return values


def from_dict(values: dict[str, Any]) -> Config:
    """Rebuild a config from `to_dict` output; every key must be known."""
    return _build(Config, values, "")


def replace(cfg: Config, overrides: dict[str, Any]) -> Config:
    """Apply dotted overrides such as {"train.finetune.epochs": 3} to a config."""
    values = to_dict(cfg)
    for dotted, value in overrides.items():
        node = values
        *parents, leaf = dotted.split(".")
        for key in parents:
            if not isinstance(node.get(key), dict):
                raise UserError(f"config: unknown key {dotted!r}")
            node = node[key]
        if leaf not in node:
            raise UserError(f"config: unknown key {dotted!r}")
        node[leaf] = value
    return from_dict(values)
