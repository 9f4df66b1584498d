"""Export: the parity gate (fp32, fp16), the manifest and its hashes, Triton configs, clean
failures that write nothing, and the C++ example."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mp4sr_cli import app
from mp4sr_rt.errors import ArtifactError, UserError
from mp4sr_rt.manifest import SCHEMA, verify_artifacts

ROOT = Path(__file__).resolve().parents[1]


def cli(*args) -> object:
    return CliRunner().invoke(app, ["export", *map(str, args)])


def assert_clean_failure(result, out: Path, message: str) -> None:
    assert result.exit_code != 0
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not out.exists()
    assert not [p for p in out.parent.glob(f".{out.name}.*")], "staging directory left behind"


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory) -> tuple[Path, Path, dict]:
    """fp32 artifacts and a Triton repository of the tiny run, through the CLI."""
    base = tmp_path_factory.mktemp("export")
    out, triton = base / "artifacts", base / "triton"
    result = cli(tiny_run, "--out", out, "--top-k", 20, "--triton", triton)
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["artifacts"] == str(out)
    return out, triton, plain(verify_artifacts(out))


def plain(manifest) -> dict:
    """A Manifest as the JSON it is written as."""
    return json.loads(json.dumps(manifest.to_dict()))


def test_fp32_export_passes_the_gate_and_describes_itself(exported):
    out, _, manifest = exported
    assert manifest["schema"] == SCHEMA and manifest["precision"] == "fp32"
    assert (manifest["padding"], manifest["pad_id"], manifest["top_k"]) == ("right", 0, 20)
    d2 = manifest["dim"]
    scorer = manifest["models"]["scorer"]
    assert scorer["inputs"] == [{"name": "ids", "dtype": "int64", "shape": ["batch", "history"]}]
    assert scorer["outputs"] == [{"name": "scores", "dtype": "float32", "shape": ["batch", 20]},
                                 {"name": "items", "dtype": "int64", "shape": ["batch", 20]},
                                 {"name": "user", "dtype": "float32", "shape": ["batch", d2]}]
    assert manifest["models"]["item_tower"]["outputs"][0]["shape"] == ["n", d2]
    for role in ("scorer", "item_tower", "history_encoder"):
        f = manifest["parity"][role]["onnxruntime"]
        assert f["rows"] >= 256 and f["max_abs_diff"] <= 1e-4 and f["top10_agreement"] == 1.0
    assert set(manifest["files"]) == {"scorer.onnx", "item_tower.onnx", "history_encoder.onnx",
                                      "items.json", "item_inputs.npy"}
    assert np.load(out / "item_inputs.npy").shape == (manifest["num_items"] + 1, d2)


def test_scorer_never_returns_padding_and_is_padding_invariant(exported):
    import onnxruntime as ort

    out, _, manifest = exported
    session = ort.InferenceSession(str(out / "scorer.onnx"))
    ids = np.array([[3, 0, 0, 0, 0], [1, 2, 3, 4, 5], [0, 0, 0, 0, 0]])  # short, full, empty
    scores, items, _ = session.run(None, {"ids": ids})
    assert items.shape == (3, manifest["top_k"]) and (items > 0).all()
    assert (np.diff(scores, axis=1) <= 0).all()
    _, alone, _ = session.run(None, {"ids": ids[:1, :1]})  # padding does not change the result
    np.testing.assert_array_equal(alone[0], items[0])


@pytest.mark.parametrize("block", [7, 16])
def test_two_stage_top_k_returns_the_same_items(exported, tiny_run, tmp_path, block):
    """--topk-block: the same top K as one TopK over the catalogue, and never a padding column
    (the 61 rows of the tiny catalogue are padded to 63 and 64 columns)."""
    import onnxruntime as ort

    out = tmp_path / "artifacts"
    result = cli(tiny_run, "--out", out, "--top-k", 20, "--topk-block", block)
    assert result.exit_code == 0, result.stderr
    assert verify_artifacts(out).topk_block == block
    ids = np.random.default_rng(block).integers(0, 61, size=(300, 6))
    ids[:, 0] = np.maximum(ids[:, 0], 1)
    one, blocks = (ort.InferenceSession(str(d / "scorer.onnx")).run(None, {"ids": ids}) for d in (exported[0], out))
    np.testing.assert_allclose(blocks[0], one[0], atol=1e-6)
    np.testing.assert_array_equal(blocks[1], one[1])
    assert ((blocks[1] >= 1) & (blocks[1] <= 60)).all()


def scan_graph(table: np.ndarray, k: int):
    """A scorer-shaped graph over `table` (users fed directly as `ids`' stand-in `u`): MatMul +
    TopK, outputs scores, items, user, as the exported scorer's."""
    import onnx
    from onnx import TensorProto as T
    from onnx import helper, numpy_helper

    pad = np.zeros(len(table), np.float32)
    pad[0] = -np.inf
    dim = table.shape[1]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["u"], ["user"]), helper.make_node("MatMul", ["user", "t"], ["s"]),
         helper.make_node("Add", ["s", "pad"], ["s2"]), helper.make_node("TopK", ["s2", "k"], ["scores", "items"])],
        "scorer", [helper.make_tensor_value_info("u", T.FLOAT, ["batch", dim])],
        [helper.make_tensor_value_info("scores", T.FLOAT, ["batch", k]),
         helper.make_tensor_value_info("items", T.INT64, ["batch", k]),
         helper.make_tensor_value_info("user", T.FLOAT, ["batch", dim])],
        [numpy_helper.from_array(np.ascontiguousarray(table.T), "t"), numpy_helper.from_array(pad, "pad"),
         numpy_helper.from_array(np.array([k], np.int64), "k")])
    return onnx.helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("candidates", [10, 40, 400])
