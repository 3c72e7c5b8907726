"""Under load: many concurrent clients against one fleetd supervising hundreds of members.

    python -m tests.load [--clients 200] [--members 500] [--seconds 30] [--processes 2]
                         [--json PATH]

One fleetd (tests/processes.Fleetd, in a short temp dir) and one detached cluster `load` of
`--members` cheap members (`sleep`, ready "none"). The clients are `fleetctl.Client`s, each
its own connection: `--processes` worker processes (spawned) each run clients/processes of
them as tasks on one uvloop event loop; every client connects first, then all start together
and run for `--seconds`, each an independent loop of operations:

    status            member_status of one random member (expected: running)
    status_all        member_status of every member (expected: all running)
    lease_acquire     one of its own two leases, when it holds it not (expected: acquired)
    lease_heartbeat   one it holds, with its token (expected: renewed)
    lease_release     one it holds, with its token (expected: released)
    claim_acquire     one of its own two claims (a file, a prompt_inbox), random content
    claim_inspect     one it holds (expected: ok, its owner and sha256)
    claim_release     one it holds (expected: released)

Any exception and any unexpected answer is an error. Afterwards every acknowledged write is
checked from a fresh connection: each lease a client holds is held with its token, each it
released is not; each claim it holds is held with its owner and sha256 and its file holds
exactly its content, each it released is not held and its file is gone; every member still
runs with the pid it had before the load. It prints throughput and p50/p99 per op as a table
(and JSON with --json), and exits 1 on any error or lost write.
"""

import argparse
import asyncio
import dataclasses
import hashlib
import json
import multiprocessing
import os
import random
import shutil
import sys
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

OPS = (
    "status",
    "status_all",
    "lease_acquire",
    "lease_heartbeat",
    "lease_release",
    "claim_acquire",
    "claim_inspect",
    "claim_release",
)
CLUSTER = "load"
LEASE_TTL = 600.0
CLIENT_TIMEOUT = 60.0
ERRORS_KEPT = 20


def member_name(index: int) -> str:
    return f"m{index:04d}"


# -- one worker process: its share of the clients on one event loop --------------------------


@dataclass
class Share:
    """What one worker process reports back."""

    latencies: dict[str, list[int]] = field(default_factory=dict)
    """Microseconds, per op."""
    errors: int = 0
    error_examples: list[str] = field(default_factory=list)
    leases: dict[str, tuple[str, int]] = field(default_factory=dict)
    """name -> (owner, token held), token 0 when released (acknowledged)."""
    claims: dict[str, tuple[str, str, str, str, int]] = field(default_factory=dict)
    """"kind/key" -> (owner, sha256 or "" when released, path, content, revision)."""
    started: float = 0.0
    ended: float = 0.0


