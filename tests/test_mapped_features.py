"""Features that do not fit in memory: float16 files, memory-mapped and read by row (train.run
load_item_features(mapped=True)), against the in-memory float32 path they stand in for."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from mp4sr_train import config as config_lib
from mp4sr_train.data import load_or_preprocess
from mp4sr_train.features.store import RowReader, map_features, read_features, save_features
from mp4sr_train.loop import evaluate
from mp4sr_train.model import M2SE, ItemIdEmbedding
from mp4sr_train.run import features_digest, load_item_features, train
from mp4sr_train.tasks import NegativeSample, pretrain_loss, sampled_finetune_loss

from mp4sr_rt.errors import UserError


@pytest.fixture(scope="module")
def files(tiny_data_dir, tmp_path_factory):
    """The tiny demo's features file, with its item rows shuffled (the file's order is not the
    dataset's), as float32 and as float16; and the split."""
    arrays = read_features(tiny_data_dir / "features.safetensors")
    order = np.random.default_rng(0).permutation(len(arrays.item_ids))
    shuffled = dataclasses.replace(
        arrays, item_ids=tuple(arrays.item_ids[i] for i in order),
        **{k: getattr(arrays, k)[order] for k in ("text_feats", "text_mask", "image_feats", "image_mask")})
    out = tmp_path_factory.mktemp("mapped")
    paths = {}
    for dtype in ("float32", "float16"):
        paths[dtype] = out / f"{dtype}.safetensors"
        save_features(paths[dtype], shuffled, dtype=dtype)
    data, _ = load_or_preprocess(tiny_data_dir, out / "cache", 8, 5)
    return paths, data


def test_float16_halves_the_file_and_maps_the_same_values(files):
    paths, _ = files
    sizes = {d: p.stat().st_size for d, p in paths.items()}
    assert sizes["float16"] < 0.6 * sizes["float32"]
    for path in paths.values():
        read, mapped = read_features(path), map_features(path)
        assert mapped.item_ids == read.item_ids and mapped.meta == read.meta
        for name in ("text_feats", "text_mask", "image_feats", "image_mask"):
            assert isinstance(getattr(mapped, name), np.memmap)
            np.testing.assert_array_equal(getattr(mapped, name), getattr(read, name))


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_mapped_rows_equal_the_in_memory_rows(files, dtype):
    paths, data = files
    memory, _ = load_item_features(paths[dtype], data, torch.device("cpu"))
    mapped, _ = load_item_features(paths[dtype], data, torch.device("cpu"), mapped=True)
    assert mapped.is_mapped and not memory.is_mapped
    assert len(mapped) == len(memory) == data.num_items + 1 and mapped.dim == memory.dim
    assert mapped.present() == memory.present()
    index = torch.tensor([0, 5, 1, 0, data.num_items, 5])  # padding, repeats, the last item
    for a, b in ((mapped.take(index), memory.take(index)), (mapped.materialise(), memory)):
        for name in ("text", "text_mask", "image", "image_mask"):
            assert getattr(a, name).dtype == getattr(b, name).dtype
            torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=0)
    assert features_digest(mapped) == features_digest(memory) == features_digest(memory, chunk=7)
    with pytest.raises(RuntimeError, match="take"):
        mapped.modality(0)


def _resident_file_kb() -> int:
    """This process's resident pages of mapped files (RssFile, Linux)."""
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    pytest.skip("no RssFile in /proc/self/status (not Linux)")


@pytest.mark.parametrize("order", ["in order", "scattered"])
def test_rows_read_from_a_mapped_file_are_not_kept_resident_in_the_process(tmp_path, order):
    rows, width = 8192, 2048  # 32 MiB of float16 rows of 4 KiB
    path = tmp_path / "rows.bin"
    np.arange(rows * width, dtype=np.float16).reshape(rows, width).tofile(path)
    table = np.memmap(path, dtype=np.float16, mode="r", shape=(rows, width))
    reader = RowReader(table)
    if order == "in order":
        reads = [np.arange(start, start + 64) for start in range(0, rows, 64)]
    else:  # a row here and there, as a training step's items
        reads = np.array_split(np.random.default_rng(0).permutation(rows), 64)
    expected = np.fromfile(path, np.float16).reshape(rows, width)
    before = _resident_file_kb()
    for index in reads:
        np.testing.assert_array_equal(reader.read(index), expected[index])
    assert (_resident_file_kb() - before) << 10 < 1 << 20  # through the reader: nothing stays mapped in
    for index in reads:
        table[index].copy()
    assert (_resident_file_kb() - before) << 10 > 24 << 20  # through the map: the whole file stays
    with pytest.raises(UserError, match="truncated"):
        reader.read(np.array([rows]))