def test_int8_scan_bounds_every_item_it_leaves_out(candidates):
    """export/int8_scan.py: no item outside a row's top K scores above its `bound` (checked
    against float64 scores of the whole table), the top K of a row whose K-th score reaches the
    bound is the exact top K, every row is independent of the batch, and the codes fit 7 bits."""
    import onnx
    import onnxruntime as ort
    from mp4sr_export.int8_scan import quantize_rows, with_int8_scan

    rng = np.random.default_rng(candidates)
    n, dim, k = 3000, 16, 10
    table = rng.standard_normal((n + 1, dim)).astype(np.float32)
    table[1:] /= np.linalg.norm(table[1:], axis=1, keepdims=True) * rng.uniform(0.5, 2.0, (n, 1))
    table[0] = 0.0
    model = with_int8_scan(scan_graph(table, k), table, k, candidates)
    onnx.checker.check_model(model, full_check=True)
    assert {i.name for i in model.graph.initializer} >= {"int8_scan/codes_t"}
    assert "t" not in {i.name for i in model.graph.initializer}, "the fp32 scan was not pruned"
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    users = rng.standard_normal((400, dim)).astype(np.float32)
    users[200:] = table[rng.integers(1, n + 1, 200)] + 0.1 * users[200:]  # close to some items
    scores, items, _, bound = session.run(None, {"u": users})
    exact = users.astype(np.float64) @ table[1:].T.astype(np.float64)  # item j is column j - 1
    for row in range(len(users)):
        left_out = np.delete(exact[row], items[row] - 1)
        assert left_out.max() <= bound[row, 0], (row, left_out.max(), bound[row, 0])
    certified = scores[:, k - 1] >= bound[:, 0]
    best = np.argsort(-exact, axis=1, kind="stable")[:, :k] + 1
    np.testing.assert_array_equal(items[certified], best[certified])
    np.testing.assert_allclose(scores[certified], np.take_along_axis(exact, best - 1, 1)[certified], atol=1e-5)
    if candidates >= 400:
        assert certified.all()
    alone = np.concatenate([session.run(None, {"u": users[i:i + 1]})[0] for i in range(20)])
    np.testing.assert_array_equal(alone, scores[:20])
    codes, _ = quantize_rows(table)
    assert np.abs(codes.astype(int)).max() == 63


