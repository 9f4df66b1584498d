"""`mp4sr-rt score`: history files (property-based), exit codes and output, and the runtime
installed alone (no torch) into a fresh virtual environment."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from mp4sr_cli import app
from mp4sr_rt.errors import UserError
from mp4sr_rt.histories import HistoryRequest, InvalidEntry, parse_histories

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "examples" / "history.json"


@pytest.fixture(scope="module")
def item_ids(tiny_artifacts) -> list[str]:
    return json.loads((tiny_artifacts / "items.json").read_text())["items"]


def run_score(*args: str, stdin: str | None = None, python: str = sys.executable):
    return subprocess.run([python, "-m", "mp4sr_cli", "score", *args], input=stdin,
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


# -- parsing, property-based -----------------------------------------------------------------

item_id = st.text(max_size=12) | st.integers(-(2**70), 2**70)
json_scalar = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
json_value = st.recursive(
    json_scalar,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(
        st.sampled_from(["user", "history", "items"]) | st.text(max_size=5), children, max_size=3),
    max_leaves=25,
)


def check_entries(entries) -> None:
    assert isinstance(entries, list)
    assert len({e.position for e in entries}) == len(entries)
    for e in entries:
        if isinstance(e, HistoryRequest):
            assert all(isinstance(i, (str, int)) and not isinstance(i, bool) for i in e.items)
        else:
            assert isinstance(e, InvalidEntry) and e.error
        assert e.user is None or (isinstance(e.user, (str, int)) and not isinstance(e.user, bool))


@settings(max_examples=300, deadline=None)
@given(json_value)
def test_any_json_gives_entries_or_one_clear_error(value):
    try:
        entries = parse_histories(json.dumps(value))
    except UserError as e:
        assert str(e)
        return
    check_entries(entries)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(json_value.map(json.dumps), st.text(max_size=20)), max_size=6))
def test_any_text_or_json_lines_gives_entries_or_one_clear_error(lines):
    try:
        entries = parse_histories("\n".join(lines))
    except UserError as e:
        assert str(e)
        return
    check_entries(entries)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.none() | st.text(max_size=8) | st.integers(), st.lists(item_id, max_size=6)),
                min_size=1, max_size=5),
       st.sampled_from(["list", "objects", "json-lines"]))
def test_valid_histories_keep_their_items_users_and_order(histories, form):
    objects = [{"user": user, "history": items} for user, items in histories]
    if form == "list":
        text, expected_users = json.dumps([items for _, items in histories]), [None] * len(histories)
    else:
        expected_users = [user for user, _ in histories]
        text = "\n".join(map(json.dumps, objects)) if form == "json-lines" else json.dumps(objects)
    entries = parse_histories(text)
    assert [e.items for e in entries] == [tuple(items) for _, items in histories]
    assert [e.user for e in entries] == expected_users


@pytest.mark.parametrize(("text", "position", "message"), [
    ('["a", 1.5]', "document", "history[1]: expected a string or integer item id, got number 1.5"),
    ('[["a"], 3]', "[1]", "expected a list of item ids or an object, got integer 3"),
    ('[{"user": [1], "history": []}]', "[0]", "'user' must be a string, an integer or null"),
    ('{"user": 1}', "document", "missing key 'history'"),
    ('{"history": [], "extra": 1}', "document", "unknown key 'extra'"),
    ('{"history": "abc"}', "document", "'history' must be a list of item ids, got string"),
    ('["a"]\n{"history": [true]}', "line 2", "history[0]: expected a string or integer item id, got boolean"),
    ('["a"]\n[1, 2', "line 2", "invalid JSON"),
])
def test_invalid_entries_name_their_position(text, position, message):
    invalid = [e for e in parse_histories(text) if isinstance(e, InvalidEntry)]
    assert [e.position for e in invalid] == [position]
    assert message in invalid[0].error


@pytest.mark.parametrize(("text", "message"), [
    ("", "empty"),
    ('[["a"],\n ["b"\n', "not valid JSON: Expecting"),
    ("[" * 100_000, "not valid JSON"),
])
def test_unsplittable_text_is_one_clear_error(text, message):
    with pytest.raises(UserError, match=message):
        parse_histories(text)


def test_flat_list_is_one_history_and_empty_list_is_an_empty_history():
    [one] = parse_histories('["a", 2]')
    assert (one.position, one.items) == ("document", ("a", 2))
    [empty] = parse_histories("[]")
    assert empty.items == ()


# -- the command, in process: random input never crashes it ----------------------------------

@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(json_value.map(json.dumps), st.text(max_size=30)), st.booleans())
def test_command_never_crashes(tiny_artifacts, text, skip_invalid):
    args = ["score", "-", "--artifacts", str(tiny_artifacts), "--backend", "cpu"]
    result = CliRunner().invoke(app, args + (["--skip-invalid"] if skip_invalid else []), input=text)
    assert result.exit_code in (0, 2), result.output
    if result.exit_code == 2:
        assert result.stderr.startswith("error: ") and result.stdout == ""
    else:
        assert isinstance(json.loads(result.stdout), list)


# -- the command, as a process ---------------------------------------------------------------

def test_sample_file_scores_every_history_in_order(tiny_artifacts):
    done = run_score(str(SAMPLE), "--artifacts", str(tiny_artifacts), "-k", "3")
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    sample = json.loads(SAMPLE.read_text())
    assert [r["user"] for r in results] == [h.get("user") if isinstance(h, dict) else None for h in sample]
    for r in results:
        assert set(r) == {"user", "items", "scores", "unknown_items", "fallback"}
        assert len(r["items"]) == len(r["scores"]) == 3
    assert results[2] == {**results[2], "unknown_items": ["item-not-in-the-catalogue"], "fallback": "popular"}


def test_json_lines_from_stdin_with_include_seen(tiny_artifacts, item_ids):
    lines = "\n".join(json.dumps({"user": u, "history": [item_ids[u]]}) for u in range(3))
    done = run_score("-", "--artifacts", str(tiny_artifacts), "--include-seen", "-k", "60", stdin=lines)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    assert [r["user"] for r in results] == [0, 1, 2]
    assert all(item_ids[u] in r["items"] for u, r in enumerate(results))


def test_malformed_json_exits_2_naming_the_position(tiny_artifacts, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[\n  ["item00001"],\n  ["item00002" "item00003"]\n]\n')
    done = run_score(str(bad), "--artifacts", str(tiny_artifacts))
    assert done.returncode == 2 and done.stdout == ""
    assert "not valid JSON" in done.stderr and "line 3 column" in done.stderr


def test_wrong_types_exit_2_unless_skipped(tiny_artifacts, tmp_path, item_ids):
    histories = tmp_path / "histories.json"
    histories.write_text(json.dumps([[item_ids[0]], {"user": "u", "history": [1.5]}, [item_ids[1]]]))
    done = run_score(str(histories), "--artifacts", str(tiny_artifacts))
    assert done.returncode == 2 and done.stdout == ""
    assert "[1]: history[0]: expected a string or integer item id, got number 1.5" in done.stderr

    done = run_score(str(histories), "--artifacts", str(tiny_artifacts), "--skip-invalid")
    assert done.returncode == 0, done.stderr
    first, skipped, third = json.loads(done.stdout)
    assert skipped == {"user": "u", "error": "[1]: history[0]: expected a string or integer item id, "
                                              "got number 1.5"}
    assert first["items"] and third["items"]
    assert "warning: skipped [1]" in done.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["missing.json"], "cannot read history file missing.json"),
    ([str(SAMPLE), "--artifacts", "no/such/dir"], "run `mp4sr-rt export` first"),
    ([str(SAMPLE), "--backend", "tpu"], "unknown backend 'tpu'"),
    ([], "Missing argument 'HISTORY_FILE'"),
])
def test_bad_invocations_exit_2_with_one_clear_message(args, message, tiny_artifacts):
    extra = [] if "--artifacts" in args or not args else ["--artifacts", str(tiny_artifacts)]
    done = run_score(*args, *extra)
    assert done.returncode == 2 and done.stdout == ""
    assert message in done.stderr and "Traceback" not in done.stderr


def test_lone_surrogate_id_is_reported_as_valid_json(tiny_artifacts, tmp_path, item_ids):
    history = tmp_path / "surrogate.json"
    history.write_text('["\\ud800", ' + json.dumps(item_ids[0]) + ']')  # valid JSON: a lone surrogate escape
    done = subprocess.run([sys.executable, "-m", "mp4sr_cli", "score", str(history), "--artifacts",
                           str(tiny_artifacts), "-k", "3"], capture_output=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr.decode()
    (result,) = json.loads(done.stdout.decode("utf-8"))
    assert result["unknown_items"] == ["\ud800"] and len(result["items"]) == 3


def test_duplicate_keys_are_refused_and_huge_files_not_read_to_the_end(tiny_artifacts, monkeypatch, tmp_path):
    (entry,) = parse_histories('{"user": "a", "history": ["x"], "history": ["y"]}')
    assert isinstance(entry, InvalidEntry) and entry.error == "duplicate key 'history'"
    (entry,) = parse_histories('[{"history": [], "user": 1, "user": 2}]')
    assert isinstance(entry, InvalidEntry) and entry.error == "duplicate key 'user'"
    from mp4sr_rt.commands import score as score_command

    monkeypatch.setattr(score_command, "MAX_HISTORY_BYTES", 1000)
    big = tmp_path / "big.json"
    big.write_text(json.dumps([["item00001"]] * 200))
    result = CliRunner().invoke(app, ["score", str(big), "--artifacts", str(tiny_artifacts)])
    assert result.exit_code == 2 and "larger than the limit of 1,000 bytes" in result.stderr
    done = subprocess.run(f"{sys.executable} -m mp4sr_cli score /dev/zero --artifacts {tiny_artifacts}", shell=True,
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 2 and "larger than the limit of 268,435,456 bytes" in done.stderr


def test_closed_stdin_and_stdout_are_one_clear_error(tiny_artifacts):
    command = [sys.executable, "-m", "mp4sr_cli", "score", "-", "--artifacts", str(tiny_artifacts)]
    done = subprocess.run(" ".join(command) + " <&-", shell=True, capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    assert done.returncode == 2 and "standard input is closed" in done.stderr and "Traceback" not in done.stderr
    done = subprocess.run(" ".join([*command[:4], str(SAMPLE), *command[5:]]) + " >&-", shell=True,
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 2 and "standard output" in done.stderr and "Traceback" not in done.stderr


def test_k_above_the_catalogue_returns_the_whole_catalogue(tiny_artifacts, item_ids):
    done = run_score("-", "--artifacts", str(tiny_artifacts), "--include-seen", "-k", "9" * 23,
                     stdin=json.dumps([item_ids[0]]))
    assert done.returncode == 0, done.stderr
    (result,) = json.loads(done.stdout)
    assert sorted(result["items"]) == sorted(item_ids)
    from mp4sr_rt.scorer import Scorer

    scorer = Scorer(tiny_artifacts, backend="cpu")
    assert len(scorer.score([[item_ids[0]]], k=10**30, exclude_seen=False)[0].items) == len(item_ids)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(UserError, match="k must be an integer >= 1"):
            scorer.score([[item_ids[0]]], k=bad)


# -- the runtime alone -----------------------------------------------------------------------

@pytest.mark.skipif(os.environ.get("MP4SR_OFFLINE") == "1",
                    reason="installs from the package index; MP4SR_OFFLINE=1 skips it")
def test_runtime_installs_alone_and_scores_without_torch(tiny_artifacts, extractor_artifacts, tiny_data_dir,
                                                         tmp_path, item_ids):
    """`pip install .[cpu]` in a fresh virtual environment (numpy, typer, tokenizers, Pillow and
    onnxruntime; no torch) scores histories, and adds new items from raw text and images."""
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(ROOT / "pyproject.toml", src)
    for package in ("mp4sr_rt", "train", "export", "mp4sr_cli"):
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    # Copied, not built in place: an in-tree build would write build/ into the working tree.
    readme = ROOT / "README.md"
    (src / "README.md").write_text(readme.read_text() if readme.is_file() else "mp4sr-rt\n")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    install = subprocess.run([python, "-m", "pip", "install", "-q", f"{src}[cpu]"],
                             capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]

    no_torch = subprocess.run([python, "-c", "import torch"], capture_output=True, text=True)
    assert "No module named 'torch'" in no_torch.stderr
    history = json.dumps([{"user": "alone", "history": item_ids[:3]}])
    done = subprocess.run([str(venv / "bin" / "mp4sr-rt"), "score", "-", "--artifacts", str(tiny_artifacts)],
                          input=history, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    [result] = json.loads(done.stdout)
    assert result["user"] == "alone" and len(result["items"]) == 10

    image = next((tiny_data_dir / "images").glob("*.png"))
    (tmp_path / "new.jsonl").write_text(json.dumps({"item_id": "fresh", "title": "A red tent.",
                                                    "images": [str(image)]}) + "\n")
    done = subprocess.run([str(venv / "bin" / "mp4sr-rt"), "score", "-", "--artifacts", str(extractor_artifacts),
                           "--new-items", "new.jsonl", "-k", "100"], input='["fresh"]', capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    [result] = json.loads(done.stdout)
    assert result["unknown_items"] == [] and result["fallback"] is None and "fresh" not in result["items"]
    assert "added 1 new items" in done.stderr


def test_fuzz_sample_gives_results_or_one_clear_error(tiny_artifacts):
    """A sample of benchmarks/fuzz_score.py (the full run: 10,000 inputs, 200 processes and every
    manifest case): valid inputs score, the rest exit 2 with one line; no traceback, no hang;
    every damaged manifest or file is refused unless the runtime never reads what changed."""
    done = subprocess.run([sys.executable, ROOT / "benchmarks" / "fuzz_score.py", "--artifacts", tiny_artifacts,
                           "--inputs", "400", "--processes", "18", "--manifest-cases", "120", "--timeout", "60"],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "\n0 failures" in done.stdout
    assert "400 cases, 0 failures (0 tracebacks, 0 hangs)" in done.stdout
