"""What the best possible model scores on a demo dataset: the generator's own next-item
probabilities, read from its latent truth (latent.npz), ranked with the benchmark's protocol.

    python benchmarks/oracle.py                       # the built-in demo data, cold-start seeds 0, 1, 2
    python benchmarks/oracle.py --data DIR --seeds 0  # another demo dataset (benchmarks/quality_data.py)
    python benchmarks/oracle.py --runs mp4sr-bench/demo --models mp4sr,sasrec   # trained models beside it

The demo generator (train/data/demo.py) draws a user's next item as the companion of the last item
(probability 0.25, if not yet seen) or else by Zipf popularity inside a topic that stays, moves to a
neighbour or jumps. No model can know more than that, so ranking by those probabilities is the
ceiling of expected Recall@K on the test users (up to sampling noise).

"topics only" is the same with every item treated as held out (below): what knowing an item's topic
and nothing else about it is worth.

Cold-start setting (the benchmark's hold_out_items, same seeds): a model trained without the
held-out items can know their topic (from their features) but neither their popularity inside the
topic nor their companion links. The *calibrated oracle* scores them with those unknowns replaced by
their expectation: the mean popularity of the held-out items of the topic, and a companion link
spread over the candidates it could be. It is tested like the models: on the users whose target is
a held-out item, and on every user. Then a bias for the held-out items (their probabilities
multiplied by a factor) shows what the cold-users-only figure rewards and what it costs every
user: a subset chosen by its outcome favours a model that over-ranks new items.

With --runs, the finished runs of `mp4sr-rt benchmark` on the same data (seed --seed) stand beside
the oracle: in the normal setting broken down by what the target is to the last history item (its
companion, another item of its topic, an item of another topic) and ranked once more with the
history's own items left out (the runtime's default; the oracle never ranks them); in the
cold-start setting, by the kinds of items each scores above a held-out target.

Prints one JSON line per setting (and per bias factor) and a table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from mp4sr_train.data import default_demo_dir, generate_demo, hold_out_items, load_or_preprocess
from mp4sr_train.data.demo import COMPANION, N_TOPICS, TOPIC_NEIGHBOUR, TOPIC_STAY, read_catalogue
from mp4sr_train.data.types import Split, SplitData

from mp4sr_rt.errors import UserError

JUMP = 1.0 - TOPIC_STAY - TOPIC_NEIGHBOUR  # to a uniformly drawn topic (itself included)
BIASES = (1.0, 2.0, 4.0, 8.0, 16.0, 64.0)


class World:
    """The latent truth of a demo dataset in the split's item index space (row 0: padding)."""

    def __init__(self, data: SplitData, data_dir: Path):
        cat = read_catalogue(data_dir)
        row_of = {str(name): i for i, name in enumerate(cat.item_ids)}
        try:
            rows = np.array([row_of[item] for item in data.item_ids])
        except KeyError as e:
            raise UserError(f"{data_dir}: item {e} of the split is not in the generator's latent truth") from None
        index_of_row = np.zeros(len(cat.item_ids), dtype=np.int64)
        index_of_row[rows] = np.arange(1, len(rows) + 1)
        self.topic = np.r_[0, cat.behaviour[rows]]
        self.popularity = np.r_[0.0, cat.popularity[rows]]
        self.companion = np.r_[0, index_of_row[cat.companion[rows]]]  # 0: not in the split
        self.n = len(rows) + 1
        # P(topic t | current topic T), a (topics, topics) matrix: stay, a ring neighbour, or a jump.
        ring = np.arange(N_TOPICS)
        self.step = np.full((N_TOPICS, N_TOPICS), JUMP / N_TOPICS)
        self.step[ring, ring] += TOPIC_STAY
        self.step[ring, (ring + 1) % N_TOPICS] += TOPIC_NEIGHBOUR / 2
        self.step[ring, (ring - 1) % N_TOPICS] += TOPIC_NEIGHBOUR / 2

    def scores(self, histories: np.ndarray, held: np.ndarray | None = None) -> np.ndarray:
        """P(next item | history), (B, N + 1), padding 0. With `held` (bool, N + 1): the calibrated
        oracle of a model that never saw those items (their popularity and companion links unknown)."""
        b = len(histories)
        seen = np.zeros((b, self.n), dtype=bool)
        np.put_along_axis(seen, histories, True, axis=1)
        seen[:, 0] = True
        last = histories[np.arange(b), (histories != 0).sum(1) - 1]
        popularity = self.popularity.copy()
        if held is not None:
            for t in range(N_TOPICS):
                members = held & (self.topic == t)
                if members.any():
                    popularity[members] = self.popularity[members].mean()
        popularity[0] = 0.0
        weight = popularity * ~seen  # (B, N + 1)
        onehot = np.zeros((self.n, N_TOPICS))
        onehot[np.arange(1, self.n), self.topic[1:]] = 1.0
        mass = weight @ onehot  # (B, topics): unseen popularity per topic
        # A topic the user has exhausted is drawn again (the generator drifts on): renormalise.
        p_topic = self.step[self.topic[last]] * (mass > 0)  # (B, topics)
        p_topic /= p_topic.sum(1, keepdims=True)
        per_unit = np.divide(p_topic, mass, out=np.zeros_like(mass), where=mass > 0)
        topic_part = weight * per_unit[:, self.topic]
        topic_part[:, 0] = 0.0
        companion = self._companions(last, seen, held)  # (B, N + 1): P(companion = j), unseen j only
        p_companion = COMPANION * companion.sum(1, keepdims=True)
        return (1.0 - p_companion) * topic_part + COMPANION * companion

    def _companions(self, last: np.ndarray, seen: np.ndarray, held: np.ndarray | None) -> np.ndarray:
        """P(item j is the companion of the last item), restricted to unseen items."""
        b = len(last)
        out = np.zeros((b, self.n))
        known = self.companion[last]
        if held is None:
            out[np.arange(b), known] = 1.0
        else:
            for i, (item, comp) in enumerate(zip(last, known, strict=True)):
                t = self.topic[item]
                if held[item]:  # a new last item: its companion follows one of the topic's new items
                    pool = np.unique(self.companion[held & (self.topic == t)])
                elif held[comp]:  # a trained item whose companion never showed: one of the topic's new items
                    pool = np.flatnonzero(held & (self.topic == t))
                else:
                    pool = np.array([comp])
                pool = pool[pool != 0]
                if len(pool):
                    out[i, pool] = 1.0 / len(pool)
        out[:, 0] = 0.0
        return out * ~seen