def test_int8_scan_export(exported, tiny_run, tmp_path):
    """--int8-scan: a `bound` output, the manifest key and the certified share; bad counts, the
    combination with --topk-block and a scan that certifies nothing (candidates = K) fail cleanly."""
    import onnx

    out = tmp_path / "artifacts"
    result = cli(tiny_run, "--out", out, "--top-k", 10, "--int8-scan", 12)  # certifies about half
    assert result.exit_code == 0, result.stderr
    manifest = plain(verify_artifacts(out))
    assert manifest["int8_scan"] == 12 and exported[2]["int8_scan"] == 0
    assert manifest["models"]["scorer"]["outputs"][3] == {"name": "bound", "dtype": "float32", "shape": ["batch", 1]}
    figures = manifest["parity"]["scorer"]["onnxruntime"]
    assert 0.0 < figures["certified"] < 0.95 and figures["top10_agreement"] == 1.0
    assert "certified the top 10 of" in result.stderr and "raise --int8-scan" in result.stderr
    half = tmp_path / "fp16"
    assert cli(tiny_run, "--out", half, "--top-k", 10, "--int8-scan", 30, "--fp16").exit_code == 0
    tables = [t for t in onnx.load(str(half / "scorer.onnx")).graph.initializer if t.name == "int8_scan/table"]
    assert [t.data_type for t in tables] == [onnx.TensorProto.FLOAT16]  # rescored in the scorer's precision
    for args, message in (((5,), "at least the top k (10)"), ((60,), "fewer than the 60 items"),
                          ((20, "--topk-block", 8), "choose one"), ((10,), "certified no history")):
        bad = tmp_path / f"bad-{args[0]}"
        result = cli(tiny_run, "--out", bad, "--top-k", 10, "--int8-scan", *args)
        assert result.exit_code == 2
        assert_clean_failure(result, bad, message)


def test_triton_configs_parse_with_tritons_own_protobuf(exported):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    out, triton, manifest = exported
    for role, model in manifest["models"].items():
        folder = triton / f"mp4sr_{role}"
        config = text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
        assert config.backend == "onnxruntime" and config.max_batch_size == manifest["max_batch"]
        assert [i.name for i in config.input] == [i["name"] for i in model["inputs"]]
        assert [list(o.dims) for o in config.output] == [
            [-1 if isinstance(d, str) else d for d in o["shape"][1:]] for o in model["outputs"]]
        assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
        assert config.dynamic_batching.max_queue_delay_microseconds > 0
        accelerator = config.optimization.execution_accelerators.gpu_execution_accelerator[0]
        assert accelerator.name == "tensorrt"
        assert (folder / "1" / "model.onnx").read_bytes() == (out / model["file"]).read_bytes()


def test_fp16_export_replaces_the_previous_one_and_agrees_on_rankings(exported, tiny_run, tmp_path):
    import onnx
    from mp4sr_export.run import export

    out = tmp_path / "artifacts"
    shutil.copytree(exported[0], out)
    manifest = plain(export(tiny_run, out, fp16=True, top_k=20))
    assert verify_artifacts(out).precision == "fp16" == manifest["precision"]
    for role, model in manifest["models"].items():
        assert {e["dtype"] for e in model["inputs"] + model["outputs"]} <= {"float32", "int64", "bool"}
        f = manifest["parity"][role]["onnxruntime"]
        assert f["top10_agreement"] >= 0.99 and f["top1_agreement"] >= 0.98, (role, f)
    # Recomputed here rather than read back from the manifest: the fp16 scorer's top 10 against
    # PyTorch's full ranking on fresh histories.
    import onnxruntime as ort
    import torch
    from mp4sr_export.onnx import serving_vectors
    from mp4sr_train.checkpoint import load_checkpoint
    from mp4sr_train.model import candidates, score

    ckpt = load_checkpoint(tiny_run / "checkpoint")
    ids = np.random.default_rng(5).integers(1, 61, size=(400, 8))
    ids[np.arange(8)[None, :] >= np.random.default_rng(6).integers(1, 9, size=400)[:, None]] = 0
    with torch.no_grad():
        inputs, outputs = serving_vectors(ckpt)
        ref = torch.topk(score(ckpt.model.encode_history(torch.as_tensor(ids), inputs), candidates(outputs)), 10)
    _, got, _ = ort.InferenceSession(str(out / "scorer.onnx")).run(None, {"ids": ids})
    overlap = np.mean([len(set(a) & set(b[:10])) / 10 for a, b in zip(ref.indices.numpy(), got, strict=True)])
    top1 = np.mean(ref.indices.numpy()[:, 0] == got[:, 0])
    assert overlap >= 0.99 and top1 >= 0.98, (overlap, top1)
    graph = onnx.load(str(out / "scorer.onnx")).graph
    dtypes = {init.name: init.data_type for init in graph.initializer}
    assert onnx.TensorProto.FLOAT16 in dtypes.values()  # weights and the item table in fp16
    for node in graph.node:  # LayerNorm kept in fp32: its scale stays a float32 initializer
        if node.op_type == "LayerNormalization" and node.input[1] in dtypes:
            assert dtypes[node.input[1]] == onnx.TensorProto.FLOAT


