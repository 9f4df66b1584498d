"""Fuzz `mp4sr-rt score` and the artifact directory: every input gets its results or one clear error.

    python benchmarks/fuzz_score.py                      # 10,000 inputs in process, 200 processes, the manifest fuzz
    python benchmarks/fuzz_score.py --inputs 300 --processes 12 --manifest-cases 120 --artifacts DIR

1. Inputs, through the command's entry point in this process: valid histories (catalogue ids,
   unknown ids with surrogates, NUL, emoji and long strings, huge integers; JSON, JSON Lines, user
   objects) must score, one result per history in order; NaN, infinities, fractional ids, deep
   nesting, random JSON, random text and random bytes must score or exit 2 with a one-line
   message. A traceback, a hang (over --timeout seconds) or a wrong outcome is a failure.
2. Processes (`python -m mp4sr_cli score`): closed stdin, closed stdout, binary files, files over
   the size limit, /dev/zero, directories, missing files, and valid files.
3. The manifest: every field removed, every field given a value of another type, every listed
   file's bytes altered without updating its hash and replaced by garbage with an updated hash.
   Each case must be refused (exit 2, one line) or, where the field is one the runtime does not
   read (a parity figure, a tool version), score exactly as before.

Without --artifacts a tiny model is trained and exported first (about 30 s). Prints the counts of
each category and outcome; exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from typer.testing import CliRunner  # noqa: E402

from mp4sr_cli import app  # noqa: E402
from mp4sr_rt.manifest import MANIFEST, hash_files  # noqa: E402

AWKWARD = ["\ud800", "\udfff", "a\ud83d", "\x00", "\u202e", "😀", "ﬀ", "", " ", "\n", "\\", '"', "item", "٣",
           "x" * 5000, "\ufeff", "\u0301"]


class Hang(Exception):
    pass


@dataclasses.dataclass
class Case:
    category: str
    data: bytes
    expect: str  # "ok": exit 0 with `histories` results; "ok-or-error": exit 0 or a clean exit 2; "error"
    histories: int | None = None
    args: tuple[str, ...] = ()


class Tally:
    def __init__(self) -> None:
        self.counts: Counter[tuple[str, str]] = Counter()
        self.failures: list[str] = []
        self.harmless: list[str] = []  # manifest cases accepted with unchanged results

    def add(self, category: str, outcome: str, failure: str | None = None) -> None:
        self.counts[(category, outcome)] += 1
        if failure:
            self.failures.append(f"{category}: {failure}")

    def report(self, title: str) -> None:
        print(f"\n== {title} ==")
        for category in sorted({c for c, _ in self.counts}):
            row = {o: n for (c, o), n in self.counts.items() if c == category}
            print(f"{category:28s} " + ", ".join(f"{o} {n}" for o, n in sorted(row.items())))
        total = sum(self.counts.values())
        print(f"{'total':28s} {total} cases, {len(self.failures)} failures "
              f"({sum(n for (_, o), n in self.counts.items() if o == 'traceback')} tracebacks, "
              f"{sum(n for (_, o), n in self.counts.items() if o == 'hang')} hangs)")
        for failure in self.failures[:20]:
            print("  FAIL", failure[:300])
        if self.harmless:
            fields = sorted({".".join(n.split(":", 1)[1].split(".")[:2]) for n in self.harmless})
            print(f"  accepted unchanged (fields the runtime does not read): {', '.join(fields)}")


# -- 1. inputs in process --------------------------------------------------------------------

def random_id(rng: random.Random, known: list[str]) -> str | int:
    roll = rng.random()
    if roll < 0.55:
        return rng.choice(known)
    if roll < 0.8:
        return "".join(rng.choice(AWKWARD) for _ in range(rng.randint(1, 3)))[:6000]
    if roll < 0.9:
        return rng.choice([0, -1, 2**63, -(2**70), 10**30, rng.randint(-10**6, 10**6)])
    return "".join(chr(rng.randint(1, 0x10FFFF)) for _ in range(rng.randint(1, 8)))


def random_json(rng: random.Random, depth: int = 0):
    roll = rng.random()
    if depth > 4 or roll < 0.35:
        return rng.choice([None, True, False, 0, -7, 2**80, 1.5, -0.0, 1e308, "", "a", "\ud800", "item00001"])
    if roll < 0.7:
        return [random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    keys = ["user", "history", "items", "x", ""]
    return {rng.choice(keys): random_json(rng, depth + 1) for _ in range(rng.randint(0, 3))}


def input_cases(rng: random.Random, known: list[str], n: int) -> Iterator[Case]:
    kinds = ["valid-json", "valid-jsonl", "valid-users", "numbers", "deep", "random-json", "random-text",
             "random-bytes"]
    for i in range(n):
        kind = kinds[i % len(kinds)]
        if kind.startswith("valid"):
            histories = [[random_id(rng, known) for _ in range(rng.randint(0, 12))] for _ in range(rng.randint(1, 6))]
            if kind == "valid-json":
                text = json.dumps(histories, ensure_ascii=rng.random() < 0.5)
            elif kind == "valid-jsonl":
                text = "\n".join(json.dumps(h) for h in histories) + rng.choice(["", "\n", "\n\n"])
            else:
                text = json.dumps([{"user": f"u{j}\ud800" if j % 2 else j, "history": h}
                                   for j, h in enumerate(histories)])
            # backslashreplace: a lone surrogate becomes its JSON escape, valid UTF-8 as JSON allows
            yield Case(kind, text.encode("utf-8", "backslashreplace"), "ok", len(histories))
        elif kind == "numbers":
            bad = rng.choice(["NaN", "Infinity", "-Infinity", "1e400", "1.5", "2.0000001", "-1e-300"])
            yield Case(kind, f'[["{known[0]}", {bad}]]'.encode(), "error")
        elif kind == "deep":
            depth = rng.choice([100, 1000, 100_000])
            yield Case(kind, ("[" * depth + "]" * depth).encode(), "ok-or-error")
        elif kind == "random-json":
            yield Case(kind, json.dumps(random_json(rng)).encode(), "ok-or-error",
                       args=("--skip-invalid",) if rng.random() < 0.3 else ())
        elif kind == "random-text":
            text = "".join(rng.choice('[]{}",:\n 0123456789abcnulltruefalse\\u') for _ in range(rng.randint(0, 40)))
            yield Case(kind, text.encode(), "ok-or-error")
        else:
            yield Case(kind, rng.randbytes(rng.randint(0, 200)), "ok-or-error")


def invoke(args: list[str], data: bytes | None, timeout: float):
    """The command in process, under an alarm: (result, None) or (None, "hang")."""
    def alarm(*_):
        raise Hang()

    signal.signal(signal.SIGALRM, alarm)
    signal.alarm(int(timeout))
    try:
        return CliRunner().invoke(app, args, input=data), None
    except Hang:
        return None, "hang"
    finally:
        signal.alarm(0)


def judge(result, expect: str, histories: int | None) -> tuple[str, str | None]:
    """(outcome, failure or None) of one in-process run."""
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        return "traceback", f"{type(result.exception).__name__}: {result.exception}"
    if "Traceback" in result.stderr:
        return "traceback", result.stderr[-300:]
    if result.exit_code == 0:
        try:
            out = json.loads(result.stdout)
        except ValueError:
            return "bad-output", "exit 0 without JSON on stdout"
        if expect == "error":
            return "accepted", "exit 0 where an error was expected"
        if histories is not None and len(out) != histories:
            return "wrong", f"{len(out)} results for {histories} histories"
        return "ok", None
    lines = result.stderr.strip().splitlines()
    if result.exit_code != 2 or len(lines) != 1 or not lines[0].startswith("error: ") or result.stdout:
        return "unclear-error", f"exit {result.exit_code}, stderr {result.stderr[:200]!r}"
    if expect == "ok":
        return "refused", f"valid input refused: {lines[0][:200]}"
    return "error", None


def fuzz_inputs(artifacts: Path, n: int, seed: int, timeout: float) -> Tally:
    known = json.loads((artifacts / "items.json").read_text())["items"]
    tally = Tally()
    base = ["score", "-", "--artifacts", str(artifacts), "--backend", "cpu"]
    for case in input_cases(random.Random(seed), known, n):
        result, hang = invoke(base + list(case.args), case.data, timeout)
        if hang:
            tally.add(case.category, "hang", f"no answer in {timeout} s")
            continue
        outcome, failure = judge(result, case.expect, case.histories)
        tally.add(case.category, outcome, failure)
    return tally


# -- 2. processes ----------------------------------------------------------------------------

def process_cases(artifacts: Path, work: Path, n: int, rng: random.Random) -> Iterator[tuple[str, str, str]]:
    """(category, shell command, expected: ok | error)."""
    known = json.loads((artifacts / "items.json").read_text())["items"]
    cmd = f"{sys.executable} -m mp4sr_cli score"
    art = f"--artifacts {artifacts} --backend cpu"
    huge = work / "huge.json"
    with open(huge, "wb") as f:  # sparse: over the 256 MiB limit without using the disk
        f.truncate((1 << 28) + 1)
    valid = work / "valid.json"
    valid.write_text(json.dumps([[known[0], known[1]], [known[2]]]))
    kinds = ["closed-stdin", "closed-stdout", "binary-file", "huge-file", "dev-zero", "directory", "missing-file",
             "valid-file", "valid-stdin"]
    for i in range(n):
        kind = kinds[i % len(kinds)]
        if kind == "closed-stdin":
            yield kind, f"{cmd} - {art} <&-", "error"
        elif kind == "closed-stdout":
            yield kind, f"{cmd} {valid} {art} >&-", "error"
        elif kind == "binary-file":
            path = work / f"binary-{i}.bin"
            path.write_bytes(rng.randbytes(rng.randint(1, 4096)))
            yield kind, f"{cmd} {path} {art}", "ok-or-error"
        elif kind == "huge-file":
            yield kind, f"{cmd} {huge} {art}", "error"
        elif kind == "dev-zero":
            yield kind, f"{cmd} /dev/zero {art}", "error"
        elif kind == "directory":
            yield kind, f"{cmd} {work} {art}", "error"
        elif kind == "missing-file":
            yield kind, f"{cmd} {work / 'missing.json'} {art}", "error"
        elif kind == "valid-file":
            yield kind, f"{cmd} {valid} {art}", "ok"
        else:
            yield kind, f"echo '{json.dumps([known[3]])}' | {cmd} - {art}", "ok"


def fuzz_processes(artifacts: Path, n: int, seed: int, timeout: float) -> Tally:
    tally = Tally()
    with tempfile.TemporaryDirectory() as tmp:
        for category, command, expect in process_cases(artifacts, Path(tmp), n, random.Random(seed)):
            try:
                done = subprocess.run(command, shell=True, capture_output=True, text=True, cwd=ROOT,
                                      timeout=timeout, errors="replace")
            except subprocess.TimeoutExpired:
                tally.add(category, "hang", f"no answer in {timeout} s: {command}")
                continue
            lines = done.stderr.strip().splitlines()
            if "Traceback" in done.stderr:
                tally.add(category, "traceback", done.stderr[-300:])
            elif done.returncode == 0:
                tally.add(category, "ok", "exit 0 where an error was expected" if expect == "error" else None)
            elif done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "):
                tally.add(category, "error", f"valid input refused: {lines[0]}" if expect == "ok" else None)
            else:
                tally.add(category, "unclear-error", f"exit {done.returncode}: {done.stderr[:200]!r}")
    return tally


# -- 3. the manifest -------------------------------------------------------------------------

def paths(value, prefix: tuple = ()) -> Iterator[tuple]:
    """Every key path of a JSON value, parents before children."""
    if isinstance(value, dict):
        for key, child in value.items():
            yield (*prefix, key)
            yield from paths(child, (*prefix, key))
    elif isinstance(value, list):
        for i, child in enumerate(value):
            yield (*prefix, i)
            yield from paths(child, (*prefix, i))


def retyped(value):
    if isinstance(value, bool):
        return "yes"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str):
        return 12345
    if value is None:
        return 7
    if isinstance(value, list):
        return {"x": 1}
    return [1]


def mutate(manifest: dict, path: tuple, change: Callable) -> dict:
    out = copy.deepcopy(manifest)
    node = out
    for key in path[:-1]:
        node = node[key]
    change(node, path[-1])
    return out


Damage = Callable[[Path], None]


def manifest_cases(artifacts: Path, limit: int | None, rng: random.Random) -> Iterator[tuple[str, Damage]]:
    """(category, function that damages a copy of the artifact directory)."""
    manifest = json.loads((artifacts / MANIFEST).read_text())
    cases: list[tuple[str, Damage]] = []

    def write(m: dict) -> Damage:
        return lambda d: (d / MANIFEST).write_text(json.dumps(m))

    for path in paths(manifest):
        name = ".".join(map(str, path))
        cases.append((f"removed:{name}", write(mutate(manifest, path, lambda node, key: node.pop(key)))))
        cases.append((f"retyped:{name}", write(mutate(manifest, path, lambda node, key: node.__setitem__(
            key, retyped(node[key]))))))
    for name in manifest["files"]:
        def altered(d: Path, name=name) -> None:
            data = bytearray((d / name).read_bytes() or b"\0")
            data[len(data) // 2] ^= 0xFF
            (d / name).write_bytes(bytes(data))

        def garbage(d: Path, name=name) -> None:
            (d / name).write_bytes(random.Random(name).randbytes(max(16, (d / name).stat().st_size // 3)))
            m = json.loads((d / MANIFEST).read_text())
            m["files"] = {k: dataclasses.asdict(v) for k, v in hash_files(d).items()}
            (d / MANIFEST).write_text(json.dumps(m))

        cases.append((f"altered, hash kept:{name}", altered))
        cases.append((f"garbage, hash updated:{name}", garbage))
    if limit is not None and limit < len(cases):
        cases = rng.sample(cases, limit)
    yield from cases


def fuzz_manifest(artifacts: Path, limit: int | None, seed: int, timeout: float) -> Tally:
    known = json.loads((artifacts / "items.json").read_text())["items"]
    history = json.dumps([[known[0], known[1]], [known[2]]]).encode()
    args = ["score", "-", "--backend", "cpu", "--artifacts"]
    baseline, _ = invoke([*args, str(artifacts)], history, timeout)
    assert baseline.exit_code == 0, baseline.stderr
    expected_api = api_probe(artifacts, known, None)[1]
    tally = Tally()
    with tempfile.TemporaryDirectory() as tmp:
        for name, damage in manifest_cases(artifacts, limit, random.Random(seed)):
            category = name.split(":")[0]
            copy_dir = Path(tmp) / "artifacts"
            shutil.rmtree(copy_dir, ignore_errors=True)
            shutil.copytree(artifacts, copy_dir)
            damage(copy_dir)
            result, hang = invoke([*args, str(copy_dir)], history, timeout)
            if hang:
                tally.add(category, "hang", name)
                continue
            outcome, failure = judge(result, "ok-or-error", None)
            if outcome == "ok":
                # Accepted: only where nothing the runtime reads changed, so the results are the same;
                # then the paths the command did not take (a new item through the item tower and
                # the history encoder) must refuse the damage when they meet it, or be unchanged.
                if result.stdout != baseline.stdout:
                    outcome, failure = "served-changed", name
                else:
                    outcome, failure = api_probe(copy_dir, known, expected_api)
            tally.add(category, "refused" if outcome == "error" else outcome,
                      f"{name}: {failure}" if failure else None)
            if outcome == "harmless":
                tally.harmless.append(name)
    return tally


def api_probe(artifacts: Path, known: list[str], expected: str | None) -> tuple[str, str | None]:
    """Add an item from precomputed features and score a history holding it, through the Python
    API. With `expected` None returns ("ok", the result as text); else (outcome, failure)."""
    import numpy as np

    from mp4sr_rt import Scorer
    from mp4sr_rt.errors import ArtifactError, UserError

    try:
        scorer = Scorer(artifacts, backend="cpu")
        dim = scorer._feature_dim()
        feats = {f"{m}_feats": np.full((1, 2, dim), 0.5, np.float32) for m in scorer.modalities}
        scorer.add_items(["fuzz-new"], **feats)
        [rec] = scorer.score([["fuzz-new", known[0]]], k=5)
        text = json.dumps([rec.items, [round(x, 5) for x in rec.scores]])
    except (ArtifactError, UserError) as e:
        lines = str(e).strip().splitlines()
        return ("refused", None) if len(lines) == 1 else ("unclear-error", str(e)[:200])
    except Exception as e:  # noqa: BLE001 - what the fuzz looks for
        return "traceback", f"{type(e).__name__}: {e}"
    if expected is None:
        return "ok", text
    return ("harmless", None) if text == expected else ("served-changed", "add_items path")


# -- main ------------------------------------------------------------------------------------

def tiny_artifacts(work: Path) -> Path:
    from mp4sr_export.run import export
    from mp4sr_train.config import preset
    from mp4sr_train.data import demo_features, generate_demo
    from mp4sr_train.run import train

    data = generate_demo(work / "data", n_items=60, n_users=120, seed=0)
    demo_features(data, data / "features.safetensors", dim=12)
    train(preset("tiny"), data, data / "features.safetensors", work / "run", progress=False)
    export(work / "run", work / "artifacts", top_k=20)
    return work / "artifacts"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, help="artifact directory (default: train and export a tiny model)")
    parser.add_argument("--inputs", type=int, default=10_000)
    parser.add_argument("--processes", type=int, default=200)
    parser.add_argument("--manifest-cases", type=int, default=None, help="a seeded sample (default: every case)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds after which one case counts as a hang")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        artifacts = args.artifacts or tiny_artifacts(Path(tmp))
        failures = 0
        common = (args.seed, args.timeout)
        steps = (
            (f"inputs in process ({args.inputs})", lambda: fuzz_inputs(artifacts, args.inputs, *common)),
            (f"processes ({args.processes})", lambda: fuzz_processes(artifacts, args.processes, *common)),
            ("manifest and files", lambda: fuzz_manifest(artifacts, args.manifest_cases, *common)),
        )
        for title, run in steps:
            start = time.perf_counter()
            tally = run()
            tally.report(f"{title}, {time.perf_counter() - start:.0f} s")
            failures += len(tally.failures)
    print(f"\n{failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
