"""`mp4sr-rt serve` on a real Triton Inference Server (the nvidia-pytriton wheel's tritonserver),
started and stopped by the tests, on localhost: answers against the in-process Scorer over HTTP
and gRPC, filters, catalogue changes through the server and the command line (persisted across a
restart), bad requests, overload, SIGTERM with requests in flight, and kills during catalogue
updates. The server runs in the serving environment (.venv-serve, `make serve-env`: nvidia-pytriton
pins numpy<2); the expected answers are computed by the same environment's Scorer, in-process.
Without that environment these tests skip, unless MP4SR_REQUIRE_SERVE=1 (CI), where they fail.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mp4sr_rt.manifest import verify_artifacts
from mp4sr_rt.serving.server import free_ports

ROOT = Path(__file__).resolve().parents[1]
SERVE_PYTHON = Path(os.environ.get("MP4SR_SERVE_PYTHON", ROOT / ".venv-serve" / "bin" / "python"))
MODEL = "mp4sr"


def serve_python() -> Path:
    if not SERVE_PYTHON.is_file():
        message = f"no serving environment at {SERVE_PYTHON.parent.parent}: `make serve-env` builds it"
        if os.environ.get("MP4SR_REQUIRE_SERVE") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return SERVE_PYTHON


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc), deepest last."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


class Served:
    """`mp4sr-rt serve ARGS` in the serving environment, on free ports."""

    def __init__(self, *args: object, log: Path):
        self.http, self.grpc, self.metrics = free_ports()
        self.log = log
        cmd = [str(serve_python()), "-m", "mp4sr_cli", "serve", *map(str, args), "--http-port", str(self.http),
               "--grpc-port", str(self.grpc), "--metrics-port", str(self.metrics)]
        # Its temporary files (the model repository, Triton's work directory) go beside the log:
        # a server the tests SIGKILL cannot remove them, pytest's tmp_path cleaning then does.
        scratch = log.parent / f"{log.stem}-tmp"
        scratch.mkdir(exist_ok=True)
        self.process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(log, "wb"), cwd=ROOT,
                                        env={**os.environ, "TMPDIR": str(scratch)})
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"serve exited {self.process.returncode}: {log.read_text()[-3000:]}")
            if b"serving " in log.read_bytes():
                return
            time.sleep(0.2)
        self.kill()
        raise AssertionError(f"serve not ready: {log.read_text()[-3000:]}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http}"

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(60)

    def kill(self) -> None:
        """SIGKILL the whole tree at once: serve, tritonserver and its Python backend stubs."""
        pids = [self.process.pid, *descendants(self.process.pid)]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait(30)
        deadline = time.monotonic() + 30
        while any(Path(f"/proc/{p}").exists() and "zombie" not in _state(p) for p in pids[1:]):
            assert time.monotonic() < deadline, "processes survived SIGKILL"
            time.sleep(0.1)


def _state(pid: int) -> str:
    try:
        return (Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0]).lower()
    except (OSError, IndexError):
        return "zombie"


def post(url: str, body: bytes | dict, timeout: float = 30) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        text = e.read()
        try:
            return e.code, json.loads(text)
        except ValueError:
            return e.code, {"error": text.decode(errors="replace")}


def infer_body(history: list[str], k: int | None = None, exclude_seen: bool | None = None,
               exclude: list[str] | None = None, allow: list[str] | None = None) -> dict:
    inputs = [{"name": "history", "datatype": "BYTES", "shape": [1, len(history)], "data": history}]
    if k is not None:
        inputs.append({"name": "k", "datatype": "INT32", "shape": [1, 1], "data": [k]})
    if exclude_seen is not None:
        inputs.append({"name": "exclude_seen", "datatype": "BOOL", "shape": [1, 1], "data": [exclude_seen]})
    for name, ids in (("exclude", exclude), ("allow", allow)):
        if ids is not None:
            inputs.append({"name": name, "datatype": "BYTES", "shape": [1, len(ids)], "data": ids})
    return {"inputs": inputs}


def recommend(server: Served, query: dict) -> dict:
    status, body = post(f"{server.url}/v2/models/{MODEL}/infer", infer_body(**query))
    assert status == 200, body
    out = {o["name"]: o["data"] for o in body["outputs"]}
    return {"items": out["items"], "scores": out["scores"], "unknown_items": out["unknown_items"],
            "fallback": out["fallback"][0] or None}


EXPECT = """
import json, sys
from mp4sr_rt.scorer import Scorer
args = json.load(sys.stdin)
scorer = Scorer(args["artifacts"])
out = []
for q in args["queries"]:
    [r] = scorer.score([q["history"]], k=q.get("k", 10), exclude_seen=q.get("exclude_seen", True),
                       exclude=q.get("exclude") or (), allow=q.get("allow"))
    out.append({"items": [str(i) for i in r.items], "scores": r.scores,
                "unknown_items": [str(i) for i in r.unknown_items], "fallback": r.fallback})
