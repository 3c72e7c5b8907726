"""`fleetctl coord-run`: hold a lease for the whole life of one child process.

    acquire ── contested, or our agent is live elsewhere ──▶ stand down, exit 0
       │
       ▼
    spawn the child ◀── heartbeat every ttl/3, reconnecting if fleetd restarts
       │
       ├── child exits N ─────────────────────────────────▶ exit N (0 → 0)
       ├── SIGTERM/SIGINT/SIGHUP: forwarded to the child ───▶ exit 128+signal after it
       ├── lease lost (not_owned, or no heartbeat succeeded
       │   before our own deadline): SIGTERM, then SIGKILL ─▶ exit 10
       └── internal error ──────────────────────────────────▶ exit 1
    then, on every path: --cleanup once (still holding the lease if we have it), then
    release once. fleetd unreachable at the start: exit 14.

It is a plain blocking program with no event loop: a supervisor of one child needs only a
poll on the child's pidfd with a timeout for the next heartbeat. Signals are forwarded from
the handler itself, through the pidfd, so they reach the child at once whatever the loop is
doing, and never a recycled PID. The child gets PR_SET_PDEATHSIG=SIGKILL: if coord-run is
killed outright (STONITH escalates to SIGKILL), its child cannot outlive it unfenced.
"""

import ctypes
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from types import FrameType

from fleetctl.sync import SyncClient
from protocol.errors import FleetError, Unavailable
from protocol.messages import LeaseResult
from protocol.outcomes import Outcome

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
LEASE_LOST = Outcome.NOT_OWNED.exit_code
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Options:
    socket_path: str
    agent: str
    lease: str
    ttl: float
    command: Sequence[str]
    cleanup: str | None = None
    grace: float = 5.0
    timeout: float = 10.0


def say(message: str) -> None:
    sys.stderr.write(f"coord-run: {message}\n")
    sys.stderr.flush()


class _Child:
    """A spawned process and its pidfd; the pidfd is what every signal goes through."""

    def __init__(self, argv: Sequence[str], env: dict[str, str]) -> None:
        arm = _die_with_parent(os.getpid())
        self.process = subprocess.Popen(argv, env=env, preexec_fn=arm)  # noqa: PLW1509 (no threads)
        self.pidfd: int | None = os.pidfd_open(self.process.pid)
        self.status: int | None = None

    def signal(self, signum: int) -> None:
        pidfd = self.pidfd
        if pidfd is None:
            return
        with suppress(OSError):  # it exited: nothing left to signal
            signal.pidfd_send_signal(pidfd, signum)

    def wait(self, timeout: float | None) -> bool:
        """Whether the child has exited within `timeout` seconds (None: no limit); reaps it."""
        if self.status is not None:
            return True
        assert self.pidfd is not None
        poller = select.poll()
        poller.register(self.pidfd, select.POLLIN)
        if not poller.poll(None if timeout is None else max(0, round(timeout * 1000))):
            return False
        self.status = self.process.wait()
        pidfd, self.pidfd = self.pidfd, None
        os.close(pidfd)
        return True

    def stop(self, grace: float) -> None:
        """SIGTERM (and SIGCONT), then SIGKILL after `grace` seconds."""
        self.signal(signal.SIGTERM)
        self.signal(signal.SIGCONT)
        if not self.wait(grace):
            self.signal(signal.SIGKILL)
            self.wait(None)

    @property
    def exit_code(self) -> int:
        """The shell's convention: the status, or 128 + the signal that killed it."""
        assert self.status is not None
        return self.status if self.status >= 0 else 128 - self.status