def test_corrupted_or_incomplete_artifacts_are_detected(exported, tmp_path):
    out = tmp_path / "artifacts"
    shutil.copytree(exported[0], out)
    data = bytearray((out / "scorer.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (out / "scorer.onnx").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="scorer.onnx"):
        verify_artifacts(out)
    (out / "items.json").unlink()
    with pytest.raises(ArtifactError, match="items.json"):
        verify_artifacts(out)
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "schema": "mp4sr-artifacts/0"}))
    with pytest.raises(ArtifactError, match="schema"):
        verify_artifacts(out)


def test_missing_or_incompatible_run_fails_cleanly(tiny_run, tmp_path):
    out = tmp_path / "artifacts"
    assert_clean_failure(cli(tmp_path / "nowhere", "--out", out), out, "run directory not found")
    run = tmp_path / "run"
    shutil.copytree(tiny_run / "checkpoint", run / "checkpoint")
    sidecar = json.loads((run / "checkpoint" / "config.json").read_text())
    sidecar["config"]["model"]["d"] *= 2  # another model than the tensors hold
    (run / "checkpoint" / "config.json").write_text(json.dumps(sidecar))
    assert_clean_failure(cli(run, "--out", out), out, "incompatible")
    (run / "checkpoint" / "config.json").write_text("{}")
    assert_clean_failure(cli(run, "--out", out), out, "schema")


def test_refuses_to_replace_a_foreign_directory(tiny_run, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    result = cli(tiny_run, "--out", out)
    assert result.exit_code != 0 and "not a previous export" in result.stderr
    assert (out / "notes.txt").read_text() == "keep me"


def test_what_killed_exports_left_beside_the_output_is_removed(tmp_path):
    """A killed export leaves its staging (or moved-aside) directory: the next export to the same
    --out removes those of processes no longer running, and nothing else."""
    import os

    from mp4sr_export.run import remove_stale

    dead = 999_999_999  # above any pid_max: never a running process
    names = {f".artifacts.{dead}.abc.tmp": False, f".artifacts.old-{dead}": False,
             f".artifacts.{os.getpid()}.abc.tmp": True, ".artifacts.notes": True, f".other.{dead}.abc.tmp": True}
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "scorer.onnx").write_bytes(b"partial")
    remove_stale(tmp_path / "artifacts")
    assert {name: (tmp_path / name).exists() for name in names} == names


def test_parity_failure_exits_non_zero_and_writes_nothing(tiny_run, tmp_path, monkeypatch):
    import mp4sr_export.run as export_run
    from mp4sr_export import parity

    specs = export_run.model_specs
    monkeypatch.setattr(export_run, "model_specs", lambda ckpt, k, b: specs(ckpt, k, b)[:1])  # scorer only
    monkeypatch.setattr(parity, "FP32_MAX_ABS", -1.0)  # no model can pass
    out, triton = tmp_path / "artifacts", tmp_path / "triton"
    result = cli(tiny_run, "--out", out, "--triton", triton)
    assert_clean_failure(result, out, "parity gate failed")
    assert not triton.exists()


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None,
                    reason="TensorRT is installed: the missing-TensorRT message cannot be shown")
def test_trt_without_tensorrt_says_so(tiny_run, tmp_path):
    out = tmp_path / "artifacts"
    assert_clean_failure(cli(tiny_run, "--out", out, "--trt"), out, "TensorRT")