json.dump(out, sys.stdout)
"""


def expected(artifacts: Path, queries: list[dict]) -> list[dict]:
    """What the serving environment's Scorer answers in-process for each query."""
    r = subprocess.run([str(serve_python()), "-c", EXPECT], input=json.dumps(
        {"artifacts": str(artifacts), "queries": queries}), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def same(got: dict, want: dict) -> bool:
    """Equal answers: the same items, and scores equal as float32 (the wire's type)."""
    return (got["items"] == want["items"] and got["unknown_items"] == want["unknown_items"]
            and got["fallback"] == want["fallback"]
            and np.array_equal(np.float32(got["scores"]), np.float32(want["scores"])))


def item_ids(artifacts: Path) -> list[str]:
    return [str(i) for i in json.loads((artifacts / "items.json").read_text())["items"]]


def random_queries(ids: list[str], n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        q = {"history": rng.sample(ids, rng.randint(1, 12)), "k": rng.choice([1, 5, 10, 20, 40])}
        roll = rng.random()
        if roll < 0.15:
            q["exclude"] = rng.sample(ids, 5)
        elif roll < 0.3:
            q["allow"] = rng.sample(ids, rng.randint(1, 30))
        elif roll < 0.35:
            q["history"] = q["history"] + ["not-an-item"]
        elif roll < 0.4:
            q["exclude_seen"] = False
        out.append(q)
    return out


@pytest.fixture(scope="module")
def artifacts(extractor_artifacts, tmp_path_factory) -> Path:
    """A copy the catalogue tests may change (text and image encoders included)."""
    out = tmp_path_factory.mktemp("served") / "artifacts"
    shutil.copytree(extractor_artifacts, out)
    return out


@pytest.fixture(scope="module")
def server(artifacts, tmp_path_factory):
    served = Served(artifacts, log=tmp_path_factory.mktemp("log") / "serve.log")
    yield served
    assert served.stop() == 0, served.log.read_text()[-3000:]
    assert "stopped" in served.log.read_text()


def test_http_and_grpc_answers_equal_the_in_process_scorer_and_the_server_reports_health(server, artifacts):
    import tritonclient.grpc as grpcclient

    ids = item_ids(artifacts)
    queries = random_queries(ids, 150, seed=0) + [
        {"history": []}, {"history": ["unknown-1", "unknown-2"], "k": 3}, {"history": ids * 3, "k": 60},
        {"history": ids[:3], "allow": []}, {"history": ids[:3], "allow": ["unknown"], "k": 5},
    ]
    want = expected(artifacts, queries)
    for q, w in zip(queries, want, strict=True):
        got = recommend(server, q)
        assert same(got, w), (q, got, w)
    assert want[-5]["fallback"] == want[-4]["fallback"] == "popular" and want[-1]["items"] == []
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc}")
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)
    for q, w in zip(queries[:40], want[:40], strict=True):
        got = grpc_recommend(client, q)
        assert same(got, w), (q, got, w)
    for path in ("/v2/health/live", "/v2/health/ready", f"/v2/models/{MODEL}/ready"):
        with urllib.request.urlopen(server.url + path) as r:
            assert r.status == 200
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics}/metrics") as r:
        metrics = r.read().decode()
    assert f'nv_inference_request_success{{model="{MODEL}",version="1"}}' in metrics


def grpc_recommend(client, query: dict) -> dict:
    import tritonclient.grpc as grpcclient

    inputs = []
    history = query["history"]
    for name, value, dtype in (("history", history, "BYTES"), ("k", query.get("k"), "INT32"),
                               ("exclude", query.get("exclude"), "BYTES"), ("allow", query.get("allow"), "BYTES"),
                               ("exclude_seen", query.get("exclude_seen"), "BOOL")):
        if value is None:
            continue
        array = (np.array([value], dtype=object) if dtype == "BYTES" else
                 np.array([[value]], dtype=np.int32 if dtype == "INT32" else bool))
        if dtype == "BYTES" and array.size == 0:
            array = np.zeros((1, 0), dtype=object)
        tensor = grpcclient.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    result = client.infer(MODEL, inputs)
    return {"items": [b.decode() for b in result.as_numpy("items")[0]],
            "scores": result.as_numpy("scores")[0].tolist(),
            "unknown_items": [b.decode() for b in result.as_numpy("unknown_items")[0]],
            "fallback": result.as_numpy("fallback")[0][0].decode() or None}


