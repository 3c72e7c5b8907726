"""A standing crash campaign: fleetd SIGKILLed at random moments under a mixed workload, and
the invariants checked after every restart.

    python -m tests.chaos [--kills N] [--seed S] [--json PATH] [--verbose]

One fleetd (tests/processes.Fleetd, in a short temp dir). In the background, worker threads
drive a mixed workload through the library (SyncClient) and, for one claims worker, the CLI
as real processes:

- leases: acquire (TTL an hour), heartbeat, release of names each worker owns alone;
- claims: acquire with random content (up to 64 KiB, of both kinds), release;
- clusters: up and down of small clusters of `sleep` members (plus two stable clusters that
  stay up for the whole campaign, brought back only when their holder was killed).

The campaign SIGKILLs fleetd N times: after a random delay, or just after a worker sent a
`cluster_up` or a `claim_acquire` (so that kills land mid-launch and mid-delivery), and now
and then SIGKILLs a random holder too (while fleetd is down, or while it runs). An operation
counts as acknowledged only when its success answer arrived; one cut off by the kill (exit 14,
Unavailable, ConnectionLost) is unknown, and is resolved after the restart by looking, within
what either outcome allows. After every restart the workers are parked and the invariants
checked:

- every acknowledged lease is held with its owner and its token; every acknowledged release
  stays released; a grant's token is above every token acknowledged before it was asked for
  (tokens never go backwards) and never one seen before;
- every acknowledged claim is held with its owner, revision and sha256, and its delivered
  file holds exactly the acknowledged content; every released claim's file is gone; every
  file in the inbox and files directories belongs to a held claim and holds its content in
  full (never half-written), and the staging directory is empty;
- every member of a cluster that was running keeps its pid, holder and restart count (a
  fleetd restart restarts no member); every member process alive has a live holder as its
  parent and is one fleetd reports running, and every member fleetd reports running is
  alive; a holder that was SIGKILLed takes its members down and fleetd reports them not
  running.

It prints a summary (kills, restarts, holder kills, operations acknowledged by kind,
invariants checked, every violation precisely) and exits 1 on any violation. Everything it
started (holders, members, fleetd, the temp dir) is gone when it exits.
"""

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

from fleetctl.sync import SyncClient
from fleetd.delivery import POOL, POOLED
from protocol.claims import ClaimInfo
from protocol.definitions import cluster_from_dict
from protocol.errors import Absent, FleetError, Unavailable
from protocol.leases import LeaseInfo
from protocol.members import MemberState, MemberStatus
from tests.processes import (
    FLEETCTL,
    FLEETD,
    HOLDER_NAME,
    Fleetd,
    kill_holders,
    marked_processes,
    process_name,
    short_tempdir,
    wait_gone,
)

LEASE_TTL = 3600.0
"""Seconds: no lease may expire during a campaign, so that "held" stays checkable."""
RESTART_GRACE = 10.0
"""Seconds for what a kill sets going to settle: members dying after their holder."""
CLIENT_TIMEOUT = 20.0
MEMBER_MARK = "CHAOS_RUN"
"""In the environment of this campaign's members: its run id."""
CAMPAIGN_MARK = "CHAOS_CAMPAIGN"
"""In fleetd's environment, so in its holders' and members' too: what clean-up ends."""


# -- the tally --------------------------------------------------------------------------------


@dataclass
class Tally:
    """What the campaign did and found; every counter is printed and written as JSON."""

    seed: int
    kills: int = 0
    kill_moments: Counter[str] = field(default_factory=Counter)
    restarts: int = 0
    holder_kills: int = 0
    acknowledged: Counter[str] = field(default_factory=Counter)
    cut_off: Counter[str] = field(default_factory=Counter)
    """Operations whose answer a kill prevented (resolved after the restart)."""
    checks: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)
    seconds: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def ack(self, op: str) -> None:
        with self.lock:
            self.acknowledged[op] += 1

    def cut(self, op: str) -> None:
        with self.lock:
            self.cut_off[op] += 1

    def check(self, invariant: str, holds: bool, violation: Callable[[], str]) -> bool:
        """Count one check of `invariant`; record the violation (described lazily) if not."""
        with self.lock:
            self.checks[invariant] += 1
            if holds:
                return True
            self.violations.append(f"[kill {self.kills}] {invariant}: {violation()}")
        return False

    def violated(self, invariant: str, what: str) -> None:
        self.check(invariant, False, lambda: what)

    def as_json(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "kills": self.kills,
            "kill_moments": dict(self.kill_moments),
            "restarts": self.restarts,
            "holder_kills": self.holder_kills,
            "acknowledged": dict(self.acknowledged),
            "cut_off": dict(self.cut_off),
            "invariants_checked": sum(self.checks.values()),
            "checks": dict(self.checks),
            "violations": self.violations,
            "seconds": round(self.seconds, 1),
        }

    def summary(self) -> str:
        moments = ", ".join(f"{n} {moment}" for moment, n in sorted(self.kill_moments.items()))
        lines = [
            f"chaos: seed {self.seed}, {self.seconds:.0f} s",
            f"  fleetd kills     {self.kills} ({moments}), restarts {self.restarts}",
            f"  holder kills     {self.holder_kills}",
            "  acknowledged     " + _counts(self.acknowledged),
            "  cut off by kills " + (_counts(self.cut_off) or "none"),
            f"  invariants       {sum(self.checks.values())} checked:",
            *(f"    {n:6d}  {invariant}" for invariant, n in sorted(self.checks.items())),
            f"  violations       {len(self.violations)}",
        ]
        lines += [f"    - {violation}" for violation in self.violations]
        return "\n".join(lines)


