"""The parity gate: every exported model against the PyTorch model, on other shapes than traced.

The reference is train.model's own serving path (encode_history, score, serving_table,
user_vector, encode_items), not the export wrappers, so the gate also checks the wrappers; and
once the artifact directory is written, the runtime itself is checked against it too
(`check_runtime`: mp4sr_rt.Scorer, with its own padding, exclusions and rescans).
Histories are right-padded random item ids with random lengths (padding in most rows).

    figures = check_all(ckpt, runners, k)          # {role: {backend: {figure: value}}}
    failures = gate(figures, {"scorer": "fp16", ...})  # per model precision; [] when all pass

Each recommender model yields the same figures: `max_abs_diff` of its float outputs, and the
top-10 / top-1 agreement of the rankings it produces (the scorer's items; the others' vectors
ranked by dot product) with the reference's, averaged over `rows` histories. The feature
extractors (text_encoder, image_encoder; always fp32) yield `max_abs_diff` over `rows` inputs
against train.features' own encode functions. A scorer with an int8 scan (export --int8-scan)
adds `certified`, the share of histories whose top 10 its `bound` certifies; the other figures
then cover those histories, as the runtime rescans the rest in full precision.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from mp4sr_export.onnx import serving_vectors
from mp4sr_train.checkpoint import Checkpoint
from mp4sr_train.model import candidates, concat_modalities, score, serving_table, untrained_vectors, user_vector

from mp4sr_rt.errors import UserError

FP32_MAX_ABS = 1e-4  # fp32: max |difference| of any score / vector component ...
FP32_TOP10 = 1.0  # ... and identical top-10 sets
FP16_TOP10 = 0.99  # fp16: judged on rankings (STYLE 8): mean top-10 overlap ...
FP16_TOP1 = 0.98  # ... and top-1 equality, over at least MIN_ROWS histories
MIN_ROWS = 256
TOP = 10
SLOTS = {"text": 5, "image": 4}  # slots of the item-tower check (traced: 3 and 2)


class ParityError(UserError):
    """An exported model disagrees with PyTorch beyond the gate: the export is discarded."""


Runner = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


def ort_runner(path: Path) -> Runner:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return lambda feeds: dict(zip(names, session.run(None, feeds), strict=True))


def histories(rng: np.random.Generator, num_items: int, batch: int, length: int) -> np.ndarray:
    """Right-padded ids (batch, length) of trained items; row 0 full, the others 1..length long."""
    ids = rng.integers(1, num_items + 1, size=(batch, length))
    lengths = rng.integers(1, length + 1, size=batch)
    lengths[0] = length
    ids[np.arange(length)[None, :] >= lengths[:, None]] = 0
    return ids


def batches(rng: np.random.Generator, ckpt: Checkpoint) -> list[np.ndarray]:
    """Histories of (batch, length) shapes other than the traced (2, 3): the smallest case, max_len
    itself, and a large batch that carries the statistics (308 rows in all)."""
    max_len, n = ckpt.cfg.model.max_len, len(ckpt.item_ids)
    shapes = [(1, 1), (7, max_len), (300, max(1, max_len - 1))]
    return [histories(rng, n, b, length) for b, length in shapes]


def top_items(scores: np.ndarray, top: int) -> np.ndarray:
    """Indices of the `top` highest scores per row, best first."""
    part = np.argpartition(-scores, top - 1, axis=1)[:, :top]
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def agreement(ref: np.ndarray, got: np.ndarray, top: int) -> dict[str, float]:
    """Mean top-`top` set overlap and top-1 equality of two (rows, >= top) item rankings."""
    if not len(ref):
        return {f"top{TOP}_agreement": 0.0, "top1_agreement": 0.0}
    overlap = [len(set(r[:top]) & set(g[:top])) / top for r, g in zip(ref, got, strict=True)]
    return {f"top{TOP}_agreement": float(np.mean(overlap)),
            "top1_agreement": float(np.mean(ref[:, 0] == got[:, 0]))}


def reference_users(ckpt: Checkpoint, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        h = ckpt.model.encode_history(torch.as_tensor(ids), serving_vectors(ckpt)[0])
        return user_vector(h).numpy()


def check_scorer(ckpt: Checkpoint, run: Runner, k: int, rng: np.random.Generator) -> dict:
    """With an int8 scan (a `bound` output), only the top 10 of the rows where the bound certifies
    it is compared: the runtime rescans the others in full precision. `certified` is their share."""
    inputs, outputs = serving_vectors(ckpt)
    cands = candidates(outputs)
    top = min(TOP, k)
    max_abs, pad_returned, ref_items, got_items, rows = 0.0, False, [], [], 0
    for ids in batches(rng, ckpt):
        with torch.no_grad():
            h = ckpt.model.encode_history(torch.as_tensor(ids), inputs)
            ref_scores, ref_top = torch.topk(score(h, cands), k)
            ref_user = user_vector(h).numpy()
        out = run({"ids": ids})
        rows += len(ids)
        certified, columns = np.ones(len(ids), bool), k
        if "bound" in out:
            certified, columns = out["scores"][:, top - 1] >= out["bound"][:, 0], top
        diff = np.abs(out["scores"][certified, :columns] - ref_scores.numpy()[certified, :columns])
        max_abs = max(max_abs, float(np.abs(out["user"] - ref_user).max()), float(diff.max(initial=0.0)))
        pad_returned |= bool((out["items"] == 0).any())
        ref_items.append(ref_top.numpy()[certified])
        got_items.append(out["items"][certified])
    ref, got = np.concatenate(ref_items), np.concatenate(got_items)
    figures = {"rows": rows, "max_abs_diff": max_abs, **agreement(ref, got, top), "padding_returned": pad_returned}
    return figures | ({"certified": len(ref) / rows} if "bound" in out else {})


def check_item_tower(ckpt: Checkpoint, run: Runner, rng: np.random.Generator) -> dict:
    """New items from random features (some lacking a modality), ranked for real users."""
    n, feat_dim = MIN_ROWS + 44, ckpt.model.feat_dim
    feeds, pools = {}, []
    missing = {"text": slice(0, n // 10), "image": slice(-n // 10, None)}  # items lacking the modality
    for m, name in enumerate(ckpt.model.cfg.modalities):
        mask = rng.random((n, SLOTS[name])) < 0.7
        mask[missing[name]] = False  # these items get the learned missing vector for this modality
        feeds[f"{name}_feats"] = rng.standard_normal((n, SLOTS[name], feat_dim)).astype(np.float32)
        feeds[f"{name}_mask"] = mask
        pools.append((m, torch.as_tensor(feeds[f"{name}_feats"]), torch.as_tensor(mask)))
    with torch.no_grad():  # encode_items, on these items' slots
        z = torch.stack([ckpt.model.adaptor[m](ckpt.model.pool_slots(m, x, mask)) for m, x, mask in pools])
        x, x_out = untrained_vectors(z, ckpt.id_emb)
        ref = {"table": serving_table(x_out).numpy(), "inputs": concat_modalities(x).numpy()}
    out = run(feeds)
    users = np.concatenate([reference_users(ckpt, ids) for ids in batches(rng, ckpt)])
    top = min(TOP, n)
    return {"rows": len(users), "max_abs_diff": max(float(np.abs(out[k] - ref[k]).max()) for k in ref),
            **agreement(top_items(users @ ref["table"].T, top), top_items(users @ out["table"].T, top), top)}


def check_history_encoder(ckpt: Checkpoint, run: Runner, rng: np.random.Generator) -> dict:
    """The scorer's histories given as sequence-input vectors (rows of item_inputs.npy)."""
    inputs, outputs = serving_vectors(ckpt)
    rows = concat_modalities(inputs).numpy()  # (N + 1, M d), = item_inputs.npy
    table = serving_table(outputs).numpy()[1:]  # ranked without the padding item
    ref_users, got_users = [], []
    for ids in batches(rng, ckpt):
        out = run({"inputs": rows[ids], "lengths": (ids != 0).sum(1).astype(np.int64)})
        ref_users.append(reference_users(ckpt, ids))
        got_users.append(out["user"])
    ref, got = np.concatenate(ref_users), np.concatenate(got_users)
    top = min(TOP, len(table))
    return {"rows": len(ref), "max_abs_diff": float(np.abs(got - ref).max()),
            **agreement(top_items(ref @ table.T, top), top_items(got @ table.T, top), top)}