class Loader:
    """One client's loop: its own leases and claims, so that no two clients contend."""

    def __init__(self, index: int, share: Share, members: int, rng: random.Random) -> None:
        self.index = index
        self.share = share
        self.members = members
        self.rng = rng
        self.owner = f"loader-{index}"
        self.leases = {f"load/c{index}-{k}": 0 for k in range(2)}
        self.claims: dict[tuple[str, str], tuple[str, bytes, str, int]] = {}
        """(kind, key) -> (sha256, content, path, revision) while held."""
        self.keys = [("file", f"c{index}-0"), ("prompt_inbox", f"c{index}-1")]
        self.released_paths: dict[tuple[str, str], str] = {}
        """(kind, key) -> where its file was, once released."""

    def error(self, what: str) -> None:
        self.share.errors += 1
        if len(self.share.error_examples) < ERRORS_KEPT:
            self.share.error_examples.append(f"client {self.index}: {what}")

    async def run(self, client: Any, start: float, deadline: float) -> None:
        await asyncio.sleep(max(0.0, start - time.time()))
        clock = time.perf_counter
        while time.time() < deadline:
            op, call, verdict = self.next_op(client)
            began = clock()
            try:
                result = await call()
            except Exception as exc:
                self.error(f"{op}: {exc!r}")
                continue
            self.share.latencies[op].append(round((clock() - began) * 1e6))
            problem = verdict(result)
            if problem:
                self.error(f"{op}: {problem}")

    def next_op(self, client: Any) -> tuple[str, Any, Any]:
        """(op, a coroutine function that does it, a function of its result: a problem or
        ""), and the model updated as the answer requires."""
        category = self.rng.choices(("status", "status_all", "lease", "claim"), (30, 2, 34, 34))[0]
        if category == "status":
            name = f"{CLUSTER}/{member_name(self.rng.randrange(self.members))}"

            def one(result: Any) -> str:
                ok = len(result) == 1 and result[0].state == "running"
                return "" if ok else f"{name}: {result}"

            return "status", lambda: client.member_status([name]), one
        if category == "status_all":

            def every(result: Any) -> str:
                running = sum(1 for s in result if s.cluster == CLUSTER and s.state == "running")
                return "" if running == self.members else f"{running} of {self.members} running"

            return "status_all", client.member_status, every
        if category == "lease":
            return self.lease_op(client)
        return self.claim_op(client)

    def lease_op(self, client: Any) -> tuple[str, Any, Any]:
        name = self.rng.choice(list(self.leases))
        token = self.leases[name]
        if not token:

            def acquired(result: Any) -> str:
                if result.outcome != "acquired" or result.lease is None:
                    return f"{name}: {result.outcome} {result.message}"
                self.leases[name] = result.lease.token
                return ""

            return (
                "lease_acquire",
                lambda: client.lease_acquire(name, self.owner, LEASE_TTL),
                acquired,
            )
        if self.rng.random() < 0.6:

            def renewed(result: Any) -> str:
                return "" if result.outcome == "renewed" else f"{name}: {result.outcome}"

            return (
                "lease_heartbeat",
                lambda: client.lease_heartbeat(name, self.owner, token),
                renewed,
            )

        def released(result: Any) -> str:
            if result.outcome != "released":
                return f"{name}: {result.outcome}"
            self.leases[name] = 0
            return ""

        return "lease_release", lambda: client.lease_release(name, self.owner, token), released

    def claim_op(self, client: Any) -> tuple[str, Any, Any]:
        kind, key = self.rng.choice(self.keys)
        held = self.claims.get((kind, key))
        if held is None:
            content = self.content()
            digest = hashlib.sha256(content).hexdigest()

            def acquired(result: Any) -> str:
                if result.outcome != "acquired" or result.claim is None:
                    return f"{kind}/{key}: {result.outcome} {result.message}"
                claim = result.claim
                self.claims[(kind, key)] = (digest, content, claim.path, claim.revision)
                return ""

            return (
                "claim_acquire",
                lambda: client.claim_acquire(kind, key, self.owner, content),
                acquired,
            )
        digest, _, _, revision = held
        if self.rng.random() < 0.5:

            def inspected(result: Any) -> str:
                claim = result.claim
                if result.outcome != "ok" or claim is None:
                    return f"{kind}/{key}: {result.outcome}"
                shown = (claim.state, claim.owner, claim.sha256, claim.revision)
                expected = ("held", self.owner, digest, revision)
                return "" if shown == expected else f"{kind}/{key}: {shown} != {expected}"

            return "claim_inspect", lambda: client.claim_inspect(kind, key), inspected

        def released(result: Any) -> str:
            if result.outcome != "released":
                return f"{kind}/{key}: {result.outcome}"
            self.claims.pop((kind, key))
            self.released_paths[(kind, key)] = held[2]
            return ""

        return "claim_release", lambda: client.claim_release(kind, key, self.owner), released

    def content(self) -> bytes:
        size = self.rng.randrange(64, 2048)
        return bytes(self.rng.choice(b"abcdefghij \n") for _ in range(size))

    def report(self) -> None:
        for name, token in self.leases.items():
            self.share.leases[name] = (self.owner, token)
        for kind, key in self.keys:
            held = self.claims.get((kind, key))
            if held is not None:
                digest, content, path, revision = held
                self.share.claims[f"{kind}/{key}"] = (
                    self.owner,
                    digest,
                    path,
                    content.decode(),
                    revision,
                )
            elif (kind, key) in self.released_paths:
                path = self.released_paths[(kind, key)]
                self.share.claims[f"{kind}/{key}"] = (self.owner, "", path, "", 0)