def _counts(counter: Counter[str]) -> str:
    return ", ".join(f"{name} {n}" for name, n in sorted(counter.items()))


# -- parking the workers -------------------------------------------------------------------


class Gate:
    """Workers pass `checkpoint()` between operations; `parked()` holds them all there (each
    finishes the operation it is in) while the campaign checks, then lets them go."""

    def __init__(self, workers: int) -> None:
        self._workers = workers
        self._parked = 0
        self._closed = False
        self.stopping = False
        self._cond = threading.Condition()

    def checkpoint(self) -> None:
        with self._cond:
            if not self._closed:
                return
            self._parked += 1
            self._cond.notify_all()
            self._cond.wait_for(lambda: not self._closed)
            self._parked -= 1

    @contextmanager
    def parked(self, timeout: float = 120.0) -> Iterator[None]:
        with self._cond:
            self._closed = True
            if not self._cond.wait_for(lambda: self._parked == self._workers, timeout):
                raise RuntimeError(f"workers did not park within {timeout}s")
        try:
            yield
        finally:
            with self._cond:
                self._closed = False
                self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self.stopping = True
            self._closed = False
            self._cond.notify_all()

    def exited(self) -> None:
        """A worker leaves for good (the campaign is stopping)."""
        with self._cond:
            self._workers -= 1
            self._cond.notify_all()


# -- the model: what was acknowledged, and what a kill left unknown ---------------------------


class Tokens:
    """Every token (lease token, claim revision: both store revisions) granted so far."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.seen: set[int] = set()
        self.highest = 0

    def floor(self) -> int:
        """Taken before a request is sent: its grant must be above this."""
        with self._lock:
            return self.highest

    def granted(self, token: int) -> None:
        with self._lock:
            self.seen.add(token)
            self.highest = max(self.highest, token)

    def check_new(self, tally: Tally, what: str, token: int, floor: int) -> None:
        with self._lock:
            seen = token in self.seen
        tally.check(
            "tokens never go backwards",
            token > floor,
            lambda: f"{what} granted token {token}, not above {floor} acknowledged before",
        )
        tally.check(
            "a new grant's token is never one seen before",
            not seen,
            lambda: f"{what} granted token {token} again",
        )
        self.granted(token)


@dataclass
class Lease:
    name: str
    owner: str
    token: int = 0
    """The acknowledged grant's token; 0 when not held."""
    pending: str = ""
    """"acquire" or "release" when a kill cut that operation off: its outcome is unknown."""
    floor: int = 0


@dataclass
class Claim:
    kind: str
    key: str
    owner: str
    content: bytes = b""
    revision: int = 0
    path: str = ""
    pending: str = ""
    pending_content: bytes = b""
    floor: int = 0

    @property
    def held(self) -> bool:
        return self.revision != 0


@dataclass(eq=False)
class Cluster:
    name: str
    members: list[str]
    state: str = "down"
    """down | up | killed (we SIGKILLed its holder) | going (a down was cut off)"""
    pending: str = ""
    pids: dict[str, tuple[int, int]] = field(default_factory=dict)
    """member -> (pid, restarts) as seen once up."""
    holder: int = 0
    stable: bool = False

    def keys(self) -> list[str]:
        return [f"{self.name}/{m}" for m in self.members]


# -- workers --------------------------------------------------------------------------------