def ranks(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """(B, 2): per row the items scored above the target and those tied with it (padding never
    ranked). The oracle cannot tell some items apart (held-out items of a topic): `metrics` takes
    its figures in expectation over the order of the tied items, as continuous scores would break
    them, without a random draw."""
    scores = scores.copy()
    scores[:, 0] = -np.inf
    t = scores[np.arange(len(targets)), targets][:, None]
    return np.stack([(scores > t).sum(1), (scores == t).sum(1) - 1], axis=1)


def metrics(r: np.ndarray, ks: tuple[int, ...] = (5, 10, 20, 50)) -> dict[str, float]:
    """metrics_from_ranks in expectation over ties: the target's rank uniform on above .. above + tied."""
    above, tied = r[:, 0], r[:, 1]
    gain = np.concatenate([[0.0], np.cumsum(1.0 / np.log2(np.arange(int(r.sum(1).max()) + 1) + 2.0))])
    out = {}
    for k in ks:
        last = np.minimum(above + tied, k - 1)  # the last rank inside the top k
        inside = np.clip(last - above + 1, 0, None)
        out[f"recall@{k}"] = float((inside / (tied + 1)).mean())
        out[f"ndcg@{k}"] = float(np.where(inside > 0, (gain[np.maximum(last, above) + 1] - gain[above]) / (tied + 1),
                                          0.0).mean())
    return out


def strict_ranks(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """A trained model's ranks as the benchmark counts them (ties against the target), in `ranks`' form."""
    r = ranks(scores, targets)
    return np.stack([r.sum(1), np.zeros(len(r), dtype=r.dtype)], axis=1)


KINDS = ("companion", "same topic", "other topic")


def target_kinds(world: World, split: Split) -> np.ndarray:
    """Per test row, what the target is to the last history item: 0 its companion, 1 another item
    of its topic, 2 an item of another topic."""
    last = split.histories[np.arange(len(split)), (split.histories != 0).sum(1) - 1]
    same = world.topic[split.targets] == world.topic[last]
    return np.where(world.companion[last] == split.targets, 0, np.where(same, 1, 2))


def by_kind(ranks_: np.ndarray, kinds: np.ndarray) -> dict[str, dict[str, float]]:
    return {name: {"share": round(float((kinds == k).mean()), 4), **_pick(metrics(ranks_[kinds == k]))}
            for k, name in enumerate(KINDS)}


def oracle_ranks(world: World, split: Split, held: np.ndarray | None = None) -> np.ndarray:
    return np.concatenate([ranks(world.scores(split.histories[i:i + 512], held), split.targets[i:i + 512])
                           for i in range(0, len(split), 512)])


def transition_ranks(data: SplitData, split: Split) -> np.ndarray:
    """A first-order count model for reference: score(j) = how often j followed the last history
    item in the training rows, plus a fraction of j's training count (popularity breaks ties)."""
    n = data.num_items + 1
    last_of = lambda h: h[np.arange(len(h)), (h != 0).sum(1) - 1]  # noqa: E731
    counts = np.zeros((n, n))
    np.add.at(counts, (last_of(data.train.histories), data.train.targets), 1.0)
    popularity = data.train_counts / (data.train_counts.max() + 1.0)
    s = counts[last_of(split.histories)] + popularity[None, :]
    return ranks(s, split.targets)


def model_scores(out: Path, setting: str, name: str, seed: int, args: argparse.Namespace) -> tuple[np.ndarray, Split]:
    """Scores of every item (padding -inf) for the test users of a finished `mp4sr-rt benchmark` run
    (in the cold-start setting, those whose target is a held-out item), and those users."""
    import torch  # only for --runs: the oracle itself needs no model
    from id_diagnostics import all_scores
    from mp4sr_train import config as config_lib
    from mp4sr_train.benchmark import BenchmarkOptions, load_finished, load_inputs

    options = BenchmarkOptions(cfg=config_lib.preset(args.preset), seeds=(seed,), out=out, data=args.data,
                               features=args.features, cold_fraction=args.cold_fraction, device="cpu", progress=False)
    inputs = load_inputs(options)
    model, id_emb, sd = load_finished(name, setting, seed, inputs, options)
    with torch.inference_mode():
        return all_scores(model, inputs.feats, sd.test, id_emb, model.encode_items(inputs.feats)).numpy(), sd.test


def ahead_of_target(world: World, scores: np.ndarray, split: Split, held: np.ndarray) -> dict[str, float]:
    """Median, over the users, of the items scored above the target, by kind: trained or held out,
    of the target's topic or not (an item tied with the target counts half: the expectation)."""
    t = scores[np.arange(len(split)), split.targets][:, None]
    tied = scores == t
    tied[np.arange(len(split)), split.targets] = False
    ahead = (scores > t) + 0.5 * tied
    ahead[:, 0] = 0.0
    same = world.topic[None, :] == world.topic[split.targets][:, None]
    parts = {"same_topic_trained": same & ~held, "same_topic_new": same & held, "other_topic_trained": ~same & ~held,
             "other_topic_new": ~same & held}
    return {"rank": float(np.median(ahead.sum(1))),
            **{name: float(np.median((ahead * mask).sum(1))) for name, mask in parts.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=None, help="a demo dataset directory (default: the built-in one)")
    parser.add_argument("--seeds", default="0,1,2", help="cold-start draws (the benchmark's seeds)")
    parser.add_argument("--cold-fraction", type=float, default=0.1)
    parser.add_argument("--cache", type=Path, default=Path("mp4sr-bench/oracle-cache"))
    parser.add_argument("--runs", type=Path, default=None,
                        help="results directory of `mp4sr-rt benchmark` on the same data (--data, and its --features): "
                             "its finished runs of --seed stand beside the oracle (see above)")
    parser.add_argument("--features", type=Path, default=None, help="with --runs and --data: the benchmark's features")
    parser.add_argument("--models", default="mp4sr,sasrec,sasrec-features", help="with --runs")
    parser.add_argument("--seed", type=int, default=0, help="with --runs")
    parser.add_argument("--preset", default="demo", help="with --runs")
    args = parser.parse_args()
    try:
        data_dir = args.data or generate_demo(default_demo_dir())
        data, _ = load_or_preprocess(data_dir, args.cache)
        world = World(data, data_dir)
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except (UserError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    rows = []

    def emit(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)

    normal = oracle_ranks(world, data.test)
    kinds = target_kinds(world, data.test)
    emit({"setting": "normal", "model": "oracle", "users": len(data.test), **_pick(metrics(normal)),
          "by_target": by_kind(normal, kinds)})
    every = np.ones(world.n, dtype=bool)
    every[0] = False
    topics = oracle_ranks(world, data.test, every)  # every item held out: its topic known, nothing else
    emit({"setting": "normal", "model": "topics only", "users": len(data.test), **_pick(metrics(topics)),
          "by_target": by_kind(topics, kinds)})
    counted = transition_ranks(data, data.test)
    emit({"setting": "normal", "model": "first-order counts", "users": len(data.test),
          **_pick(metrics(counted)), "by_target": by_kind(counted, kinds)})
    if args.runs is not None:
        for name in args.models.split(","):
            if not (args.runs / "normal" / name / f"seed-{args.seed}" / "metrics.json").is_file():
                continue
            scores, split = model_scores(args.runs, "normal", name, args.seed, args)
            if not np.array_equal(split.targets, data.test.targets):
                raise SystemExit(f"error: {args.runs} was not run on the same data as the oracle")
            found = strict_ranks(scores, split.targets)
            np.put_along_axis(scores, split.histories, -np.inf, axis=1)  # the history's own items
            unseen = strict_ranks(scores, split.targets)
            emit({"setting": "normal", "model": name, "seed": args.seed, "users": len(split),
                  **_pick(metrics(found)), "by_target": by_kind(found, kinds),
                  "seen_left_out": _pick(metrics(unseen))})
        held = hold_out_items(data, args.cold_fraction, args.seed)[1]
        cold_users = Split(data.test.histories[held[data.test.targets]], data.test.targets[held[data.test.targets]])
        oracle_scores = world.scores(cold_users.histories, held)
        emit({"setting": "cold-start", "model": "oracle", "seed": args.seed, "users": len(cold_users),
              **_pick(metrics(ranks(oracle_scores, cold_users.targets))),
              "ahead_of_target": ahead_of_target(world, oracle_scores, cold_users, held)})
        for name in args.models.split(","):
            if not (args.runs / "cold-start" / name / f"seed-{args.seed}" / "metrics.json").is_file():
                continue
            scores, split = model_scores(args.runs, "cold-start", name, args.seed, args)
            if not np.array_equal(split.targets, cold_users.targets):
                raise SystemExit(f"error: {args.runs} was not run on the same data as the oracle")
            emit({"setting": "cold-start", "model": name, "seed": args.seed, "users": len(split),
                  **_pick(metrics(strict_ranks(scores, split.targets))),
                  "ahead_of_target": ahead_of_target(world, scores, split, held)})
    for seed in seeds:
        held = hold_out_items(data, args.cold_fraction, seed)[1]  # the test split stays as it is
        cold = held[data.test.targets]  # the users whose target is a held-out item
        base = world.scores(data.test.histories, held)  # every user's, once per draw
        for bias in BIASES:
            s = base * np.where(held, bias, 1.0)
            r = ranks(s, data.test.targets)
            s[:, 0] = -np.inf
            share = float(held[np.argpartition(-s, 20, axis=1)[:, :20]].mean())
            emit({"setting": "cold-start", "seed": seed, "bias": bias, "cold_users": int(cold.sum()),
                  "new_item_targets": _pick(metrics(r[cold])), "every_user": _pick(metrics(r)),
                  "new_share_top20": share})
    _table(rows)


def _pick(metrics: dict[str, float]) -> dict[str, float]:
    return {k: round(metrics[k], 4) for k in ("recall@10", "recall@20", "ndcg@10", "ndcg@20")}


def _table(rows: list[dict]) -> None:
    normal = [r for r in rows if r["setting"] == "normal"]
    print(f"\nnormal setting, {normal[0]['users']} users; by the target's kind (companion of the last item, "
          "another item of its topic, another topic): its share of the users, then NDCG@10 / Recall@20")
    print("(and, for trained models, with the history's own items left out as the runtime serves; the oracle "
          "never ranks them)")
    print("| model | NDCG@10 | Recall@20 | " + " | ".join(KINDS) + " | seen left out: NDCG@10 / Recall@20 |")
    print("|---|---|---|" + "---|" * (len(KINDS) + 1))
    for r in normal:
        cells = [f"{r['by_target'][k]['share']:.2f}: {r['by_target'][k]['ndcg@10']:.4f} / "
                 f"{r['by_target'][k]['recall@20']:.4f}" for k in KINDS]
        unseen = r.get("seen_left_out")
        cells.append(f"{unseen['ndcg@10']:.4f} / {unseen['recall@20']:.4f}" if unseen else "")
        print(f"| {r['model']} | {r['ndcg@10']:.4f} | {r['recall@20']:.4f} | " + " | ".join(cells) + " |")
    ahead = [r for r in rows if "ahead_of_target" in r]
    if ahead:
        print(f"\ncold-start, the {ahead[0]['users']} users whose target is a held-out item: median count of the "
              "items scored above the target, by kind")
        print("| model | NDCG@20 | median rank | same topic, trained | same topic, held out | other topic, trained "
              "| other topic, held out |")
        print("|---|---|---|---|---|---|---|")
        for r in ahead:
            a = r["ahead_of_target"]
            print(f"| {r['model']} | {r['ndcg@20']:.4f} | {a['rank']:.0f} | {a['same_topic_trained']:.0f} | "
                  f"{a['same_topic_new']:.0f} | {a['other_topic_trained']:.0f} | {a['other_topic_new']:.0f} |")
    cold = [r for r in rows if r["setting"] == "cold-start" and "bias" in r]
    if not cold:
        return
    print("\ncold-start (calibrated oracle; bias: new items' probabilities multiplied)")
    print("| seed | bias | NDCG@20 new-item targets | Recall@20 new-item targets | NDCG@20 every user "
          "| new items' share of top 20 |")
    print("|---|---|---|---|---|---|")
    for r in cold:
        new, every = r["new_item_targets"], r["every_user"]
        print(f"| {r['seed']} | {r['bias']:g} | {new['ndcg@20']:.4f} | {new['recall@20']:.4f} | "
              f"{every['ndcg@20']:.4f} | {r['new_share_top20']:.3f} |")


if __name__ == "__main__":
    main()