def _die_with_parent(parent: int) -> Callable[[], None]:
    """A preexec function asking the kernel to SIGKILL the child when coord-run dies. libc is
    loaded here, before the fork, so the child only makes one system call."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def arm() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before the prctl took effect
            os._exit(1)

    return arm


class _Lease:
    """The lease as coord-run holds it: heartbeats, reconnects, and its own deadline.

    The deadline is reckoned from when a successful heartbeat was *sent*, so it never runs
    past fleetd's (which renewed after that)."""

    def __init__(self, options: Options, client: SyncClient, result: LeaseResult) -> None:
        assert result.lease is not None
        self.options = options
        self.client: SyncClient | None = client
        self.token = result.lease.token
        self.interval = options.ttl / 3
        self.retry = max(0.05, min(options.ttl / 10, 0.5))
        now = time.monotonic()
        self.deadline = now + options.ttl
        self.next_beat = now + self.interval
        self.lost = False

    def due_in(self) -> float:
        return max(0.0, self.next_beat - time.monotonic())

    def beat(self) -> None:
        """One heartbeat, or one reconnection attempt; sets `lost` once the lease is gone."""
        sent = time.monotonic()
        try:
            client = self._client()
            answer = client.lease_heartbeat(
                self.options.lease,
                self.options.agent,
                self.token,
                timeout=max(0.05, min(self.interval, self.deadline - sent)),
            )
        except FleetError as error:
            self._drop_client()
            if time.monotonic() >= self.deadline:
                self.lost = True
                say(f"lease {self.options.lease!r} lost: no heartbeat succeeded ({error.message})")
            self.next_beat = time.monotonic() + self.retry
            return
        if answer.outcome is Outcome.NOT_OWNED:
            self.lost = True
            say(f"lease {self.options.lease!r} lost: {answer.message or 'not owned'}")
            return
        self.deadline = sent + self.options.ttl
        self.next_beat = sent + self.interval

    def release(self) -> None:
        """Exactly one attempt, on a new connection if the old one broke."""
        try:
            answer = self._client().lease_release(
                self.options.lease, self.options.agent, self.token, timeout=self.options.timeout
            )
            if answer.outcome not in (Outcome.RELEASED, Outcome.ALREADY_RELEASED):
                say(f"release of {self.options.lease!r}: {answer.outcome}")
        except FleetError as error:
            say(f"could not release {self.options.lease!r}: {error.message}")
        finally:
            self._drop_client()

    def _client(self) -> SyncClient:
        if self.client is None:
            client = SyncClient(self.options.socket_path, timeout=min(self.options.timeout, 1.0))
            client.connect()
            self.client = client
        return self.client

    def _drop_client(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None


class CoordRun:
    """One run of coord-run; `run()` returns the exit code."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.lease: _Lease | None = None
        self.child: _Child | None = None
        self.forwarded: int | None = None
        self._forwarding = False

    def run(self) -> int:
        previous = {signum: signal.signal(signum, self._on_signal) for signum in FORWARDED}
        try:
            code = self._guarded()
            self._cleanup(code)
            if self.lease is not None:
                self.lease.release()
            return code
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.forwarded is None:
            self.forwarded = signum
        if self._forwarding and self.child is not None:
            self.child.signal(signum)

    def _guarded(self) -> int:
        """The run up to the child's end: any unexpected failure is exit 1, child stopped."""
        try:
            return self._run()
        except Exception as error:
            say(f"internal error: {error!r}")
            return 1
        finally:
            self._forwarding = False
            if self.child is not None and self.child.status is None:
                self.child.stop(self.options.grace)

    def _run(self) -> int:
        client = SyncClient(self.options.socket_path, timeout=self.options.timeout)
        try:
            client.connect()
            result = client.lease_acquire(self.options.lease, self.options.agent, self.options.ttl)
        except FleetError as error:
            client.close()
            prefix = "fleetd unreachable" if isinstance(error, Unavailable) else "cannot acquire"
            say(f"{prefix}: {error.message}")
            return error.outcome.exit_code
        if not self._leading(result):
            client.close()
            say(f"standing down: {result.message or result.outcome}")
            return 0
        self.lease = _Lease(self.options, client, result)
        if self.forwarded is not None:
            return 128 + self.forwarded
        return self._supervise()

    def _leading(self, result: LeaseResult) -> bool:
        """Acquired; or already ours and held by this very process (never on a first try)."""
        if result.outcome is Outcome.ACQUIRED:
            return True
        return (
            result.outcome is Outcome.ALREADY_ACQUIRED
            and result.lease is not None
            and result.lease.identity.pid == os.getpid()
        )

    def _supervise(self) -> int:
        lease = self.lease
        assert lease is not None
        try:
            self.child = child = self._spawn(lease.token)
        except OSError as error:
            say(f"cannot start {self.options.command[0]!r}: {error.strerror or error}")
            return 1
        self._forwarding = True
        if self.forwarded is not None:  # a signal that came while spawning
            child.signal(self.forwarded)
        while not child.wait(lease.due_in()):
            lease.beat()
            if lease.lost:
                self._forwarding = False
                child.stop(self.options.grace)
                return LEASE_LOST
        if self.forwarded is not None:
            return 128 + self.forwarded
        return child.exit_code

    def _spawn(self, token: int) -> _Child:
        env = {
            **os.environ,
            "FLEET_LEASE": self.options.lease,
            "FLEET_LEASE_TOKEN": str(token),
            "FLEET_AGENT": self.options.agent,
        }
        return _Child(self.options.command, env)

    def _cleanup(self, code: int) -> None:
        """Run --cleanup once, heartbeating meanwhile if the lease is still ours."""
        if not self.options.cleanup:
            return
        env = {**os.environ, "FLEET_LEASE": self.options.lease, "FLEET_EXIT_CODE": str(code)}
        try:
            cleanup = _Child(["/bin/sh", "-c", self.options.cleanup], env)
        except OSError as error:
            say(f"cleanup could not start: {error}")
            return
        lease = self.lease
        while not cleanup.wait(lease.due_in() if lease and not lease.lost else None):
            assert lease is not None
            lease.beat()
        if cleanup.exit_code:
            say(f"cleanup exited {cleanup.exit_code}")


def coord_run(options: Options) -> int:
    return CoordRun(options).run()