def test_manifest_module_does_not_import_torch():
    code = "import sys, mp4sr_rt.manifest; assert 'torch' not in sys.modules and 'onnx' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def ort_headers() -> Path | None:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mp4sr-rt/onnxruntime/include"
    for folder in (os.environ.get("ORT_INCLUDE_DIR"), cache, "/usr/include/onnxruntime"):
        if folder and (Path(folder) / "onnxruntime_cxx_api.h").is_file():
            return Path(folder)
    return None


REQUIRE_CPP = os.environ.get("MP4SR_REQUIRE_CPP") == "1"  # CI: a missing compiler or header fails


@pytest.mark.skipif(not REQUIRE_CPP and shutil.which("g++") is None, reason="no g++")
@pytest.mark.skipif(not REQUIRE_CPP and ort_headers() is None,
                    reason="no onnxruntime C/C++ headers: run examples/cpp/fetch_ort_headers.sh")
def test_cpp_example_scores_like_python(exported, tiny_run, tmp_path):
    assert ort_headers() is not None, "no onnxruntime C/C++ headers: examples/cpp/fetch_ort_headers.sh failed"
    import onnxruntime as ort

    out, _, manifest = exported
    env = {**os.environ, "ORT_INCLUDE_DIR": str(ort_headers()), "PYTHON": sys.executable}
    subprocess.run(["bash", ROOT / "examples/cpp/build.sh", tmp_path], check=True, env=env,
                   capture_output=True)
    vocabulary = json.loads((out / "items.json").read_text())["items"]
    history = [vocabulary[i] for i in (4, 0, 7)]
    run = subprocess.run([tmp_path / "score", out, *history], check=True, capture_output=True, text=True)
    got = [line.split("\t") for line in run.stdout.splitlines()]

    ids = np.array([[vocabulary.index(item) + 1 for item in history]])
    scores, items, _ = ort.InferenceSession(str(out / "scorer.onnx")).run(None, {"ids": ids})
    assert [item for item, _ in got] == [vocabulary[i - 1] for i in items[0, :10]]
    np.testing.assert_allclose([float(s) for _, s in got], scores[0, :10], rtol=1e-5)

    # An int8 scan with few candidates, so that its bound certifies some top 10s and not others:
    # exit status 3 exactly where it does not; where it does, the fp32 scorer's output.
    int8 = tmp_path / "int8"
    assert cli(tiny_run, "--out", int8, "--top-k", 10, "--int8-scan", 15).exit_code == 0
    histories = np.random.default_rng(0).integers(1, len(vocabulary) + 1, size=(200, 3))
    scores, _, _, bound = ort.InferenceSession(str(int8 / "scorer.onnx")).run(None, {"ids": histories})
    certified = scores[:, 9] >= bound[:, 0]
    fp32 = ort.InferenceSession(str(out / "scorer.onnx")).run(None, {"ids": histories})[1]
    for row in (np.argmax(certified), np.argmin(certified)):
        history = [vocabulary[i - 1] for i in histories[row]]
        run = subprocess.run([tmp_path / "score", int8, *history], capture_output=True, text=True)
        assert run.returncode == (0 if certified[row] else 3), run.stderr
        assert certified[row] or "not certified" in run.stderr
        if certified[row]:
            printed = [line.split("\t")[0] for line in run.stdout.splitlines()]
            assert printed == [vocabulary[i - 1] for i in fp32[row, :10]]
    assert certified.any() and not certified.all(), certified.mean()


def test_feature_extractors_are_exported_with_their_preprocessing(extractor_run, tmp_path, monkeypatch):
    import mp4sr_export.run as export_run
    import onnxruntime as ort

    out = tmp_path / "artifacts"
    manifest = plain(export_run.export(extractor_run, out, fp16=True, top_k=20, triton_dir=tmp_path / "triton"))
    verify_artifacts(out)
    models = manifest["models"]
    assert (models["text_encoder"]["precision"], models["scorer"]["precision"]) == ("fp32", "fp16")
    for role in ("text_encoder", "image_encoder"):
        assert manifest["parity"][role]["onnxruntime"]["max_abs_diff"] <= 1e-4
        assert (tmp_path / "triton" / f"mp4sr_{role}" / "config.pbtxt").is_file()
    image = manifest["preprocessing"]["image"]
    words = np.load(out / image["word_vectors"])
    assert words.shape[0] == len(json.loads((out / image["vocabulary"]).read_text()))
    pixels = np.zeros((3, 3, image["image_size"], image["image_size"]), dtype=np.float32)
    vectors = ort.InferenceSession(str(out / "image_encoder.onnx")).run(None, {"pixels": pixels})[0]
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    assert (out / manifest["preprocessing"]["text"]["tokenizer"] / "tokenizer.json").is_file()