def test_32_clients_x_500_requests_over_http_and_grpc_each_get_their_own_answer(server, artifacts):

    ids = item_ids(artifacts)
    threads, per_thread = 32, 500
    queries = [{"history": random.Random(i).sample(ids, 1 + i % 11), "k": 1 + i % 20}
               for i in range(threads * per_thread)]
    want = expected(artifacts, queries)
    for protocol in ("http", "grpc"):
        results: dict[int, dict] = {}
        errors: list[str] = []
        port = server.http if protocol == "http" else server.grpc
        start = time.perf_counter()
        pool = [threading.Thread(target=client_thread, args=(protocol, port, queries, threads, t, results, errors))
                for t in range(threads)]
        for p in pool:
            p.start()
        for p in pool:
            p.join()
        seconds = time.perf_counter() - start
        mismatched = [i for i, r in results.items() if not same(r, want[i])]
        print(f"{protocol}: {len(queries)} requests, {len(results)} answered, {len(errors)} errors, "
              f"{len(mismatched)} mismatched, {len(queries) / seconds:.0f} requests/s")
        assert not errors, errors[:5]
        assert len(results) == len(queries) and not mismatched, mismatched[:5]


def client_thread(protocol: str, port: int, queries: list[dict], threads: int, t: int,
                  results: dict[int, dict], errors: list[str]) -> None:
    """Client `t` of `threads`: its share of the queries, each answer kept by its request's index."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    mod = httpclient if protocol == "http" else grpcclient
    client = mod.InferenceServerClient(f"127.0.0.1:{port}")
    for i in range(t, len(queries), threads):
        q = queries[i]
        try:
            h = mod.InferInput("history", [1, len(q["history"])], "BYTES")
            h.set_data_from_numpy(np.array([q["history"]], dtype=object))
            k = mod.InferInput("k", [1, 1], "INT32")
            k.set_data_from_numpy(np.array([[q["k"]]], np.int32))
            r = client.infer(MODEL, [h, k], request_id=str(i))
            results[i] = {"items": [b.decode() for b in r.as_numpy("items")[0]],
                          "scores": r.as_numpy("scores")[0].tolist(), "unknown_items": [],
                          "fallback": r.as_numpy("fallback")[0][0].decode() or None}
        except Exception as e:  # counted by the test, never lost
            errors.append(f"{i}: {e}")


def test_filters_return_the_exact_top_k_of_the_allowed_items(server, artifacts):
    ids = item_ids(artifacts)
    history = ids[:4]
    everything = expected(artifacts, [{"history": history, "k": len(ids)}])[0]["items"]
    allow = ids[10:40]
    exclude = everything[:3]
    got = recommend(server, {"history": history, "k": 10, "allow": allow, "exclude": exclude})
    assert got["items"] == [i for i in everything if i in allow and i not in exclude][:10]
    assert len(got["items"]) == 10
    got = recommend(server, {"history": history, "k": 5, "exclude_seen": False, "allow": history})
    assert sorted(got["items"]) == sorted(history)


def catalogue_request(server: Served, action: str, ids: list[str], **inputs) -> tuple[int, dict]:
    body = [{"name": "action", "datatype": "BYTES", "shape": [1], "data": [action]},
            {"name": "ids", "datatype": "BYTES", "shape": [len(ids)], "data": ids}]
    for name, (dtype, shape, data) in inputs.items():
        body.append({"name": name, "datatype": dtype, "shape": shape, "data": data})
    return post(f"{server.url}/v2/models/mp4sr_catalogue/infer", {"inputs": body})


def test_catalogue_changes_through_the_server_and_the_cli_are_served_at_once_and_survive_a_restart(
        server, artifacts, tiny_data_dir, tmp_path):
    ids = item_ids(artifacts)
    manifest = verify_artifacts(artifacts)
    dim = manifest.features.dim
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(2, 3, dim)).astype(np.float32)
    status, body = catalogue_request(server, "add", ["new-a", "new-b"],
                                     text_feats=("FP32", [2, 3, dim], feats.ravel().tolist()))
    assert status == 200, body
    status, body = catalogue_request(server, "add", ["new-raw"],
                                     texts=("BYTES", [1], ["A red tent that sleeps four. Waterproof."]))
    assert status == 200, body
    version = {o["name"]: o["data"] for o in body["outputs"]}["version"][0]
    # Added items: usable in histories and recommendable at once.
    got = recommend(server, {"history": ["new-a", ids[0]], "k": 3, "allow": ["new-b", "new-raw", ids[5]]})
    assert got["unknown_items"] == [] and set(got["items"]) == {"new-b", "new-raw", ids[5]}
    top = recommend(server, {"history": ids[:3], "k": 5})["items"]
    status, _ = catalogue_request(server, "remove", [top[0], "new-b"])
    assert status == 200
    cli = subprocess.run([str(serve_python()), "-m", "mp4sr_cli", "catalogue", "remove", str(artifacts), top[1]],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert cli.returncode == 0, cli.stderr
    assert f"catalogue version {version + 2}" in cli.stderr
    removed = {top[0], top[1], "new-b"}
    other = next(i for i in ids[3:] if i not in removed)
    queries = [{"history": ids[:3], "k": 5}, {"history": ["new-a"], "k": 61},
               {"history": ids[:3], "k": 5, "allow": ["new-b", top[0], top[1], other]}]
    answers = [recommend(server, q) for q in queries]
    assert not removed & {i for a in answers for i in a["items"]}
    assert answers[2]["items"] == [other]
    want = expected(artifacts, queries)  # a fresh Scorer: what is on disk
    assert all(same(a, w) for a, w in zip(answers, want, strict=True))
    restarted = Served(artifacts, "--instances", 2, log=tmp_path / "restart.log")
    try:
        assert all(same(recommend(restarted, q), w) for q, w in zip(queries, want, strict=True))
        # An image and a text through gRPC (binary BYTES), then a removal from the command line:
        # both instances serve them from the next request on.
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(f"127.0.0.1:{restarted.grpc}")
        image = next(tiny_data_dir.rglob("*.png")).read_bytes()
        tensors = []
        change = {"action": [b"add"], "ids": [b"new-img"], "texts": [b"Blue mug"], "images": [image]}
        for name, values in change.items():
            array = np.array(values, dtype=object)
            tensors.append(grpcclient.InferInput(name, list(array.shape), "BYTES"))
            tensors[-1].set_data_from_numpy(array)
        client.infer("mp4sr_catalogue", tensors)
        subprocess.run([str(serve_python()), "-m", "mp4sr_cli", "catalogue", "remove", str(artifacts), other],
                       check=True, capture_output=True, timeout=120, cwd=ROOT)
        for _ in range(8):  # requests spread over both instances
            got = recommend(restarted, {"history": ["new-img"], "k": 64, "allow": ["new-img", "new-a", other]})
            assert got["items"] == ["new-a"] and got["unknown_items"] == []
    finally:
        assert restarted.stop() == 0
    bad = catalogue_request(server, "add", ["new-a"], texts=("BYTES", [1], ["again"]))
    assert bad[0] == 400 and "already in the catalogue" in bad[1]["error"]
    assert catalogue_request(server, "remove", ["no-such-item"])[0] == 400
    assert catalogue_request(server, "drop", ["x"])[0] == 400


GOOD = {"history": ["item00001"], "k": 3}
bad_bodies = st.one_of(
    st.binary(max_size=200),  # not JSON, mostly
    st.just(b'{"inputs": [{"name": "history", "datatype": "INT64", "shape": [1, 2], "data": [1, 2]}]}'),
    st.just(b'{"inputs": [{"name": "history", "datatype": "BYTES", "shape": [2], "data": ["a", "b"]}]}'),
    st.just(b'{"inputs": [{"name": "history", "datatype": "BYTES", "shape": [1, 3], "data": ["a"]}]}'),
    st.just(b'{"inputs": [{"name": "nope", "datatype": "BYTES", "shape": [1, 1], "data": ["a"]}]}'),
    st.just(b'{"inputs": []}'),
    st.builds(lambda k: json.dumps(infer_body(["item00001"], k=k)).encode(),
              st.one_of(st.integers(-2**31, 0), st.integers(61, 2**31 - 1))),
    st.builds(lambda n: json.dumps(infer_body([f"item{i:05d}" for i in range(n)])).encode(),
              st.sampled_from([0, 10_000])),
    st.builds(lambda ids: json.dumps(infer_body(["item00001"], exclude=ids, allow=ids)).encode(),
              st.lists(st.text(max_size=8), max_size=5)),
    st.builds(lambda value: json.dumps({"inputs": [
        {"name": "history", "datatype": "BYTES", "shape": [1, 1], "data": [value]}]}).encode(),
        st.one_of(st.integers(), st.floats(allow_nan=False), st.none(), st.text(max_size=20))),
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=bad_bodies, path=st.sampled_from([f"/v2/models/{MODEL}/infer", "/v2/models/no_such_model/infer"]))
def test_bad_requests_get_a_4xx_naming_the_problem_and_the_server_keeps_serving(server, body, path):
    status, answer = post(server.url + path, body)
    # Triton's HTTP front end (2.51) answers a body it cannot parse (not JSON, or not the v2
    # request document) with 500, before any model runs, naming the parse error; everything else
    # that is wrong is a 4xx.
    error = answer.get("error", "")
    unparsable = status == 500 and error.startswith(("failed to parse the request JSON", "Unable to parse"))
    assert status == 200 or 400 <= status < 500 or unparsable, (status, answer)
    if status != 200:
        assert answer.get("error"), answer
    assert post(f"{server.url}/v2/models/{MODEL}/infer", infer_body(**GOOD))[0] == 200


def test_overload_is_refused_fast_and_the_server_serves_again(artifacts, tmp_path):
    served = Served(artifacts, "--max-batch", 1, "--max-queue", 2, "--max-delay-ms", 0, log=tmp_path / "serve.log")
    try:
        ids = item_ids(artifacts)
        outcomes: list[tuple[int, float, str]] = []

        def work(i: int) -> None:
            start = time.perf_counter()
            status, body = post(f"{served.url}/v2/models/{MODEL}/infer", infer_body(ids[i % 50:i % 50 + 30], k=60))
            outcomes.append((status, time.perf_counter() - start, body.get("error", "")))

        pool = [threading.Thread(target=work, args=(i,)) for i in range(200)]
        for p in pool:
            p.start()
        for p in pool:
            p.join(120)
        refused = [o for o in outcomes if o[0] != 200]
        assert len(outcomes) == 200 and refused, "no request was refused: the queue never filled"
        assert all(status == 503 and "queue" in error.lower() for status, _, error in refused), refused[:3]
        assert max(seconds for _, seconds, _ in refused) < 10
        assert post(f"{served.url}/v2/models/{MODEL}/infer", infer_body(**GOOD))[0] == 200
    finally:
        assert served.stop() == 0


def test_sigterm_finishes_the_requests_in_flight(artifacts, tmp_path):
    served = Served(artifacts, "--max-delay-ms", 1500, log=tmp_path / "serve.log")
    ids = item_ids(artifacts)
    outcomes = []

    def work(i: int) -> None:
        outcomes.append(post(f"{served.url}/v2/models/{MODEL}/infer", infer_body(ids[i:i + 3], k=5))[0])

    pool = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for p in pool:
        p.start()
    time.sleep(0.5)  # the requests wait in the batcher's queue (1.5 s delay)
    assert served.process.poll() is None
    served.process.send_signal(signal.SIGTERM)
    for p in pool:
        p.join(60)
    assert outcomes == [200] * 6
    assert served.process.wait(60) == 0


def test_sigterm_while_starting_stops_and_leaves_nothing(artifacts, tmp_path):
    """SIGTERM once tritonserver runs but before it serves: serve stops it, removes its model
    repository and work directory, and exits 0."""
    log, scratch = tmp_path / "serve.log", tmp_path / "tmp"
    scratch.mkdir()
    http, grpc, metrics = free_ports()
    process = subprocess.Popen([str(serve_python()), "-m", "mp4sr_cli", "serve", str(artifacts), "--http-port",
                                str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics)],
                               stdout=subprocess.DEVNULL, stderr=open(log, "wb"), cwd=ROOT,
                               env={**os.environ, "TMPDIR": str(scratch)})
    deadline = time.monotonic() + 120
    while not any("tritonserver" in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")
                  for p in descendants(process.pid) if Path(f"/proc/{p}/cmdline").exists()):
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)
    assert b"serving " not in log.read_bytes()  # still loading its models
    children = descendants(process.pid)
    process.send_signal(signal.SIGTERM)
    assert process.wait(90) == 0, log.read_text()[-3000:]
    assert "stopped before the server was ready" in log.read_text()
    assert not list(scratch.iterdir())
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{p}").exists() and "zombie" not in _state(p) for p in children):
        assert time.monotonic() < deadline, "tritonserver outlived serve"
        time.sleep(0.1)


def test_a_server_killed_during_catalogue_updates_leaves_the_old_or_the_new_version(artifacts, tmp_path):
    from mp4sr_rt.scorer import Scorer

    directory = tmp_path / "artifacts"
    shutil.copytree(artifacts, directory)
    dim = verify_artifacts(directory).features.dim
    rng = np.random.default_rng(1)
    seen_versions = []
    for round_ in range(3):
        served = Served(directory, log=tmp_path / f"serve-{round_}.log")
        before = verify_artifacts(directory).catalogue
        stop = threading.Event()
        worker = threading.Thread(target=keep_adding, args=(served, f"kill-{round_}", dim, rng, stop))
        worker.start()
        time.sleep(1.0 + round_ * 0.37)
        served.kill()
        stop.set()
        worker.join(30)
        manifest = verify_artifacts(directory)  # every listed file complete, by its hash
        after = manifest.catalogue
        assert after is not None and (before is None or after.version >= before.version)
        scorer = Scorer(directory)
        assert scorer.num_items == manifest.num_items + after.added
        seen_versions.append(after.version)
    assert seen_versions == sorted(seen_versions) and seen_versions[-1] > 3


def keep_adding(served: Served, prefix: str, dim: int, rng, stop: threading.Event) -> None:
    """Add one item after another through the server until `stop` or the server is gone."""
    j = 0
    while not stop.is_set():
        feats = rng.normal(size=(1, 2, dim)).astype(np.float32)
        try:
            catalogue_request(served, "add", [f"{prefix}-{j}"],
                              text_feats=("FP32", [1, 2, dim], feats.ravel().tolist()))
        except OSError:
            return
        j += 1


def test_an_exported_repository_serves_as_it_is(tiny_run, tmp_path):
    cli = [sys.executable, "-m", "mp4sr_cli"]
    r = subprocess.run([*cli, "export", tiny_run, "--out", tmp_path / "exported" / "artifacts",
                        "--triton", tmp_path / "exported" / "triton"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    moved = tmp_path / "moved"  # the pair moves together: the models name the artifacts relatively
    shutil.move(tmp_path / "exported", moved)
    served = Served("--repository", moved / "triton", log=tmp_path / "serve.log")
    try:
        ids = item_ids(moved / "artifacts")
        queries = random_queries(ids, 30, seed=3)
        want = expected(moved / "artifacts", queries)
        assert all(same(recommend(served, q), w) for q, w in zip(queries, want, strict=True))
    finally:
        assert served.stop() == 0


def test_serve_without_triton_or_with_bad_arguments_fails_clearly(tmp_path, tiny_artifacts):
    cli = [sys.executable, "-m", "mp4sr_cli", "serve"]
    r = subprocess.run([*cli, tiny_artifacts], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "nvidia-pytriton" in r.stderr and "Traceback" not in r.stderr
    python = str(serve_python())
    for args, message in (([tmp_path / "none"], "no artifacts"),
                          ([tiny_artifacts, "--backend", "gpu"], "--backend"),
                          ([tiny_artifacts, "--http-port", "9000", "--grpc-port", "9000"], "must differ"),
                          (["--repository", tmp_path], "no Python-backend model")):
        r = subprocess.run([python, "-m", "mp4sr_cli", "serve", *map(str, args)], capture_output=True,
                           text=True, timeout=120, cwd=ROOT)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)


def test_the_readme_curl_and_tritonclient_examples_run_as_written(server):
    import re

    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Serving on Triton Inference Server", 1)[1].split("\n## ", 1)[0]
    curl = next(b for b in re.findall(r"```bash\n(.*?)```", section, re.S) if b.startswith("curl"))
    python = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    curl = curl.replace("localhost:8000", f"127.0.0.1:{server.http}")
    r = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    body = json.loads(r.stdout)
    assert [o["name"] for o in body["outputs"]] == ["items", "scores", "unknown_items", "fallback"]
    assert body["outputs"][0]["shape"] == [1, 5]
    python = python.replace("localhost:8001", f"127.0.0.1:{server.grpc}")
    r = subprocess.run([sys.executable, "-c", python], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "item0000" in r.stdout