class Worker(threading.Thread):
    """Runs `step` until stopped; connects (again) as needed. Errors other than fleetd being
    away are violations."""

    name_prefix = "worker"

    def __init__(self, campaign: "Campaign", index: int) -> None:
        super().__init__(name=f"{self.name_prefix}-{index}", daemon=True)
        self.campaign = campaign
        self.tally = campaign.tally
        self.rng = random.Random(campaign.rng.random())
        self.index = index
        self.client: SyncClient | None = None
        self.in_flight = ""

    def run(self) -> None:
        gate = self.campaign.gate
        try:
            while not gate.stopping:
                gate.checkpoint()
                if gate.stopping:
                    break
                try:
                    self.step(self.connected())
                except Unavailable:
                    self.drop()
                    time.sleep(0.02)
                except FleetError as exc:
                    self.drop()
                    self.tally.violated("no unexpected errors", f"{self.name}: {exc!r}")
                    time.sleep(0.1)
                finally:
                    self.in_flight = ""
        except Exception:
            self.tally.violated("no unexpected errors", f"{self.name}: {traceback.format_exc()}")
        finally:
            self.drop()
            gate.exited()

    def connected(self) -> SyncClient:
        if self.client is None:
            client = SyncClient(self.campaign.daemon.socket_path, timeout=CLIENT_TIMEOUT)
            client.connect()
            self.client = client
        return self.client

    def drop(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None

    def step(self, client: SyncClient) -> None:
        raise NotImplementedError

    def call(self, op: str, do: Callable[[], Any], on_cut: Callable[[], None]) -> Any:
        """Run one operation: acknowledged when it answers; cut off (`on_cut`, then raised
        again) when fleetd goes away before it does."""
        self.in_flight = op
        try:
            result = do()
        except Unavailable:
            on_cut()
            self.tally.cut(op)
            raise
        self.tally.ack(op)
        return result

    def reconcile(self, client: SyncClient) -> None:
        """Compare everything this worker owns with what fleetd shows (workers parked)."""
        raise NotImplementedError


class LeaseWorker(Worker):
    name_prefix = "leases"

    def __init__(self, campaign: "Campaign", index: int) -> None:
        super().__init__(campaign, index)
        owner = f"lease-owner-{index}"
        self.leases = [Lease(f"chaos/l{index}-{k}", owner) for k in range(4)]

    def step(self, client: SyncClient) -> None:
        lease = self.rng.choice(self.leases)
        if lease.pending:
            self.resolve(lease, _lease_of(client, lease.name))
        if not lease.token:
            self.acquire(client, lease)
        elif self.rng.random() < 0.3:
            self.heartbeat(client, lease)
        else:
            self.release(client, lease)

    def acquire(self, client: SyncClient, lease: Lease) -> None:
        floor = self.campaign.tokens.floor()

        def cut() -> None:
            lease.pending, lease.floor = "acquire", floor

        result = self.call(
            "lease_acquire", lambda: client.lease_acquire(lease.name, lease.owner, LEASE_TTL), cut
        )
        if self.tally.check(
            "a free lease is acquired",
            result.outcome == "acquired" and result.lease is not None,
            lambda: f"{lease.name}: answered {result.outcome} {result.message}",
        ):
            lease.token = result.lease.token
            self.campaign.tokens.check_new(self.tally, f"lease {lease.name}", lease.token, floor)

    def heartbeat(self, client: SyncClient, lease: Lease) -> None:
        result = self.call(
            "lease_heartbeat",
            lambda: client.lease_heartbeat(lease.name, lease.owner, lease.token),
            lambda: None,
        )
        self.tally.check(
            "a held lease is renewed",
            result.outcome == "renewed",
            lambda: f"{lease.name} token {lease.token}: answered {result.outcome}",
        )

    def release(self, client: SyncClient, lease: Lease) -> None:
        def cut() -> None:
            lease.pending = "release"

        result = self.call(
            "lease_release",
            lambda: client.lease_release(lease.name, lease.owner, lease.token),
            cut,
        )
        self.tally.check(
            "a held lease is released",
            result.outcome == "released",
            lambda: f"{lease.name} token {lease.token}: answered {result.outcome}",
        )
        lease.token = 0

    def resolve(self, lease: Lease, seen: LeaseInfo | None) -> None:
        """What a cut-off operation did, from what fleetd shows now: either outcome is
        allowed, nothing else."""
        held = seen is not None and seen.state == "held" and seen.owner == lease.owner
        token = seen.token if seen is not None and held else 0
        if lease.pending == "acquire" and held:
            self.campaign.tokens.check_new(self.tally, f"lease {lease.name}", token, lease.floor)
            lease.token = token
        elif lease.pending == "release" and held:
            self.tally.check(
                "a lease whose release was cut off keeps its token",
                token == lease.token,
                lambda: f"{lease.name}: had token {lease.token}, shows {token}",
            )
        elif lease.pending == "release":
            lease.token = 0
        lease.pending = ""

    def reconcile(self, client: SyncClient) -> None:
        seen = {info.name: info for info in client.lease_list(f"chaos/l{self.index}-").leases}
        for lease in self.leases:
            info = seen.get(lease.name)
            if lease.pending:
                self.resolve(lease, info)
            elif lease.token:
                self.tally.check(
                    "every acknowledged lease is held with its token",
                    info is not None
                    and (info.state, info.owner, info.token) == ("held", lease.owner, lease.token),
                    lambda lease=lease, info=info: (
                        f"{lease.name} acknowledged held by "
                        f"{lease.owner} with token {lease.token}; fleetd shows {_lease_text(info)}"
                    ),
                )
            else:
                self.tally.check(
                    "every acknowledged release stays released",
                    info is None or info.state != "held",
                    lambda lease=lease, info=info: (
                        f"{lease.name} released; fleetd shows {_lease_text(info)}"
                    ),
                )


def _lease_of(client: SyncClient, name: str) -> LeaseInfo | None:
    return client.lease_inspect(name).lease


def _lease_text(info: LeaseInfo | None) -> str:
    if info is None:
        return "no record"
    return f"{info.state} by {info.owner} with token {info.token}"


class ClaimWorker(Worker):
    """Claims through the library, or (`cli`) through `fleetctl claims` as real processes."""

    name_prefix = "claims"

    def __init__(self, campaign: "Campaign", index: int, *, cli: bool = False) -> None:
        super().__init__(campaign, index)
        self.cli = cli
        owner = f"claimer-{index}"
        kinds = ("prompt_inbox", "file")
        self.claims = [Claim(kinds[k % 2], f"c{index}-{k}", owner) for k in range(6)]

    def content(self) -> bytes:
        size = int(self.rng.choice([1, 100, 4096, 65536]) * self.rng.random()) + 1
        line = f"{uuid.UUID(int=self.rng.getrandbits(128))} é\n"
        return (line * (size // len(line) + 1)).encode()[:size].decode(errors="ignore").encode()

    def step(self, client: SyncClient) -> None:
        claim = self.rng.choice(self.claims)
        if claim.pending:
            self.resolve(claim, client.claim_inspect(claim.kind, claim.key).claim)
        if not claim.held:
            self.acquire(client, claim)
        else:
            self.release(client, claim)

    def acquire(self, client: SyncClient, claim: Claim) -> None:
        content = self.content() or b"x"
        floor = self.campaign.tokens.floor()

        def cut() -> None:
            claim.pending, claim.pending_content, claim.floor = "acquire", content, floor

        if self.cli:
            answer = self.call(
                "claim_acquire", lambda: self.fleetctl("acquire", claim, content), cut
            )
            outcome, info = answer["outcome"], _claim_info(answer.get("claim"))
        else:
            result = self.call(
                "claim_acquire",
                lambda: client.claim_acquire(claim.kind, claim.key, claim.owner, content),
                cut,
            )
            outcome, info = result.outcome, result.claim
        if self.tally.check(
            "a free claim is acquired",
            outcome == "acquired" and info is not None,
            lambda: f"{claim.kind}/{claim.key}: answered {outcome}",
        ):
            assert info is not None
            claim.content, claim.revision, claim.path = content, info.revision, info.path
            self.campaign.tokens.check_new(
                self.tally, f"claim {claim.kind}/{claim.key}", info.revision, floor
            )

    def release(self, client: SyncClient, claim: Claim) -> None:
        def cut() -> None:
            claim.pending = "release"

        if self.cli:
            outcome = self.call("claim_release", lambda: self.fleetctl("release", claim), cut)[
                "outcome"
            ]
        else:
            outcome = self.call(
                "claim_release",
                lambda: client.claim_release(claim.kind, claim.key, claim.owner),
                cut,
            ).outcome
        self.tally.check(
            "a held claim is released",
            outcome == "released",
            lambda: f"{claim.kind}/{claim.key}: answered {outcome}",
        )
        claim.revision = 0

    def fleetctl(self, command: str, claim: Claim, content: bytes = b"") -> dict[str, Any]:
        """`fleetctl claims COMMAND` as a script runs it: exit 14 is fleetd away (raised as
        Unavailable); any exit but 0 and 14 is an error."""
        argv = [*FLEETCTL, "claims", command, "--kind", claim.kind, "--key", claim.key]
        done = subprocess.run(
            [*argv, "--owner", claim.owner],
            env=self.campaign.daemon.env,
            input=content,
            capture_output=True,
            timeout=60,
            check=False,
        )
        if done.returncode == 14:
            raise Unavailable(done.stdout.decode(errors="replace"))
        if done.returncode != 0:
            raise FleetError(f"fleetctl claims {command} exited {done.returncode}: {done.stdout!r}")
        answer: dict[str, Any] = json.loads(done.stdout)
        return answer

    def resolve(self, claim: Claim, seen: ClaimInfo | None) -> None:
        held = seen is not None and seen.state == "held"
        name = f"{claim.kind}/{claim.key}"
        if claim.pending == "acquire" and held:
            assert seen is not None
            content = claim.pending_content
            self.tally.check(
                "a claim whose acquire was cut off holds that content or nothing",
                (seen.owner, seen.sha256) == (claim.owner, _sha(content)),
                lambda: f"{name}: sent sha256 {_sha(content)}, shows {_claim_text(seen)}",
            )
            self.campaign.tokens.check_new(self.tally, f"claim {name}", seen.revision, claim.floor)
            claim.content, claim.revision, claim.path = content, seen.revision, seen.path
        elif claim.pending == "release" and held:
            assert seen is not None
            self.tally.check(
                "a claim whose release was cut off keeps its revision",
                seen.revision == claim.revision,
                lambda: f"{name}: had revision {claim.revision}, shows {_claim_text(seen)}",
            )
        elif claim.pending == "release":
            claim.revision = 0
        claim.pending, claim.pending_content = "", b""

    def reconcile(self, client: SyncClient) -> None:
        seen = {
            (info.kind, info.key): info
            for kind in ("prompt_inbox", "file")
            for info in client.claim_list(kind, self.claims[0].owner).claims
        }
        for claim in self.claims:
            info = seen.get((claim.kind, claim.key))
            if claim.pending:
                self.resolve(claim, info)
            name = f"{claim.kind}/{claim.key}"
            if claim.held:
                self.tally.check(
                    "every acknowledged claim is held with its revision and content",
                    info is not None
                    and (info.state, info.owner, info.revision, info.sha256)
                    == ("held", claim.owner, claim.revision, _sha(claim.content)),
                    lambda claim=claim, info=info, name=name: (
                        f"{name} acknowledged with "
                        f"revision {claim.revision} sha256 {_sha(claim.content)}; fleetd shows "
                        f"{_claim_text(info)}"
                    ),
                )
                on_disk = _read(claim.path)
                self.tally.check(
                    "every acknowledged claim's file holds exactly its content",
                    on_disk == claim.content,
                    lambda claim=claim, on_disk=on_disk, name=name: (
                        f"{name}: {claim.path} "
                        f"holds {_describe(on_disk)}, acknowledged {len(claim.content)} bytes"
                    ),
                )
            else:
                self.tally.check(
                    "every released claim stays released",
                    info is None or info.state != "held",
                    lambda info=info, name=name: f"{name} released; shows {_claim_text(info)}",
                )
                if claim.path:
                    self.tally.check(
                        "a released claim's file is gone",
                        not os.path.exists(claim.path),
                        lambda claim=claim, name=name: f"{name}: {claim.path} still exists",
                    )


def _claim_info(raw: Any) -> ClaimInfo | None:
    import msgspec

    return None if raw is None else msgspec.convert(raw, ClaimInfo)


def _claim_text(info: ClaimInfo | None) -> str:
    if info is None:
        return "no record"
    return f"{info.state} by {info.owner}, revision {info.revision}, sha256 {info.sha256}"


def _sha(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def _describe(content: bytes | None) -> str:
    return "nothing (no file)" if content is None else f"{len(content)} bytes {_sha(content)}"


class ClusterWorker(Worker):
    """Brings small clusters up and down; the campaign kills their holders now and then."""

    name_prefix = "clusters"

    def __init__(self, campaign: "Campaign", index: int) -> None:
        super().__init__(campaign, index)
        self.clusters = [Cluster(f"d{index}-{k}", ["a", "b"]) for k in range(3)]
        self.busy: Cluster | None = None

    def step(self, client: SyncClient) -> None:
        cluster = self.rng.choice(self.clusters)
        with self.campaign.lock:
            self.busy = cluster
        try:
            self.campaign.settle(client, cluster)
            if cluster.state == "down":
                self.campaign.up(client, cluster, self)
            else:
                self.campaign.down(client, cluster, self)
        finally:
            with self.campaign.lock:
                self.busy = None

    def reconcile(self, client: SyncClient) -> None:
        for cluster in self.clusters:
            self.campaign.check_cluster(client, cluster)


# -- the campaign ----------------------------------------------------------------------------


class Campaign:
    def __init__(self, kills: int, seed: int, *, verbose: bool = False, keep: bool = False) -> None:
        self.kills = kills
        self.rng = random.Random(seed)
        self.tally = Tally(seed=seed)
        self.verbose = verbose
        self.keep = keep
        self.kept = ""
        self.run_id = uuid.uuid4().hex
        self.root = short_tempdir()
        self.daemon = Fleetd(self.root, extra_env={CAMPAIGN_MARK: self.run_id})
        self.tokens = Tokens()
        self.lock = threading.Lock()
        self.stable = [Cluster(f"s{k}", ["a", "b", "c"], stable=True) for k in range(2)]
        self.workers: list[Worker] = [
            LeaseWorker(self, 0),
            LeaseWorker(self, 1),
            ClaimWorker(self, 0),
            ClaimWorker(self, 1),
            ClaimWorker(self, 2, cli=True),
            ClusterWorker(self, 0),
        ]
        self.gate = Gate(len(self.workers))

    def log(self, message: str) -> None:
        """Narrate to chaos.log beside fleetd.log (and to stdout with --verbose)."""
        line = f"chaos [{time.monotonic() - self.started:6.1f}s] {message}"
        with open(os.path.join(self.root, "chaos.log"), "a") as f:
            f.write(line + "\n")
        if self.verbose:
            print(line, flush=True)

    # -- the run

    def run(self) -> Tally:
        self.started = time.monotonic()
        try:
            self.daemon.start()
            with SyncClient(self.daemon.socket_path, timeout=CLIENT_TIMEOUT) as client:
                for cluster in self.stable:
                    self.up(client, cluster, None)
            for worker in self.workers:
                worker.start()
            while self.tally.kills < self.kills:
                self.round()
            self.gate.stop()
            for worker in self.workers:
                worker.join(CLIENT_TIMEOUT * 3)
            self.check_all("final")
        except Exception:
            self.tally.violated("the campaign runs to its end", traceback.format_exc())
        finally:
            self.gate.stop()
            self.clean_up()
            self.tally.seconds = time.monotonic() - self.started
        return self.tally

    def round(self) -> None:
        moment = self.wait_for_a_moment()
        in_flight = sorted({w.in_flight for w in self.workers if w.in_flight})
        assert self.daemon.process is not None
        self.daemon.process.kill()
        self.daemon.wait()
        self.tally.kills += 1
        self.tally.kill_moments[moment] += 1
        self.log(f"kill {self.tally.kills} ({moment}); in flight: {', '.join(in_flight)}")
        if self.rng.random() < 0.2:
            self.kill_a_holder("while fleetd was down")
        time.sleep(self.rng.uniform(0, 0.3))
        if self.rng.random() < 0.2 and self.tally.kills < self.kills:
            self.kill_during_start_up()
        self.daemon.start(timeout=30)
        self.tally.restarts += 1
        assert self.daemon.process is not None
        self.log(f"fleetd restarted (pid {self.daemon.process.pid})")
        time.sleep(self.rng.uniform(0, 0.5))  # the workers reconnect, and go on
        self.check_all(f"after restart {self.tally.restarts}")

    def kill_during_start_up(self) -> None:
        """Start fleetd and SIGKILL it before it is ready, or just after: mid re-adoption,
        mid start-up gc, mid reconciliation of the claims."""
        daemon = self.daemon
        assert daemon.notify is not None
        notify_path = daemon.notify.getsockname()
        with open(daemon.log_path, "ab") as log:
            process = subprocess.Popen(
                FLEETD,
                env={**daemon.env, "NOTIFY_SOCKET": notify_path},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        time.sleep(self.rng.uniform(0.05, 0.6))
        process.kill()
        process.wait()
        daemon.notify.setblocking(False)  # its READY=1, if it got that far, is not the next's
        said = b""
        with suppress(BlockingIOError):
            while message := daemon.notify.recv(4096):
                said += message + b"\n"
        daemon.notify.setblocking(True)
        moment = "just after start-up" if b"READY=1" in said.split(b"\n") else "during start-up"
        self.tally.kills += 1
        self.tally.kill_moments[moment] += 1
        self.log(f"kill {self.tally.kills} ({moment})")

    def wait_for_a_moment(self) -> str:
        """Sleep until the kill: a random delay, or just after a cluster_up or a
        claim_acquire was sent (that its kill lands mid-launch, mid-delivery)."""
        mode = self.rng.choice(["random", "random", "mid-up", "mid-claim-acquire"])
        if mode == "random":
            time.sleep(self.rng.uniform(0.05, 1.5))
            return "at a random moment"
        op = "cluster_up" if mode == "mid-up" else "claim_acquire"
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if any(w.in_flight == op for w in self.workers):
                time.sleep(self.rng.uniform(0, 0.15 if op == "cluster_up" else 0.004))
                return f"just after a {op} was sent"
            time.sleep(0.001)
        return "at a random moment"

    def check_all(self, when: str) -> None:
        with self.gate.parked():
            self.log(f"checking {when}")
            with SyncClient(self.daemon.socket_path, timeout=CLIENT_TIMEOUT) as client:
                if self.rng.random() < 0.2:
                    self.kill_a_holder("while fleetd ran")
                for worker in self.workers:
                    worker.reconcile(client)
                for cluster in self.stable:
                    self.check_cluster(client, cluster)
                    self.settle(client, cluster)
                    if cluster.state == "down":  # its holder was killed: bring it back
                        self.up(client, cluster, None)
                self.check_members(client)
                self.check_delivered_files(client)

    # -- clusters

    def spec(self, cluster: Cluster) -> Any:
        member = {
            "command": ["sleep", "1000000"],
            "ready": "none",
            "restart": "on-failure",
            "stop_timeout": "2s",
            "env": {MEMBER_MARK: self.run_id},
        }
        return cluster_from_dict(
            {"members": {m: member for m in cluster.members}}, name=cluster.name
        )

    def up(self, client: SyncClient, cluster: Cluster, worker: Worker | None) -> None:
        def cut() -> None:
            cluster.pending = "up"

        def do() -> Any:
            result = client.cluster_up(self.spec(cluster))
            statuses = client.member_wait(cluster.keys(), timeout=CLIENT_TIMEOUT)
            return result, statuses

        if worker is None:
            result, statuses = do()
            self.tally.ack("cluster_up")
        else:
            result, statuses = worker.call("cluster_up", do, cut)
        if self.tally.check(
            "a cluster that is down comes up",
            result.outcome == "acquired",
            lambda: f"{cluster.name}: answered {result.outcome}",
        ):
            self.now_up(cluster, statuses)

    def now_up(self, cluster: Cluster, statuses: list[MemberStatus]) -> None:
        with self.lock:
            cluster.state, cluster.pending = "up", ""
            cluster.pids = {s.name: (s.pid or 0, s.restarts) for s in statuses}
            cluster.holder = statuses[0].holder_pid or 0
        self.log(f"{cluster.name} is up: holder {cluster.holder}, members {cluster.pids}")

    def down(self, client: SyncClient, cluster: Cluster, worker: Worker) -> None:
        with self.lock:  # going until now_down saw it gone: a kill may also cut that short
            cluster.state = "going"
        result = worker.call(
            "cluster_down", lambda: client.cluster_down(cluster.name), lambda: None
        )
        self.tally.check(
            "a cluster that is up goes down",
            result.outcome in ("released", "already_released"),
            lambda: f"{cluster.name}: answered {result.outcome}",
        )
        self.now_down(client, cluster)

    def now_down(self, client: SyncClient, cluster: Cluster) -> None:
        statuses = client.member_status(cluster.keys())
        self.tally.check(
            "a cluster that went down runs no member",
            not any(s.running for s in statuses),
            lambda: f"{cluster.name}: {_statuses_text(statuses)}",
        )
        for member, (pid, _) in cluster.pids.items():
            self.tally.check(
                "a cluster that went down leaves no member process",
                wait_gone(pid, RESTART_GRACE),
                lambda member=member, pid=pid: f"{cluster.name}/{member} pid {pid} still runs",
            )
        with self.lock:
            cluster.state, cluster.pending, cluster.pids, cluster.holder = "down", "", {}, 0
        self.log(f"{cluster.name} is down")

    def settle(self, client: SyncClient, cluster: Cluster) -> None:
        """Resolve what a kill left unknown about `cluster` (a cut-off up, a down cut off
        halfway, a holder we killed), checking it against what either outcome allows."""
        if cluster.pending == "up":
            statuses = client.member_status(cluster.keys())
            if any(s.state in (MemberState.RUNNING, MemberState.STARTING) for s in statuses):
                self.now_up(cluster, client.member_wait(cluster.keys(), timeout=CLIENT_TIMEOUT))
            else:
                self.tally.check(
                    "a cluster whose up was cut off runs fully or not at all",
                    not any(s.running for s in statuses),
                    lambda: f"{cluster.name}: {_statuses_text(statuses)}",
                )
                with self.lock:
                    cluster.state, cluster.pending = "down", ""
        elif cluster.state == "going":  # finish the down that was cut off
            try:
                outcome = str(client.cluster_down(cluster.name).outcome)
            except Absent:  # it went down, and start-up gc collected what it left
                outcome = "absent"
            self.tally.check(
                "a cluster whose down was cut off goes down",
                outcome in ("released", "already_released", "absent"),
                lambda: f"{cluster.name}: answered {outcome}",
            )
            self.now_down(client, cluster)
        elif cluster.state == "killed":
            self.check_cluster(client, cluster)
            with self.lock:
                cluster.state, cluster.pids, cluster.holder = "down", {}, 0

    def check_cluster(self, client: SyncClient, cluster: Cluster) -> None:
        if cluster.pending or cluster.state == "going":
            return  # unknown until settled; what does run is checked by check_members
        statuses = _by_member(cluster, client.member_status(cluster.keys()))
        if cluster.state == "up":
            for member, (pid, restarts) in cluster.pids.items():
                status = statuses[member]
                self.tally.check(
                    "a running member keeps its pid, holder and restarts across fleetd restarts",
                    (status.state, status.pid, status.restarts, status.holder_pid)
                    == (MemberState.RUNNING, pid, restarts, cluster.holder),
                    lambda member=member, pid=pid, restarts=restarts, status=status: (
                        f"{cluster.name}/{member} was running as pid {pid} (holder "
                        f"{cluster.holder}, {restarts} restarts); fleetd shows "
                        f"{_status_text(status)}"
                    ),
                )
        elif cluster.state == "killed":
            deadline = time.monotonic() + RESTART_GRACE
            while any(s.running for s in statuses.values()) and time.monotonic() < deadline:
                time.sleep(0.05)
                statuses = _by_member(cluster, client.member_status(cluster.keys()))
            self.tally.check(
                "a killed holder's members are reported not running",
                not any(s.running for s in statuses.values()),
                lambda: f"{cluster.name}: {_statuses_text(list(statuses.values()))}",
            )
            for member, (pid, _) in cluster.pids.items():
                self.tally.check(
                    "a killed holder takes its members down",
                    wait_gone(pid, RESTART_GRACE),
                    lambda member=member, pid=pid: f"{cluster.name}/{member} pid {pid} survived",
                )
        else:
            self.tally.check(
                "a cluster that is down runs no member",
                not any(s.running for s in statuses.values()),
                lambda: f"{cluster.name}: {_statuses_text(list(statuses.values()))}",
            )

    def kill_a_holder(self, when: str) -> None:
        with self.lock:
            busy = {w.busy for w in self.workers if isinstance(w, ClusterWorker)}
            candidates = [
                c
                for w in self.workers
                if isinstance(w, ClusterWorker)
                for c in w.clusters
                if c.state == "up" and not c.pending and c not in busy
            ]
            candidates += [c for c in self.stable if c.state == "up" and not c.pending]
            if not candidates:
                return
            cluster = self.rng.choice(candidates)
            cluster.state = "killed"
        os.kill(cluster.holder, signal.SIGKILL)
        self.tally.holder_kills += 1
        self.log(f"killed the holder of {cluster.name} (pid {cluster.holder}) {when}")

    def check_members(self, client: SyncClient) -> None:
        """Every member process alive has a live holder as its parent, and is a member fleetd
        reports running (with that pid and holder); every member fleetd reports running is
        alive. What a kill just set going gets RESTART_GRACE to settle: members dying after
        their holder, fleetd seeing the holder exit."""
        deadline = time.monotonic() + RESTART_GRACE
        while True:
            reported = {s.pid: s for s in client.member_status() if s.running and s.pid}
            alive = marked_processes(MEMBER_MARK, self.run_id)
            orphans = {pid: ppid for pid, ppid in alive.items() if not _is_holder(ppid)}
            unreported = {pid for pid in alive if pid not in reported}
            dead = [status for pid, status in reported.items() if pid not in alive]
            if not (orphans or unreported or dead) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        for pid, ppid in alive.items():
            self.tally.check(
                "every member process has a live holder",
                pid not in orphans,
                lambda pid=pid, ppid=ppid: f"member pid {pid}: its parent {ppid} is no holder",
            )
            self.tally.check(
                "every member process is one fleetd reports running",
                pid in reported and reported[pid].holder_pid == ppid,
                lambda pid=pid, ppid=ppid: (
                    f"member pid {pid} (parent {ppid}) runs; fleetd "
                    f"reports {_status_text(reported[pid]) if pid in reported else 'nothing'}"
                ),
            )
        for pid, status in reported.items():
            self.tally.check(
                "every member fleetd reports running is alive",
                pid in alive,
                lambda status=status: f"{_status_text(status)}: no such process",
            )

    def check_delivered_files(self, client: SyncClient) -> None:
        """Every delivered file belongs to a held claim and holds its content in full; the
        staging directory holds, once idle, only the files this fleetd keeps for reuse (at
        most POOL, of at most POOLED bytes: fleetd.delivery): start-up removed what a crash
        left there, and a file set aside beyond them is unlinked within STAGING_IDLE."""
        held = {
            info.path: info
            for kind in ("prompt_inbox", "file")
            for info in client.claim_list(kind).claims
            if info.state == "held"
        }
        state = self.daemon.state_dir
        for top in ("inbox", "files"):
            for directory, _, files in os.walk(os.path.join(state, top)):
                for name in files:
                    path = os.path.join(directory, name)
                    content = _read(path)
                    info = held.get(path)
                    self.tally.check(
                        "every delivered file is a held claim's, whole",
                        info is not None
                        and content is not None
                        and (_sha(content), len(content)) == (info.sha256, info.size),
                        lambda path=path, info=info, content=content: (
                            f"{path} holds {_describe(content)}; its claim: {_claim_text(info)}"
                        ),
                    )
        staging = os.path.join(state, "claims-staging")
        assert self.daemon.process is not None
        stray = _stray_in(staging, f"{self.daemon.process.pid}-")
        self.tally.check(
            "staging holds only this fleetd's files kept for reuse",
            not stray,
            lambda: f"{staging} holds {stray}",
        )

    # -- the end

    def clean_up(self) -> None:
        """Every holder down (they outlive fleetd), fleetd stopped, the temp dir removed."""
        with suppress(Exception):
            if self.daemon.process is not None and self.daemon.process.poll() is None:
                with SyncClient(self.daemon.socket_path, timeout=CLIENT_TIMEOUT) as client:
                    for status in {s.cluster for s in client.member_status()}:
                        with suppress(FleetError):
                            client.cluster_down(status)
        kill_holders(self.daemon)
        self.daemon.close()
        for pid in marked_processes(CAMPAIGN_MARK, self.run_id):  # a holder no pidfile named
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.keep and self.tally.violations:
            self.kept = self.root  # chaos.log, fleetd.log, c/CLUSTER/holder.log
        else:
            shutil.rmtree(self.root, ignore_errors=True)


def _by_member(cluster: Cluster, statuses: list[MemberStatus]) -> dict[str, MemberStatus]:
    """Statuses by member name, as asked (an absent one is named as it was asked: C/NAME)."""
    return dict(zip(cluster.members, statuses, strict=True))


def _status_text(status: MemberStatus) -> str:
    return (
        f"{status.cluster}/{status.name} {status.state} pid {status.pid} holder "
        f"{status.holder_pid} restarts {status.restarts}"
    )


def _statuses_text(statuses: list[MemberStatus]) -> str:
    return "; ".join(_status_text(s) for s in statuses)


def _is_holder(pid: int) -> bool:
    """By its name (a holder forked from the template has the template's command line)."""
    if process_name(pid) != HOLDER_NAME:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            zombie = f.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except OSError:
        return False
    return not zombie


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.chaos", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--kills", type=int, default=24, help="fleetd SIGKILLs (default 24)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    parser.add_argument("--json", default=None, help="also write the tally as JSON here")
    parser.add_argument("--verbose", action="store_true", help="narrate each kill and check")
    parser.add_argument(
        "--keep", action="store_true", help="on a violation, keep the temp dir and its logs"
    )
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    campaign = Campaign(args.kills, seed, verbose=args.verbose, keep=args.keep)
    signal.signal(signal.SIGTERM, _stopped)  # `timeout make chaos`: clean up, as on Ctrl-C
    tally = campaign.run()
    print(tally.summary(), flush=True)
    if campaign.kept:
        print(f"  kept             {campaign.kept} (chaos.log, fleetd.log, c/*/holder.log)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(tally.as_json(), f, indent=2)
    return 1 if tally.violations else 0


def _stopped(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


STAGING_IDLE = 2.0
"""Seconds fleetd may take, idle, to unlink the files set aside in staging beyond its pool."""


def _stray_in(staging: str, ours: str) -> list[str]:
    """What `staging` holds, once fleetd had STAGING_IDLE seconds, beyond the pool of the
    fleetd whose files' names start with `ours`."""
    deadline = time.monotonic() + STAGING_IDLE
    while True:
        names = os.listdir(staging) if os.path.isdir(staging) else []
        stray = [name for name in names if not _pooled(staging, name, ours)]
        if len(names) > POOL:
            stray.append(f"{len(names)} files, over the pool's {POOL}")
        if not stray or time.monotonic() > deadline:
            return stray
        time.sleep(0.05)


def _pooled(staging: str, name: str, ours: str) -> bool:
    try:
        size = os.lstat(os.path.join(staging, name)).st_size
    except FileNotFoundError:
        return True  # reused meanwhile
    return name.startswith(ours) and size <= POOLED


if __name__ == "__main__":
    sys.exit(main())