async def _share_of_clients(
    *, socket_path: str, indices: list[int], members: int, seed: int, ready: Any, go: Any
) -> Share:
    import fleetctl

    share = Share(latencies={op: [] for op in OPS})
    rng = random.Random(seed)
    clients = []
    try:
        for _ in indices:
            client = fleetctl.Client(socket_path, timeout=CLIENT_TIMEOUT)
            await client.connect()
            clients.append(client)
        loaders = [Loader(i, share, members, random.Random(rng.random())) for i in indices]
        ready.put(len(clients))
        start, seconds = await asyncio.to_thread(go.get)
        share.started = start
        await asyncio.gather(
            *(
                loader.run(client, start, start + seconds)
                for loader, client in zip(loaders, clients, strict=True)
            )
        )
        share.ended = time.time()
        for loader in loaders:
            loader.report()
    finally:
        for client in clients:
            await client.aclose()
    return share


def _worker(out: Any, **assignment: Any) -> None:
    """A worker process: its clients on one uvloop loop; its Share (or its traceback) to
    `out`."""
    import uvloop

    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            share = runner.run(_share_of_clients(**assignment))
        out.put(("ok", dataclasses.asdict(share)))  # plain data: no class to find by name
    except BaseException:
        assignment["ready"].put(0)
        out.put(("failed", traceback.format_exc()))


# -- the run -------------------------------------------------------------------------------


@dataclass
class Report:
    clients: int
    members: int
    processes: int
    seconds: float
    counts: dict[str, int] = field(default_factory=dict)
    p50_ms: dict[str, float] = field(default_factory=dict)
    p99_ms: dict[str, float] = field(default_factory=dict)
    max_ms: dict[str, float] = field(default_factory=dict)
    ops_per_second: dict[str, float] = field(default_factory=dict)
    errors: int = 0
    error_examples: list[str] = field(default_factory=list)
    checked: Counter[str] = field(default_factory=Counter)
    lost: list[str] = field(default_factory=list)

    def table(self) -> str:
        lines = [
            f"load: {self.clients} clients ({self.processes} processes, each one uvloop loop "
            f"of {self.clients // self.processes} fleetctl.Client connections), "
            f"{self.members} members, {self.seconds:.1f} s",
            f"  {'op':<16}{'count':>9}{'ops/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}",
        ]
        for op in (*OPS, "all"):
            if not self.counts.get(op):
                continue
            lines.append(
                f"  {op:<16}{self.counts[op]:>9}{self.ops_per_second[op]:>10.0f}"
                f"{self.p50_ms[op]:>9.2f}{self.p99_ms[op]:>9.2f}{self.max_ms[op]:>9.1f}"
            )
        checked = ", ".join(f"{what} {n}" for what, n in sorted(self.checked.items()))
        lines.append(
            f"  errors {self.errors}; lost acknowledged writes {len(self.lost)} ({checked})"
        )
        lines += [f"    - error: {e}" for e in self.error_examples]
        lines += [f"    - lost: {e}" for e in self.lost]
        return "\n".join(lines)

    def as_json(self) -> dict[str, Any]:
        return {
            "clients": self.clients,
            "members": self.members,
            "processes": self.processes,
            "seconds": round(self.seconds, 2),
            "ops": {
                op: {
                    "count": self.counts[op],
                    "ops_per_second": round(self.ops_per_second[op], 1),
                    "p50_ms": round(self.p50_ms[op], 3),
                    "p99_ms": round(self.p99_ms[op], 3),
                    "max_ms": round(self.max_ms[op], 3),
                }
                for op in (*OPS, "all")
                if self.counts.get(op)
            },
            "errors": self.errors,
            "error_examples": self.error_examples,
            "checked": dict(self.checked),
            "lost": self.lost,
        }


def percentile(ordered: list[int], fraction: float) -> float:
    index = min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))
    return ordered[index] / 1000.0


