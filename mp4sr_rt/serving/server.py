"""Start Triton Inference Server on a model repository of the runtime's Python-backend models.

    with TritonServer(repository, ports=Ports(8000, 8001, 8002)) as server:
        server.wait_ready()
        server.wait()                      # until SIGTERM / Ctrl-C: in-flight requests finish

The `tritonserver` binary and its Python backend come from the `nvidia-pytriton` wheel (the
`serve` extra), used as a distribution only. Its Python backend stub embeds libpython and runs
the models in this interpreter's environment, which takes three things the wheel leaves to its
user: the stub built for this Python version copied into the backend folder, this interpreter's
library folder first on LD_LIBRARY_PATH (else the stub loads another libpython3.x build from the
system, whose standard library does not match, and fails with `'_thread.RLock' object has no
attribute '_recursion_count'`), and this environment's bin folder first on PATH (the stub finds
its Python home, hence this environment's site-packages, through the `python3` on PATH).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from mp4sr_rt.errors import UserError

INSTALL_HINT = ("mp4sr-rt serve needs Triton Inference Server from the nvidia-pytriton wheel: "
                "pip install 'mp4sr-rt[serve,cpu]' (it pins numpy<2: give it its own environment, "
                "README 'Serving with Triton')")


@dataclass(frozen=True)
class Ports:
    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002


def free_ports(n: int = 3) -> list[int]:
    """`n` distinct TCP ports free on localhost now (for tests and benchmarks; another process
    may still take one before the server binds it)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def distribution() -> Path:
    """The tritonserver folder (bin/, backends/, python_backend_stubs/) of the nvidia-pytriton wheel."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(INSTALL_HINT)
    folder = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
    if not (folder / "bin" / "tritonserver").is_file():
        raise UserError(f"{folder}: no bin/tritonserver in the nvidia-pytriton install; {INSTALL_HINT}")
    return folder


def prepare_backends(dist: Path, workdir: Path) -> Path:
    """A backend folder for this Python: the wheel's Python backend plus the stub for this version."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise UserError(f"nvidia-pytriton has no Python backend stub for Python {version} ({stub})")
    python = workdir / "backends" / "python"
    python.mkdir(parents=True)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        (python / name).symlink_to(dist / "backends" / "python" / name)
    shutil.copy2(stub, python / "triton_python_backend_stub")
    return workdir / "backends"


def environment(dist: Path) -> dict[str, str]:
    """The server's environment: this interpreter's libpython and environment first (module docstring)."""
    env = dict(os.environ)
    libs = [sysconfig.get_config_var("LIBDIR") or "", str(dist.parent.parent / "nvidia_pytriton.libs")]
    env["LD_LIBRARY_PATH"] = os.pathsep.join([p for p in libs if p] + [env.get("LD_LIBRARY_PATH", "")]).rstrip(":")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.pop("PYTHONHOME", None)
    return env


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it when the process that started it dies, so that a
    killed `mp4sr-rt serve` never leaves a server (and its ports) behind."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class TritonServer:
    """One tritonserver process on `repository`, loading `models` (all its models if None)."""

    def __init__(self, repository: Path, ports: Ports = Ports(), models: list[str] | None = None,
                 log: Path | None = None, verbose: bool = False, exit_timeout_s: int = 30):
        self.repository, self.ports, self.models = Path(repository), ports, models
        self.verbose, self.exit_timeout_s = verbose, exit_timeout_s
        self._workdir = Path(tempfile.mkdtemp(prefix="mp4sr-serve-"))
        self.log = log or self._workdir / "tritonserver.log"
        self.process: subprocess.Popen | None = None

    def command(self, dist: Path, backends: Path) -> list[str]:
        cmd = [str(dist / "bin" / "tritonserver"), f"--model-repository={self.repository.resolve()}",
               f"--backend-directory={backends}", f"--cache-directory={dist / 'caches'}",
               f"--http-port={self.ports.http}", f"--grpc-port={self.ports.grpc}",
               f"--metrics-port={self.ports.metrics}", "--allow-metrics=true",
               "--exit-on-error=true", "--strict-readiness=true", f"--exit-timeout-secs={self.exit_timeout_s}"]
        if self.models is not None:
            cmd += ["--model-control-mode=explicit"] + [f"--load-model={m}" for m in self.models]
        return cmd

    def start(self) -> TritonServer:
        try:
            dist = distribution()
            backends = prepare_backends(dist, self._workdir)
            self._log_file = open(self.log, "ab")
            out = None if self.verbose else self._log_file
            self.process = subprocess.Popen(self.command(dist, backends), env=environment(dist), stdout=out,
                                            stderr=subprocess.STDOUT if out else None, start_new_session=True,
                                            preexec_fn=_die_with_parent)
        except BaseException:  # a `with` never entered never exits: clean up here (Ctrl-C, SIGTERM too)
            self.close()
            raise
        return self

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        """Until every model is loaded and the server answers; UserError (with the log's end) if it dies."""
        deadline = time.monotonic() + timeout_s
        url = f"http://127.0.0.1:{self.ports.http}/v2/health/ready"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise UserError(f"tritonserver exited with status {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=1) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        self.stop()
        raise UserError(f"tritonserver not ready after {timeout_s:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        if self.verbose or not self.log.is_file():
            return "(its output went to the terminal)"
        text = self.log.read_text(encoding="utf-8", errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def wait(self) -> int:
        """Until the server exits; SIGTERM and Ctrl-C are passed on to it (it finishes in-flight
        requests, then stops). Returns its exit status."""
        def forward(signum, frame):
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)

        previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            while True:
                try:
                    return self.process.wait()
                except KeyboardInterrupt:
                    forward(signal.SIGINT, None)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def stop(self, timeout_s: float | None = None) -> int | None:
        """SIGTERM, then wait for the exit (SIGKILL after the exit timeout and 10 s more)."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s if timeout_s is not None else self.exit_timeout_s + 10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return self.process.returncode

    def close(self) -> None:
        self.stop()
        if hasattr(self, "_log_file"):
            self._log_file.close()
        shutil.rmtree(self._workdir, ignore_errors=True)

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