def test_a_text_only_catalogue_trains_exports_and_serves_one_modality(tiny_data_dir, tmp_path):
    """No item has an image: `train` leaves the image modality out (and says so), the fp16 export
    records one modality, and `score`, new items and the C++ example work on it."""
    import dataclasses

    import onnxruntime as ort
    from mp4sr_train.features.store import read_features, save_features

    from mp4sr_rt import Scorer

    arrays = read_features(tiny_data_dir / "features.safetensors")
    features = tmp_path / "text-only.safetensors"
    save_features(features, dataclasses.replace(arrays, image_mask=np.zeros_like(arrays.image_mask)))
    run, out = tmp_path / "run", tmp_path / "artifacts"
    python = [sys.executable, "-m", "mp4sr_cli"]
    trained = subprocess.run([*python, "train", "--preset", "tiny", "--data", str(tiny_data_dir), "--features",
                              str(features), "--out", str(run), "--epochs", "1", "--quiet"],
                             capture_output=True, text=True, timeout=600)
    assert trained.returncode == 0, trained.stderr
    assert "no item has image features; the model uses text only" in trained.stderr
    result = cli(run, "--out", out, "--fp16", "--top-k", 20, "--triton", tmp_path / "triton")
    assert result.exit_code == 0, result.stderr
    manifest = verify_artifacts(out)
    assert manifest.modalities == ("text",) and manifest.dim == manifest.item_dim == 16
    tower = (tmp_path / "triton" / "mp4sr_item_tower" / "config.pbtxt").read_text()
    assert '"text_feats"' in tower and "image" not in tower
    assert [t.name for t in manifest.models["item_tower"].inputs] == ["text_feats", "text_mask"]
    assert np.load(out / "item_inputs.npy").shape == (61, 16)

    items = json.loads((out / "items.json").read_text())["items"]
    history = tmp_path / "history.json"
    history.write_text(json.dumps([items[:3], items[5:9]]))
    scored = subprocess.run([*python, "score", str(history), "--artifacts", str(out), "-k", "5"],
                            capture_output=True, text=True, timeout=600)
    assert scored.returncode == 0, scored.stderr
    assert [len(r["items"]) for r in json.loads(scored.stdout)] == [5, 5]

    scorer = Scorer(out, backend="cpu")
    scorer.add_items(["new"], text_feats=np.ones((1, 2, 12), np.float32))
    [rec] = scorer.score([["new", items[0]]], k=3)
    assert len(rec.items) == 3 and rec.unknown_items == []
    with pytest.raises(UserError, match="modalities are text only"):
        scorer.add_items(["new-2"], image_feats=np.ones((1, 1, 12), np.float32))

    if shutil.which("g++") is None or ort_headers() is None:
        assert not REQUIRE_CPP, "CI needs g++ and the onnxruntime headers for the C++ example"
        return
    env = {**os.environ, "ORT_INCLUDE_DIR": str(ort_headers()), "PYTHON": sys.executable}
    subprocess.run(["bash", ROOT / "examples/cpp/build.sh", tmp_path], check=True, env=env, capture_output=True)
    cpp = subprocess.run([tmp_path / "score", out, *items[:3]], check=True, capture_output=True, text=True)
    ids = np.array([[1, 2, 3]])
    _, top, _ = ort.InferenceSession(str(out / "scorer.onnx")).run(None, {"ids": ids})
    assert [line.split("\t")[0] for line in cpp.stdout.splitlines()] == [items[i - 1] for i in top[0, :10]]