def run(clients: int, members: int, seconds: float, processes: int, seed: int) -> Report:
    from fleetctl.sync import SyncClient
    from protocol.definitions import cluster_from_dict
    from tests.processes import Fleetd, kill_holders, short_tempdir

    report = Report(clients, members, processes, seconds)
    root = short_tempdir()
    daemon = Fleetd(root)
    context = multiprocessing.get_context("spawn")
    workers: list[Any] = []
    try:
        daemon.start()
        member = {"command": ["sleep", "1000000"], "ready": "none", "start_timeout": "120s"}
        spec = cluster_from_dict(
            {"members": {member_name(i): member for i in range(members)}}, name=CLUSTER
        )
        with SyncClient(daemon.socket_path, timeout=CLIENT_TIMEOUT) as client:
            client.cluster_up(spec)
            names = [f"{CLUSTER}/{member_name(i)}" for i in range(members)]
            before = {s.name: s.pid for s in client.member_wait(names, timeout=180)}

        ready, go, out = context.Queue(), context.Queue(), context.Queue()
        rng = random.Random(seed)
        for p in range(processes):
            indices = list(range(p, clients, processes))
            assignment = {
                "socket_path": daemon.socket_path,
                "indices": indices,
                "members": members,
                "seed": rng.randrange(2**32),
                "ready": ready,
                "go": go,
            }
            worker = context.Process(target=_worker, args=(out,), kwargs=assignment)
            worker.start()
            workers.append(worker)
        connected = sum(ready.get(timeout=120) for _ in workers)
        if connected != clients:
            raise RuntimeError(f"only {connected} of {clients} clients connected")
        start = time.time() + 0.2
        for _ in workers:
            go.put((start, seconds))
        shares = []
        for _ in workers:
            status, share = out.get(timeout=seconds + 300)
            if status != "ok":
                raise RuntimeError(f"a worker failed:\n{share}")
            shares.append(Share(**share))
        for worker in workers:
            worker.join(30)
        _tally(report, shares)
        with SyncClient(daemon.socket_path, timeout=CLIENT_TIMEOUT) as client:
            _check_writes(report, client, shares, before)
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.kill()
        kill_holders(daemon)
        daemon.close()
        shutil.rmtree(root, ignore_errors=True)
    return report


def _tally(report: Report, shares: list[Any]) -> None:
    window = max(s.ended for s in shares) - min(s.started for s in shares)
    report.seconds = window
    every: list[int] = []
    for op in OPS:
        samples = sorted(x for s in shares for x in s.latencies[op])
        every += samples
        _figures(report, op, samples, window)
    _figures(report, "all", sorted(every), window)
    report.errors = sum(s.errors for s in shares)
    report.error_examples = [e for s in shares for e in s.error_examples][:ERRORS_KEPT]


def _figures(report: Report, op: str, samples: list[int], window: float) -> None:
    report.counts[op] = len(samples)
    if samples:
        report.ops_per_second[op] = len(samples) / window
        report.p50_ms[op] = percentile(samples, 0.50)
        report.p99_ms[op] = percentile(samples, 0.99)
        report.max_ms[op] = samples[-1] / 1000.0


def _check_writes(report: Report, client: Any, shares: list[Any], before: dict[str, Any]) -> None:
    """Every acknowledged write is there, read back over a fresh connection."""
    leases = {info.name: info for info in client.lease_list("load/").leases}
    for share in shares:
        for name, (owner, token) in share.leases.items():
            info = leases.get(name)
            report.checked["leases"] += 1
            if token and (
                info is None or (info.state, info.owner, info.token) != ("held", owner, token)
            ):
                report.lost.append(f"lease {name} acknowledged held with token {token}: {info}")
            if not token and info is not None and info.state == "held":
                report.lost.append(f"lease {name} acknowledged released: {info}")
    claims = {
        f"{info.kind}/{info.key}": info
        for kind in ("file", "prompt_inbox")
        for info in client.claim_list(kind).claims
    }
    for share in shares:
        for name, (owner, digest, path, content, revision) in share.claims.items():
            info = claims.get(name)
            report.checked["claims"] += 1
            if digest:
                shown = (
                    None if info is None else (info.state, info.owner, info.sha256, info.revision)
                )
                if shown != ("held", owner, digest, revision):
                    report.lost.append(f"claim {name} acknowledged held ({digest}): {info}")
                if _read(path) != content.encode():
                    report.lost.append(f"claim {name}: {path} does not hold its content")
            else:
                if info is not None and info.state == "held":
                    report.lost.append(f"claim {name} acknowledged released: {info}")
                if os.path.exists(path):
                    report.lost.append(f"claim {name} released: {path} still exists")
    now = {s.name: s for s in client.member_status() if s.cluster == CLUSTER}
    for name, pid in before.items():
        report.checked["members"] += 1
        status = now.get(name)
        if status is None or (status.state, status.pid) != ("running", pid):
            report.lost.append(f"member {name} ran as pid {pid}: now {status}")


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.load", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--members", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--processes", type=int, default=2, help="worker processes (loops)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--json", default=None, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    processes = max(1, min(args.processes, args.clients))
    report = run(args.clients, args.members, args.seconds, processes, seed)
    print(report.table(), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report.as_json(), f, indent=2)
    return 1 if report.errors or report.lost else 0


if __name__ == "__main__":
    sys.exit(main())
