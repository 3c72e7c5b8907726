"""Throwaway etcd servers for tests: single members on loopback, each with its own data
directory and ports, with test-only raft timings (ready in about 0.1 s; TTLs of 1 s allowed).

    with EtcdServer(directory) as server:     # started; server.url is etcd://127.0.0.1:PORT
        server.stop(); server.start()         # a restart on the same data

Without an `etcd` binary (or the `etcd` extra) the tests that need one skip, unless
FLEET_REQUIRE_ETCD=1 (CI sets it): then they fail, so that CI never passes by skipping them.
"""

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request

import pytest

REQUIRE_ENV = "FLEET_REQUIRE_ETCD"
READY_TIMEOUT = 20.0


def etcd_problem() -> str | None:
    """Why etcd tests cannot run here, or None."""
    if shutil.which("etcd") is None:
        return "no etcd binary (apt-get install etcd-server)"
    try:
        import aetcd  # noqa: F401
    except ImportError:
        return "the etcd extra is not installed (pip install -e '.[etcd]')"
    return None


def need_etcd() -> None:
    """Skip the calling test when etcd cannot run here; fail instead under FLEET_REQUIRE_ETCD."""
    problem = etcd_problem()
    if problem is None:
        return
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"etcd is required here ({REQUIRE_ENV}=1): {problem}")
    pytest.skip(problem)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class EtcdServer:
    """One etcd member alone in its cluster, on 127.0.0.1."""

    def __init__(self, directory: str, name: str = "solo") -> None:
        self.name = name
        self.data_dir = os.path.join(directory, f"etcd-{name}")
        self.log_path = os.path.join(directory, f"etcd-{name}.log")
        self.client_port = free_port()
        self.peer_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def client_url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def url(self) -> str:
        """The address fleetd's --store takes."""
        return f"etcd://127.0.0.1:{self.client_port}"

    def command(self) -> list[str]:
        peer = f"http://127.0.0.1:{self.peer_port}"
        return [
            "etcd",
            f"--name={self.name}",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={self.client_url}",
            f"--advertise-client-urls={self.client_url}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster={self.name}={peer}",
            "--initial-cluster-state=new",
            "--heartbeat-interval=10",
            "--election-timeout=100",
            "--auto-compaction-mode=periodic",
            "--auto-compaction-retention=1h",
        ]

    def start(self) -> "EtcdServer":
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        self.wait_healthy()
        return self

    def wait_healthy(self, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.process.returncode}: {self.log()}")
            if self.healthy():
                return
            time.sleep(0.02)
        raise RuntimeError(f"etcd not healthy within {timeout}s: {self.log()}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.client_url}/health", timeout=1) as answer:
                return b'"health":"true"' in answer.read()
        except OSError:
            return False

    def stop(self, signum: int = signal.SIGTERM) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signum)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-4000:]
        except OSError:
            return ""

    def __enter__(self) -> "EtcdServer":
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop(signal.SIGKILL)
