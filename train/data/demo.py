"""A deterministic synthetic multimodal shop, small enough to train on a laptop CPU.

    data_dir = generate_demo(default_demo_dir())           # interactions.csv, items.jsonl, images/
    demo_features(data_dir, data_dir / "features.safetensors")

Structure (what a model can learn): 20 latent topics on a ring, neighbours related. Each item
has a behavioural topic that drives the interactions; its text shows that topic unless it shows
another one (12.5% of items), its image likewise (another 12.5%), never both wrong. So each
modality alone hides the true topic of some items and only fusing them recovers it. Users drift
along the topic ring (mostly staying), pick items by a Zipf popularity inside the topic and
sometimes follow an item with its fixed companion item: the next item follows from the recent
history far better than from global popularity.
"""

from __future__ import annotations

import colorsys
import csv
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from mp4sr_train.features.store import FeatureArrays, save_features
from PIL import Image, ImageDraw

from mp4sr_rt.errors import UserError

DEMO_SCHEMA = "mp4sr-demo/1"
STAMP = "demo.json"
LATENT = "latent.npz"
_OUTPUTS = ("interactions.csv", "items.jsonl", LATENT, "images")

# (name, department, words): ring order matters, neighbouring topics are the related ones.
TOPICS = (
    ("hiking", "Outdoors", "trail boots backpack summit compass mountain trek canyon ridge"),
    ("camping", "Outdoors", "tent lantern campfire sleeping stove firewood hammock cooler"),
    ("fishing", "Outdoors", "rod reel lure bait tackle angler trout river hook"),
    ("cycling", "Sports", "bicycle helmet pedal saddle chain gear wheel tire spokes"),
    ("running", "Sports", "sneakers marathon jogging stride sprint track pace cushioned"),
    ("fitness", "Sports", "dumbbell yoga workout stretch kettlebell gym muscle cardio"),
    ("cooking", "Kitchen", "skillet knife recipe pan spatula chef saucepan simmer grill"),
    ("baking", "Kitchen", "oven flour whisk pastry cake dough muffin bread cookie"),
    ("coffee", "Kitchen", "espresso grinder brew mug barista roast latte beans aroma"),
    ("gardening", "Home & Garden", "seeds shovel soil planter pruning hose flower compost"),
    ("painting", "Arts & Crafts", "canvas brush acrylic easel palette watercolor pigment sketch"),
    ("music", "Musical Instruments", "guitar strings amplifier piano drum melody chord rhythm"),
    ("photography", "Electronics", "camera lens tripod shutter flash zoom aperture exposure"),
    ("gaming", "Electronics", "controller console joystick headset arcade keyboard mouse"),
    ("reading", "Books", "novel paperback chapter author bookmark library story fiction"),
    ("baby", "Baby", "stroller diaper crib pacifier infant nursery toddler rattle"),
    ("pets", "Pet Supplies", "dog leash collar kitten aquarium treats kennel puppy"),
    ("beauty", "Beauty", "lipstick mascara makeup skincare lotion perfume serum blush"),
    ("jewelry", "Jewelry", "necklace bracelet earrings pendant silver gold diamond gemstone"),
    ("clothing", "Clothing", "cotton shirt jacket denim sweater dress wool scarf hoodie"),
)
N_TOPICS = len(TOPICS)
ADJECTIVES = (
    "classic premium compact durable deluxe portable essential modern vintage everyday "
    "professional handmade elegant sturdy soft bright"
).split()
BRAND_SUFFIXES = ("Works", "Co", "Labs")

OTHER_TEXT = OTHER_IMAGE = 0.125  # share of items whose text (or image) shows another topic
NO_IMAGE, NO_TEXT = 0.03, 0.02  # share of items lacking a modality (never both)
TOPIC_STAY, TOPIC_NEIGHBOUR = 0.75, 0.2  # else jump to a random topic
COMPANION = 0.25  # chance the next item is the previous item's companion
MIN_LEN, MAX_LEN, MEAN_EXTRA_LEN = 5, 40, 8  # interactions per user: 5 + Exp(8), at most 40
TEXT_SLOTS = 4  # title, description, brand, categories
FEATURE_NOISE = 0.8  # norm of the per-slot noise added to a unit topic vector


def default_demo_dir() -> Path:
    return Path(os.environ.get("MP4SR_DEMO_DIR", "~/.cache/mp4sr-rt/demo")).expanduser()