def test_export_reads_the_run_directory_alone_and_fails_clearly_without_what_it_recorded(extractor_run, tmp_path):
    """The CLIP word list comes from the run's checkpoint, not the training data (moved away
    here); a word list missing or edited, or an encoder that changed, fails the export, and
    --no-encoders exports without the encoders."""
    run = tmp_path / "run"
    shutil.copytree(extractor_run, run)
    sidecar_path = run / "checkpoint" / "config.json"
    sidecar = json.loads(sidecar_path.read_text())
    sidecar["data"] = str(tmp_path / "moved-away")
    sidecar_path.write_text(json.dumps(sidecar))
    assert cli(run, "--out", tmp_path / "fine", "--top-k", 20).exit_code == 0
    assert verify_artifacts(tmp_path / "fine").preprocessing.image is not None
    for change, message in (
        (lambda f: f.pop("clip_vocabulary"), "record no CLIP word list"),
        (lambda f: f.update(clip_vocabulary=json.dumps(["tent"])), "record no CLIP word list (or it was edited)"),
        (lambda f: f.update(encoder_sha256="0" * 64), "changed since the features were made"),
    ):
        edited = json.loads(json.dumps(sidecar))
        change(edited["features"])
        sidecar_path.write_text(json.dumps(edited))
        bad = tmp_path / "bad"
        assert_clean_failure(cli(run, "--out", bad, "--top-k", 20), bad, message)
        result = cli(run, "--out", tmp_path / "plain", "--top-k", 20, "--no-encoders")
        assert result.exit_code == 0, result.stderr
        assert "text_encoder" not in verify_artifacts(tmp_path / "plain").models


def test_candidate_id_rows_of_their_own_ship_the_serving_table(tiny_data_dir, tmp_path):
    """A model whose candidates have ID rows of their own (`train.ids.candidate_rows` untied): the
    serving table is not the normalised item_inputs, so the export writes item_table.npy, and the
    runtime ranks trained and added items with it as PyTorch does."""
    import torch
    from mp4sr_export.onnx import serving_vectors
    from mp4sr_export.run import export
    from mp4sr_train import config as config_lib
    from mp4sr_train.checkpoint import load_checkpoint
    from mp4sr_train.model import serving_table, untrained_vectors, user_vector
    from mp4sr_train.run import train

    from mp4sr_rt import Scorer
    from mp4sr_rt.scorer import serving_rows

    cfg = config_lib.replace(config_lib.preset("tiny"), {"train.ids.candidate_rows": "untied"})
    run, out = tmp_path / "run", tmp_path / "artifacts"
    train(cfg, tiny_data_dir, tiny_data_dir / "features.safetensors", run, progress=False)
    manifest = export(run, out, top_k=20)
    assert manifest.item_table == "item_table.npy" and "item_table.npy" in manifest.files
    assert manifest.parity["scorer"]["runtime"]["top10_agreement"] == 1.0
    ckpt = load_checkpoint(run / "checkpoint")
    inputs, outputs = serving_vectors(ckpt)
    table = np.load(out / "item_table.npy")
    np.testing.assert_allclose(table, serving_table(outputs).numpy(), atol=1e-6)
    assert np.abs(table - serving_rows(np.load(out / "item_inputs.npy"), 2)).max() > 0.1

    scorer = Scorer(out, backend="cpu")
    rng = np.random.default_rng(0)
    feats = {"text_feats": rng.standard_normal((2, 3, 12)).astype(np.float32),
             "image_feats": rng.standard_normal((2, 1, 12)).astype(np.float32)}
    scorer.add_items(["new-a", "new-b"], **feats)
    items = ckpt.item_ids
    [rec] = scorer.score([[items[0], items[1]]], k=62, exclude_seen=False)
    with torch.no_grad():
        z = torch.stack([ckpt.model.adaptor[m](ckpt.model.pool_slots(m, torch.as_tensor(feats[f"{name}_feats"]),
                                                                     torch.ones(2, feats[f"{name}_feats"].shape[1],
                                                                                dtype=torch.bool)))
                         for m, name in enumerate(("text", "image"))])
        new_table = serving_table(untrained_vectors(z, ckpt.id_emb)[1])
        user = user_vector(ckpt.model.encode_history(torch.tensor([[1, 2]]), inputs))[0]
        want = torch.cat([serving_table(outputs)[1:] @ user, new_table @ user])
    order = [items.index(i) if i in items else len(items) + ["new-a", "new-b"].index(i) for i in rec.items]
    np.testing.assert_allclose(rec.scores, want.numpy()[order], atol=1e-4)
    assert sorted(order) == list(range(len(items) + 2))
