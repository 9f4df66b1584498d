"""Catalogue versions (mp4sr_rt/catalogue.py) and the serving protocol (mp4sr_rt/serving/protocol.py),
in-process: what the server tests (test_serve.py) rely on, without a server."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from mp4sr_rt import catalogue
from mp4sr_rt.errors import ArtifactError, UserError
from mp4sr_rt.manifest import verify_artifacts
from mp4sr_rt.scorer import Scorer
from mp4sr_rt.serving.protocol import outputs, parse_change, parse_queries


@pytest.fixture()
def directory(tiny_artifacts, tmp_path):
    out = tmp_path / "artifacts"
    shutil.copytree(tiny_artifacts, out)
    return out


def features(n: int, dim: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"text_feats": rng.normal(size=(n, 3, dim)).astype(np.float32),
            "image_feats": rng.normal(size=(n, 2, dim)).astype(np.float32)}


def test_versions_persist_are_taken_up_by_refresh_and_keep_one_version_back(directory):
    scorer = Scorer(directory)
    dim, base = scorer.manifest.features.dim, scorer.num_base
    ids = [str(i) for i in json.loads((directory / "items.json").read_text())["items"]]
    other = Scorer(directory)  # a second process's view: picks versions up by refresh()
    assert catalogue.update(scorer, lambda s: s.add_items(["n1", "n2"], **features(2, dim))) == 1
    assert catalogue.update(scorer, lambda s: s.remove_items(["n1", ids[0]])) == 2
    assert other.num_items == base and other.refresh() and not other.refresh()
    fresh = Scorer(directory)
    for s in (other, fresh):
        assert s.num_items == base + 2 and s.removed == [ids[0], "n1"]
    histories = [[ids[3], "n2"], ids[:5], ["n2"]]
    for a, b in zip(scorer.score(histories, k=61), fresh.score(histories, k=61), strict=True):
        assert a == b and ids[0] not in a.items and "n1" not in a.items
    assert catalogue.update(other, lambda s: s.add_items(["n3"], **features(1, dim, 1))) == 3
    assert sorted(p.name for p in (directory / "catalogue").iterdir()) == ["v2", "v3"]
    assert scorer.refresh() and scorer.score([["n3"]], k=3) == Scorer(directory).score([["n3"]], k=3)
    manifest = verify_artifacts(directory)
    assert manifest.catalogue.version == 3 and manifest.catalogue.added == 3 and manifest.catalogue.removed == 2


def test_a_reader_whose_version_is_removed_while_it_reads_takes_the_newest(directory, monkeypatch):
    """Versions are kept two deep: a server reading version 1 while two more are committed finds
    its files gone, and must serve version 3 rather than fail its requests."""
    import mp4sr_rt.scorer as scorer_module

    writer, reader = Scorer(directory), Scorer(directory)
    dim = writer.manifest.features.dim
    catalogue.update(writer, lambda s: s.add_items(["n1"], **features(1, dim)))
    verify = scorer_module.verify_files
    fired = []

    def verify_after_two_commits(directory_, manifest, files):
        if not fired:  # the reader's first read: versions 2 and 3 land meanwhile, version 1 goes
            fired.append(manifest.catalogue.version)
            for v in (2, 3):
                catalogue.update(writer, lambda s, v=v: s.add_items([f"n{v}"], **features(1, dim, v)))
        return verify(directory_, manifest, files)

    monkeypatch.setattr(scorer_module, "verify_files", verify_after_two_commits)
    assert reader.refresh() and fired == [1] and reader.manifest.catalogue.version == 3
    assert reader.score([["n3"]], k=3) == Scorer(directory).score([["n3"]], k=3)


def test_a_change_that_fails_commits_nothing_and_restores_the_scorer(directory):
    scorer = Scorer(directory)
    dim = scorer.manifest.features.dim
    catalogue.update(scorer, lambda s: s.add_items(["n1"], **features(1, dim)))
    before = (directory / "manifest.json").read_bytes()

    def half_done(s: Scorer) -> None:
        s.add_items(["n2"], **features(1, dim))
        raise UserError("stopped half way")

    with pytest.raises(UserError, match="half way"):
        catalogue.update(scorer, half_done)
    assert (directory / "manifest.json").read_bytes() == before
    assert scorer.num_items == scorer.num_base + 1 and "n2" not in {str(i) for i in scorer.catalogue_state()[0]}
    with pytest.raises(UserError, match="already in the catalogue"):
        catalogue.update(scorer, lambda s: s.add_items(["n1"], **features(1, dim)))
    with pytest.raises(UserError, match="not in the catalogue"):
        catalogue.update(scorer, lambda s: s.remove_items(["nope"]))
    assert (directory / "manifest.json").read_bytes() == before


KILLED_WRITER = """
import os, signal, sys
import numpy as np
from mp4sr_rt import catalogue
from mp4sr_rt.scorer import Scorer
scorer = Scorer(sys.argv[1])
stage = sys.argv[2]
real = os.replace
def replace(src, dst):
    if (stage == "folder" and str(dst).endswith("/v2")) or (stage == "manifest" and str(dst).endswith("manifest.json")):
        os.kill(os.getpid(), signal.SIGKILL)
    real(src, dst)