@dataclass(frozen=True)
class Catalogue:
    """The latent truth behind the demo items (row i is item ``item_ids[i]``)."""

    item_ids: np.ndarray  # str [N]
    behaviour: np.ndarray  # int [N] topic that drives interactions
    text_topic: np.ndarray  # int [N] topic the text shows
    image_topic: np.ndarray  # int [N] topic the image shows
    has_text: np.ndarray  # bool [N]
    has_image: np.ndarray  # bool [N]
    popularity: np.ndarray  # float [N] Zipf weight inside the behavioural topic
    companion: np.ndarray  # int [N] another item of the same behavioural topic


def generate_demo(
    out_dir: str | Path,
    n_items: int = 2000,
    n_users: int = 3000,
    seed: int = 0,
    image_size: int = 32,
) -> Path:
    """Write the demo dataset to ``out_dir`` unless it already holds this exact one."""
    out_dir = Path(out_dir).expanduser()
    if n_items < 2 * N_TOPICS or n_users < 1 or image_size < 8:
        raise UserError(
            f"demo needs n_items >= {2 * N_TOPICS}, n_users >= 1 and image_size >= 8; "
            f"got {n_items}, {n_users}, {image_size}"
        )
    stamp = {
        "schema": DEMO_SCHEMA,
        "n_items": n_items,
        "n_users": n_users,
        "seed": seed,
        "image_size": image_size,
    }
    if _is_complete(out_dir, stamp):
        return out_dir
    _check_replaceable(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        _write_demo(tmp, stamp)
        _swap_in(tmp, out_dir, stamp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _is_complete(out_dir: Path, stamp: dict) -> bool:
    try:
        found = json.loads((out_dir / STAMP).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return found == stamp and all((out_dir / name).exists() for name in _OUTPUTS)


def _check_replaceable(out_dir: Path) -> None:
    """Only an empty directory or an older demo may be replaced: never a user's own data."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / STAMP).exists()):
        raise UserError(f"{out_dir} exists and is not a demo dataset; choose another directory")


def _swap_in(tmp: Path, out_dir: Path, stamp: dict) -> None:
    if _is_complete(out_dir, stamp):  # a concurrent run finished the same demo meanwhile
        return
    if out_dir.exists():
        # Move the stale demo aside (over an empty placeholder) so the rename below can land.
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
        os.replace(out_dir, old)
        shutil.rmtree(old, ignore_errors=True)
    try:
        os.rename(tmp, out_dir)
    except OSError:
        if not _is_complete(out_dir, stamp):  # else a concurrent run finished the same demo
            raise


def _write_demo(out_dir: Path, stamp: dict) -> None:
    rng = np.random.default_rng(stamp["seed"])
    cat = _catalogue(rng, stamp["n_items"])
    sequences = [_user_sequence(rng, cat) for _ in range(stamp["n_users"])]
    _write_interactions(out_dir / "interactions.csv", rng, cat, sequences)
    _write_items(out_dir, rng, cat, stamp["image_size"])
    np.savez(out_dir / LATENT, **vars(cat))
    (out_dir / STAMP).write_text(json.dumps(stamp, indent=2) + "\n", encoding="utf-8")


def _catalogue(rng: np.random.Generator, n_items: int) -> Catalogue:
    width = max(5, len(str(n_items)))
    behaviour = rng.integers(N_TOPICS, size=n_items)
    shown = rng.random(n_items)
    text_wrong = shown < OTHER_TEXT
    image_wrong = (shown >= OTHER_TEXT) & (shown < OTHER_TEXT + OTHER_IMAGE)
    missing = rng.random(n_items)
    # Items in topic order, shuffled inside each topic: the position gives the popularity rank
    # and the next item in the same topic (cyclically) is the companion.
    order = np.lexsort((rng.random(n_items), behaviour))
    sizes = np.bincount(behaviour, minlength=N_TOPICS)
    topic_start = np.repeat(np.cumsum(sizes) - sizes, sizes)
    rank = np.arange(n_items) - topic_start  # 0-based rank inside the topic
    companion = np.empty(n_items, dtype=np.int64)
    companion[order] = order[topic_start + (rank + 1) % sizes[behaviour[order]]]
    popularity = np.empty(n_items)
    popularity[order] = 1.0 / (rank + 1)
    return Catalogue(
        item_ids=np.array([f"item{i:0{width}d}" for i in range(n_items)]),
        behaviour=behaviour,
        text_topic=np.where(text_wrong, _other_topic(rng, behaviour), behaviour),
        image_topic=np.where(image_wrong, _other_topic(rng, behaviour), behaviour),
        has_text=missing >= NO_TEXT,
        has_image=(missing < NO_TEXT) | (missing >= NO_TEXT + NO_IMAGE),
        popularity=popularity,
        companion=companion,
    )


def _other_topic(rng: np.random.Generator, topic: np.ndarray) -> np.ndarray:
    return (topic + rng.integers(1, N_TOPICS, size=len(topic))) % N_TOPICS


def _user_sequence(rng: np.random.Generator, cat: Catalogue) -> list[int]:
    length = min(MAX_LEN, MIN_LEN + int(rng.exponential(MEAN_EXTRA_LEN)))
    topic = int(rng.integers(N_TOPICS))
    seq: list[int] = []
    while len(seq) < length:
        if seq and rng.random() < COMPANION and cat.companion[seq[-1]] not in seq:
            seq.append(int(cat.companion[seq[-1]]))
            continue
        step = rng.random()
        if step >= TOPIC_STAY + TOPIC_NEIGHBOUR:
            topic = int(rng.integers(N_TOPICS))
        elif step >= TOPIC_STAY:
            topic = (topic + int(rng.choice((-1, 1)))) % N_TOPICS
        item = _popular_unseen(rng, cat, topic, seq)
        if item is not None:  # None: the user has seen the whole topic, drift on
            seq.append(item)
    return seq


def _popular_unseen(
    rng: np.random.Generator, cat: Catalogue, topic: int, seen: list[int]
) -> int | None:
    members = np.flatnonzero(cat.behaviour == topic)
    weights = cat.popularity[members] * ~np.isin(members, seen)
    total = weights.sum()
    if total == 0:
        return None
    return int(members[np.searchsorted(np.cumsum(weights), rng.random() * total, side="right")])


def _write_interactions(
    path: Path, rng: np.random.Generator, cat: Catalogue, sequences: list[list[int]]
) -> None:
    width = max(5, len(str(len(sequences))))
    start = 1_600_000_000  # 2020-09-13: any fixed epoch keeps the files reproducible
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(("user_id", "item_id", "timestamp"))
        for user, seq in enumerate(sequences):
            first = start + int(rng.integers(0, 180 * 86400))
            times = first + np.cumsum(rng.integers(60, 3 * 86400, size=len(seq)))
            for item, ts in zip(seq, times, strict=True):
                writer.writerow((f"user{user:0{width}d}", cat.item_ids[item], int(ts)))


def _write_items(out_dir: Path, rng: np.random.Generator, cat: Catalogue, image_size: int) -> None:
    (out_dir / "images").mkdir()
    with open(out_dir / "items.jsonl", "w", encoding="utf-8") as f:
        for i, item in enumerate(cat.item_ids):
            record = {"item_id": str(item)}
            if cat.has_text[i]:
                record.update(_item_text(rng, int(cat.text_topic[i])))
            if cat.has_image[i]:
                image = _item_image(rng, int(cat.image_topic[i]), image_size)
                image.save(out_dir / "images" / f"{item}.png", format="PNG")
                record["images"] = [f"images/{item}.png"]
            f.write(json.dumps(record) + "\n")


def _item_text(rng: np.random.Generator, topic: int) -> dict[str, object]:
    name, department, vocabulary = TOPICS[topic]
    w = rng.choice(vocabulary.split(), size=4, replace=False)
    adj, adj2 = rng.choice(ADJECTIVES, size=2, replace=False)
    brand = int(rng.integers(len(BRAND_SUFFIXES)))
    return {
        "title": f"{adj.capitalize()} {w[0]} {w[1]}",
        "description": f"A {adj2} {w[0]} made for {w[2]}. Pairs well with any {w[3]}.",
        "brand": f"{vocabulary.split()[brand].capitalize()} {BRAND_SUFFIXES[brand]}",
        "categories": [department, name.capitalize()],
    }


def _item_image(rng: np.random.Generator, topic: int, size: int) -> Image.Image:
    """A noisy shape: the hue and the shape (of four) identify the topic."""
    hue = topic / N_TOPICS
    fg = tuple(int(255 * c) for c in colorsys.hsv_to_rgb(hue, 0.85, 0.9))
    bg = tuple(int(255 * c) for c in colorsys.hsv_to_rgb((hue + 0.5) % 1, 0.2, 0.95))
    image = Image.new("RGB", (size, size), bg)
    r = size * rng.uniform(0.22, 0.38)
    cx, cy = size / 2 + rng.uniform(-size / 8, size / 8, size=2)
    shape = topic % 4
    draw = ImageDraw.Draw(image)
    if shape == 0:
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fg)
    elif shape == 1:
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fg)
    elif shape == 2:
        draw.polygon(((cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)), fill=fg)
    else:
        draw.polygon(((cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)), fill=fg)
    pixels = np.asarray(image, dtype=np.float64) + rng.normal(0, 12, size=(size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def read_catalogue(data_dir: str | Path) -> Catalogue:
    """The latent truth of a demo dataset written by `generate_demo`."""
    data_dir = Path(data_dir)
    try:
        with np.load(data_dir / LATENT, allow_pickle=False) as latent:
            return Catalogue(**{name: latent[name] for name in latent.files})
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"{data_dir} is not a demo dataset from generate_demo ({e})") from None


def demo_features(data_dir: str | Path, out_file: str | Path, dim: int = 64, seed: int = 0) -> Path:
    """Write a features file straight from the demo's latent topics (no neural encoder).

    Each text slot is the unit vector of the item's text topic plus noise, the one image slot the
    same for the image topic; items lacking a modality get an all-zero mask row.
    """
    cat = read_catalogue(data_dir)
    n = len(cat.item_ids)
    rng = np.random.default_rng(seed)
    topics = rng.normal(size=(N_TOPICS, dim))
    topics /= np.linalg.norm(topics, axis=1, keepdims=True)

    def slots(topic: np.ndarray, present: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
        noise = rng.normal(size=(n, count, dim)) * (FEATURE_NOISE / np.sqrt(dim))
        feats = (topics[topic][:, None, :] + noise) * present[:, None, None]  # (N, count, F)
        return feats.astype(np.float32), np.repeat(present[:, None], count, axis=1).astype(np.uint8)

    text_feats, text_mask = slots(cat.text_topic, cat.has_text, TEXT_SLOTS)
    image_feats, image_mask = slots(cat.image_topic, cat.has_image, 1)
    out_file = Path(out_file)
    save_features(
        out_file,
        FeatureArrays(
            item_ids=tuple(str(i) for i in cat.item_ids),
            text_feats=text_feats,
            text_mask=text_mask,
            image_feats=image_feats,
            image_mask=image_mask,
            meta={"encoder": "demo-latent", "dim": str(dim), "clip_weights": "null"},
        ),
    )
    return out_file


def catalogue_features(n_items: int, dim: int, seed: int = 0, topics: int = 256,
                       centres: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Features of a large synthetic catalogue with the demo's structure, without writing it:
    each item has a text topic and an image topic (the same one for 70% of the items) among
    `topics` unit vectors (`centres`, drawn from `seed` when not given, so that chunks of one
    catalogue can share them), TEXT_SLOTS text slots and one image slot of topic vector plus
    noise, and 5% of the items lack their image. Row 0 is the padding item. Run through a trained
    item tower they give item tables shaped like trained ones (benchmarks/serving.py, the
    approximate-index tests): clustered, not uniform."""
    rng = np.random.default_rng(seed)
    if centres is None:
        centres = catalogue_centres(dim, seed, topics)
    text_topic = rng.integers(0, len(centres), n_items + 1)
    image_topic = np.where(rng.random(n_items + 1) < 0.7, text_topic, rng.integers(0, len(centres), n_items + 1))

    def slots(topic: np.ndarray, count: int) -> np.ndarray:
        noise = rng.normal(size=(n_items + 1, count, dim)) * (FEATURE_NOISE / np.sqrt(dim))
        return (centres[topic][:, None, :] + noise).astype(np.float32)

    out = {"text": slots(text_topic, TEXT_SLOTS), "text_mask": np.ones((n_items + 1, TEXT_SLOTS), bool),
           "image": slots(image_topic, 1), "image_mask": rng.random((n_items + 1, 1)) > 0.05}
    for name in out:
        out[name][0] = 0
    return out


def catalogue_centres(dim: int, seed: int = 0, topics: int = 256) -> np.ndarray:
    centres = np.random.default_rng([seed, topics]).normal(size=(topics, dim))
    return centres / np.linalg.norm(centres, axis=1, keepdims=True)
