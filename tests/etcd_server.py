"""Throwaway etcd servers for tests: members on loopback, each with its own data directory
and ports, with test-only raft timings (ready in about 0.1 s; TTLs of 1 s allowed).

    with EtcdServer(directory) as server:     # started; server.url is etcd://127.0.0.1:PORT
        server.stop(); server.start()         # a restart on the same data

    with EtcdCluster(directory) as cluster:   # three members; cluster.url lists all three
        cluster.leader().stop(SIGKILL)        # the leader, as etcd's own status says
        cluster.members["b"].start()          # one member back, on its data

Without an `etcd` binary (or the `etcd` extra) the tests that need one skip, unless
FLEET_REQUIRE_ETCD=1 (CI sets it): then they fail, so that CI never passes by skipping them.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from typing import Any

import pytest

REQUIRE_ENV = "FLEET_REQUIRE_ETCD"
READY_TIMEOUT = 20.0
PORT_TRIES = 3
GRPC_DRAIN = 0.05
"""Seconds for gRPC to deliver the completions of the calls a store's close cancelled, on the
loop they started on (grpc/grpc#25364: one that arrives after a test's loop closed fails the
next test). fleetd runs one loop for its life and never meets this."""


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
    """One etcd member on 127.0.0.1: alone in its cluster, unless an EtcdCluster names its
    peers in `initial_cluster`."""

    def __init__(self, directory: str, name: str = "solo") -> None:
        self.name = name
        self.data_dir = os.path.join(directory, f"etcd-{name}")
        self.log_path = os.path.join(directory, f"etcd-{name}.log")
        self.client_port = free_port()
        self.peer_port = free_port()
        self.initial_cluster = f"{name}={self.peer_url}"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def client_url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def url(self) -> str:
        """The address fleetd's --store takes."""
        return f"etcd://127.0.0.1:{self.client_port}"

    def command(self) -> list[str]:
        peer = self.peer_url
        return [
            "etcd",
            f"--name={self.name}",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={self.client_url}",
            f"--advertise-client-urls={self.client_url}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster={self.initial_cluster}",
            "--initial-cluster-state=new",
            "--heartbeat-interval=10",
            "--election-timeout=100",
            "--auto-compaction-mode=periodic",
            "--auto-compaction-retention=1h",
        ]

    def start(self) -> "EtcdServer":
        """Start it and wait until it is healthy. A first start of a lone member whose port
        was taken meanwhile (free_port finds one free only a moment before etcd binds it) is
        tried again on new ports."""
        tries_left = PORT_TRIES
        while True:
            tries_left -= 1
            first = not os.path.exists(self.data_dir)
            self.launch()
            try:
                self.wait_healthy()
                return self
            except RuntimeError:
                alone = self.initial_cluster == f"{self.name}={self.peer_url}"
                if not (tries_left and first and alone and "address already in use" in self.log()):
                    raise
            self.stop(signal.SIGKILL)
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self.client_port, self.peer_port = free_port(), free_port()
            self.initial_cluster = f"{self.name}={self.peer_url}"

    def launch(self) -> None:
        """Starts the process without waiting: a member of a cluster is healthy only once a
        quorum of its peers runs too."""
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )

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

    def status(self) -> dict[str, str]:
        """etcd's Maintenance Status RPC for this member, through etcd's JSON gateway: its
        `member_id` (in `header`), `leader`, `raftTerm`; 64-bit numbers as strings."""
        request = urllib.request.Request(f"{self.client_url}/v3/maintenance/status", data=b"{}")
        with urllib.request.urlopen(request, timeout=1) as answer:
            status: dict[str, Any] = json.load(answer)
        return {"member_id": status["header"]["member_id"], "leader": status.get("leader", "0")}

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def pause(self) -> None:
        """Freezes the process (SIGSTOP): connections stay open, nothing answers. Returns once
        every thread of it is stopped: a signal is delivered, not obeyed, at once."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)
        tasks = f"/proc/{self.process.pid}/task"
        deadline = time.monotonic() + READY_TIMEOUT
        while not all(_stopped(f"{tasks}/{tid}/stat") for tid in os.listdir(tasks)):
            if time.monotonic() > deadline:
                raise RuntimeError(f"etcd not stopped within {READY_TIMEOUT}s")
            time.sleep(0.001)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def stop(self, signum: int = signal.SIGTERM) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signum)
            self.process.send_signal(signal.SIGCONT)  # a paused member must run to exit
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


def _stopped(stat_path: str) -> bool:
    """Whether the thread whose /proc stat this is has stopped (state T), or is gone."""
    try:
        with open(stat_path) as f:
            return f.read().rpartition(")")[2].split()[0] == "T"
    except OSError:
        return True


class EtcdCluster:
    """Three etcd members on 127.0.0.1 forming one cluster, started together."""

    NAMES = ("a", "b", "c")

    def __init__(self, directory: str) -> None:
        self.members = {name: EtcdServer(directory, name) for name in self.NAMES}
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members.values())
        for member in self.members.values():
            member.initial_cluster = initial

    @property
    def url(self) -> str:
        """Every member's client endpoint, as fleetd's --store takes them."""
        return self.url_starting_at(self.members[self.NAMES[0]])

    def url_starting_at(self, first: EtcdServer) -> str:
        """The url with `first` listed first: the member a store connects to (gRPC's
        pick_first), and leaves for the next when it goes."""
        members = [first, *(m for m in self.members.values() if m is not first)]
        return "etcd://" + ",".join(f"127.0.0.1:{m.client_port}" for m in members)

    def start(self) -> "EtcdCluster":
        for member in self.members.values():
            member.launch()
        for member in self.members.values():
            member.wait_healthy()
        return self

    def running(self) -> list[EtcdServer]:
        return [m for m in self.members.values() if m.running]

    def leader(self, timeout: float = READY_TIMEOUT) -> EtcdServer:
        """The member the running members agree leads (after an election, once one is won)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                statuses = [(m, m.status()) for m in self.running()]
            except OSError:
                statuses = []
            leaders = {status["leader"] for _, status in statuses}
            for member, status in statuses:
                if leaders == {status["member_id"]}:
                    return member
            if time.monotonic() > deadline:
                raise RuntimeError(f"no leader agreed within {timeout}s: {statuses}")
            time.sleep(0.02)

    def stop(self, signum: int = signal.SIGTERM) -> None:
        for member in self.members.values():
            member.stop(signum)

    def __enter__(self) -> "EtcdCluster":
        try:
            return self.start()
        except BaseException:
            self.stop(signal.SIGKILL)
            raise

    def __exit__(self, *_: object) -> None:
        self.stop(signal.SIGKILL)