os.replace = replace
dim = scorer.manifest.features.dim
catalogue.update(scorer, lambda s: s.add_items(["late"], text_feats=np.ones((1, 1, dim), np.float32)))
"""


@pytest.mark.parametrize("stage", ["folder", "manifest"])
def test_a_writer_killed_before_a_rename_leaves_the_old_version_and_the_next_one_commits(directory, stage):
    scorer = Scorer(directory)
    catalogue.update(scorer, lambda s: s.add_items(["n1"], **features(1, scorer.manifest.features.dim)))
    r = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(directory), stage], capture_output=True, timeout=120)
    assert r.returncode == -9, r.stderr.decode()
    assert verify_artifacts(directory).catalogue.version == 1  # the old version, valid by its hashes
    assert Scorer(directory).num_items == scorer.num_base + 1
    assert catalogue.update(scorer, lambda s: s.remove_items(["n1"])) == 2  # cleans what the kill left
    assert sorted(os.listdir(directory / "catalogue")) == ["v1", "v2"]
    assert Scorer(directory).removed == ["n1"]


def test_a_damaged_version_is_refused_by_name(directory):
    scorer = Scorer(directory)
    catalogue.update(scorer, lambda s: s.add_items(["n1"], **features(1, scorer.manifest.features.dim)))
    table = directory / "catalogue" / "v1" / "added_table.npy"
    table.write_bytes(table.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(ArtifactError, match="added_table.npy"):
        Scorer(directory)


def test_requests_parse_row_by_row_and_bad_ones_name_the_input():
    history = np.array([[b"a", b"b"], [b"c", b""]], dtype=object)
    queries = parse_queries({"history": history, "k": np.array([[3], [5]], np.int32),
                             "allow": np.array([[b"x", b""], [b"", b""]], dtype=object)}, num_items=10)
    assert [(q.history, q.k, q.exclude_seen, q.exclude, q.allow) for q in queries] == [
        (["a", "b"], 3, True, (), ("x",)), (["c"], 5, True, (), ())]
    for inputs, message in (
        ({}, "missing input 'history'"),
        ({"history": history, "nope": history}, "unknown input 'nope'"),
        ({"history": history, "k": np.array([[0], [1]], np.int32)}, "k: 0 is not between 1"),
        ({"history": history, "k": np.array([[11], [1]], np.int32)}, "catalogue size"),
        ({"history": history, "k": np.array([[1]], np.int32)}, "k: expected shape"),
        ({"history": np.array([b"a"], dtype=object)}, "history: expected shape"),
        ({"history": np.array([[b"\xff"]], dtype=object)}, "history: element 0 is not UTF-8"),
    ):
        with pytest.raises(UserError, match=message):
            parse_queries(inputs, num_items=10)
    for inputs, message in (({"ids": np.array([b"x"], dtype=object)}, "missing input 'action'"),
                            ({"action": np.array([b"drop"], dtype=object), "ids": np.array([b"x"], dtype=object)},
                             "expected 'add' or 'remove'"),
                            ({"action": np.array([b"add"], dtype=object), "ids": np.array([b"x"], dtype=object),
                              "texts": np.array([b"a", b"b"], dtype=object)}, "texts: 2 elements for 1 ids")):
        with pytest.raises(UserError, match=message):
            parse_change(inputs)


def test_responses_pad_short_rows():
    from mp4sr_rt.scorer import Recommendation

    out = outputs([Recommendation(["a", "b"], [2.0, 1.0]), Recommendation(["c"], [0.5], ["zz"], "popular")])
    assert out["items"].tolist() == [[b"a", b"b"], [b"c", b""]]
    assert out["scores"].tolist() == [[2.0, 1.0], [0.5, 0.0]]
    assert out["unknown_items"].tolist() == [[b""], [b"zz"]]
    assert out["fallback"].tolist() == [[b""], [b"popular"]]


def test_catalogue_add_refuses_bad_feature_files_and_commits_nothing(directory, tmp_path):
    from typer.testing import CliRunner

    from mp4sr_cli import app

    dim = Scorer(directory, backend="cpu").manifest.features.dim
    good = features(1, dim)
    np.save(tmp_path / "one.npy", good["text_feats"])
    (tmp_path / "garbage.npz").write_bytes(b"PK\x03\x04 not a zip archive")
    np.savez(tmp_path / "bytes-ids.npz", ids=np.array([b"n1"]), **good)
    np.savez(tmp_path / "padded-id.npz", ids=np.array([" n1"]), **good)
    np.savez(tmp_path / "text-feats.npz", ids=np.array(["n1"]),
             **{**good, "text_feats": good["text_feats"].astype(str)})
    cases = {"one.npy": "expected an .npz of named arrays", "garbage.npz": "not a readable .npz file",
             "bytes-ids.npz": "'ids' of strings or integers", "padded-id.npz": "leading or trailing spaces",
             "text-feats.npz": "text_feats must hold real numbers"}
    for name, message in cases.items():
        result = CliRunner().invoke(app, ["catalogue", "add", str(directory), "--features", str(tmp_path / name)])
        assert result.exit_code == 2 and message in result.stderr, (name, result.output)
    assert not (directory / "catalogue").exists() and Scorer(directory, backend="cpu").num_items == \
        Scorer(directory, backend="cpu").num_base