def check_text_encoder(text, run: Runner, rng: np.random.Generator) -> dict:
    """Sentences of 1 to 40 words (padded batches of 1 and 9, truncation included) against
    TextEncoder.encode."""
    words = "red tent sleeps four people rain light waterproof stove lantern green kg".split()
    sentences = [" ".join(rng.choice(words, size=n)) for n in rng.integers(1, 41, size=10)]
    sentences[-1] = " ".join(["tent"] * (text.max_length + 8))  # longer than the encoder's maximum
    max_abs = 0.0
    for batch in (sentences[:1], sentences[1:]):
        tokens = text.tokenizer(batch, padding=True, truncation=True, max_length=text.max_length,
                                return_tensors="np")
        out = run({"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]})
        max_abs = max(max_abs, float(np.abs(out["vectors"] - text.encode(batch)).max()))
    return {"rows": len(sentences), "max_abs_diff": max_abs}


def check_image_encoder(clip, run: Runner, rng: np.random.Generator) -> dict:
    """Random images of several sizes, preprocessed as Clip does, against Clip.encode_images."""
    from PIL import Image

    images = [Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))
              for h, w in ((20, 24), (64, 48), (300, 200), (33, 33), (224, 224))]
    pixels = np.stack([clip.preprocess(image).numpy() for image in images])
    out = run({"pixels": pixels})
    return {"rows": len(images), "max_abs_diff": float(np.abs(out["vectors"] - clip.encode_images(images)).max())}