def test_training_reads_mapped_features_through_row_readers(files):
    paths, data = files
    mapped, _ = load_item_features(paths["float16"], data, torch.device("cpu"), mapped=True)
    assert mapped.readers is not None and all(isinstance(r, RowReader) for r in mapped.readers)


def test_float16_features_are_float32_rounded_to_half(files):
    paths, data = files
    f32, _ = load_item_features(paths["float32"], data, torch.device("cpu"))
    f16, _ = load_item_features(paths["float16"], data, torch.device("cpu"), mapped=True)
    torch.testing.assert_close(f16.materialise().text, f32.text.half().float(), rtol=0, atol=0)
    assert features_digest(f16) != features_digest(f32)


def test_evaluation_and_training_steps_are_the_same_on_mapped_features(files):
    paths, data = files
    cfg = config_lib.preset("tiny")
    memory, _ = load_item_features(paths["float32"], data, torch.device("cpu"))
    mapped, _ = load_item_features(paths["float32"], data, torch.device("cpu"), mapped=True)
    torch.manual_seed(0)
    model = M2SE(cfg.model, memory.dim).eval()  # no dropout: the same computation on both
    id_emb = ItemIdEmbedding.create(cfg.train.ids, data.num_items, cfg.model.d,
                                    torch.as_tensor(data.train_counts > 0), 2)
    assert evaluate(model, mapped, data.test, 64, id_emb) == pytest.approx(
        evaluate(model, memory, data.test, 64, id_emb), abs=1e-12)
    ids = torch.as_tensor(data.train.histories[:16])
    targets = torch.as_tensor(data.train.targets[:16])
    train_cfg = dataclasses.replace(cfg.train, ids=dataclasses.replace(cfg.train.ids, dropout=0.0))
    sample = NegativeSample(np.bincount(data.train.targets, minlength=data.num_items + 1), 20, "popularity", True)
    losses = []
    for feats in (memory, mapped):
        step = sampled_finetune_loss(model, id_emb, feats, ids, targets, train_cfg, sample,
                                     torch.Generator().manual_seed(3))[0]
        pre = pretrain_loss(model, feats, ids, targets, train_cfg, torch.Generator().manual_seed(3), sample)[0]
        losses.append((step.item(), pre.item()))
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_training_on_a_float16_file_maps_it(files, tiny_data_dir, tmp_path, capsys):
    """The large-catalogue path (sampled softmax) reads the features from the file, end to end."""
    paths, _ = files
    cfg = config_lib.replace(config_lib.preset("tiny"), {
        "train.softmax.kind": "sampled", "train.softmax.negatives": 16,
        "train.pretrain.epochs": 1, "train.finetune.epochs": 1})
    metrics = train(cfg, tiny_data_dir, paths["float16"], tmp_path / "run", progress=False)
    assert "memory-mapped" in capsys.readouterr().err
    assert 0 <= metrics["finetune"]["test"]["ndcg@10"] <= 1
    assert (tmp_path / "run" / "checkpoint" / "items.safetensors").is_file()


def test_a_damaged_file_is_one_clear_error(files, tmp_path):
    paths, _ = files
    data = paths["float16"].read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="unreadable"):
        map_features(cut)
    bad = tmp_path / "header.safetensors"
    bad.write_bytes((10**12).to_bytes(8, "little") + data[8:])
    with pytest.raises(UserError, match="unreadable"):
        map_features(bad)
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    header["__metadata__"]["schema"] = "other/1"
    text = json.dumps(header).encode()
    other = tmp_path / "schema.safetensors"
    other.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + length:])
    with pytest.raises(UserError, match="schema"):
        map_features(other)
    with pytest.raises(UserError, match="not found"):
        map_features(tmp_path / "missing.safetensors")