def check_runtime(ckpt: Checkpoint, artifacts: Path, k: int) -> dict:
    """The runtime itself (mp4sr_rt.Scorer on the CPU backend: its per-width padding, its
    exclusion of seen items, its rescans when those exhaust the scorer's top K or the int8 bound
    cannot certify a top k) on the parity histories, against PyTorch's full ranking without the
    history's own items. Adds `top10_ordered`: the share of rows whose top 10 is the same in the
    same order."""
    from mp4sr_rt.scorer import Scorer

    scorer = Scorer(artifacts, backend="cpu", ann=False)  # the exact path: an index has its own gate
    inputs, outputs = serving_vectors(ckpt)
    cands = candidates(outputs)
    top = min(TOP, k)
    ref_items, got_items, max_abs, ordered = [], [], 0.0, 0
    for ids in batches(np.random.default_rng(1), ckpt):
        with torch.no_grad():
            s = score(ckpt.model.encode_history(torch.as_tensor(ids), inputs), cands)
            s.scatter_(1, torch.as_tensor(ids), float("-inf"))  # seen items (and column 0, padding)
            ref_scores, ref_top = (t.numpy() for t in torch.topk(s, top))
        recs = scorer.score([[ckpt.item_ids[i - 1] for i in row if i] for row in ids], k=top)
        got = np.array([[scorer._index[str(item)] for item in rec.items] for rec in recs])
        max_abs = max(max_abs, float(np.abs(np.array([rec.scores for rec in recs]) - ref_scores).max()))
        ordered += int((got == ref_top).all(axis=1).sum())
        ref_items.append(ref_top)
        got_items.append(got)
    ref, got = np.concatenate(ref_items), np.concatenate(got_items)
    return {"rows": len(ref), "max_abs_diff": max_abs, **agreement(ref, got, top),
            "top10_ordered": ordered / len(ref), "rescans": scorer.rescans}


def check_all(ckpt: Checkpoint, runners: dict[tuple[str, str], Runner], k: int, text=None, clip=None) -> dict:
    """Figures for each (role, backend) runner: {role: {backend: figures}}; `text` and `clip` are
    the feature extractors behind text_encoder and image_encoder."""
    checks = {
        "scorer": lambda run, rng: check_scorer(ckpt, run, k, rng),
        "item_tower": lambda run, rng: check_item_tower(ckpt, run, rng),
        "history_encoder": lambda run, rng: check_history_encoder(ckpt, run, rng),
        "text_encoder": lambda run, rng: check_text_encoder(text, run, rng),
        "image_encoder": lambda run, rng: check_image_encoder(clip, run, rng),
    }
    figures: dict[str, dict] = {}
    for (role, backend), run in runners.items():
        figures.setdefault(role, {})[backend] = checks[role](run, np.random.default_rng(0))
    return figures


def gate(figures: dict, precisions: dict[str, str]) -> list[str]:
    """Failures (empty when all pass), per model precision: fp32 on exactness, fp16 on ranking
    agreement. The feature extractors (no ranking figures) are judged on exactness alone."""
    failures = []
    for role, per_backend in figures.items():
        precision = precisions[role]
        for backend, f in per_backend.items():
            where = f"{role} ({backend}, {precision})"
            ranked = f"top{TOP}_agreement" in f
            top10 = f.get(f"top{TOP}_agreement", 1.0)
            if f.get("padding_returned"):
                failures.append(f"{where}: returned the padding item")
            if f.get("certified") == 0.0:
                failures.append(f"{where}: the int8 scan's bound certified no history's top {TOP}; "
                                "rescore more candidates (--int8-scan)")
                continue
            if ranked and f["rows"] < MIN_ROWS:
                failures.append(f"{where}: only {f['rows']} rows checked (< {MIN_ROWS})")
            if precision == "fp32" and (f["max_abs_diff"] > FP32_MAX_ABS or top10 < FP32_TOP10):
                failures.append(f"{where}: max |diff| {f['max_abs_diff']:.2e} (limit {FP32_MAX_ABS:.0e}), "
                                f"top-{TOP} agreement {top10:.4f} (must be identical)")
            if precision == "fp16" and (top10 < FP16_TOP10 or f["top1_agreement"] < FP16_TOP1):
                failures.append(f"{where}: top-{TOP} agreement {top10:.4f} (>= {FP16_TOP10}), "
                                f"top-1 {f['top1_agreement']:.4f} (>= {FP16_TOP1})")
    return failures
