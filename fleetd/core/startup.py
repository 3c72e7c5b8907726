"""What the fleetd programs do as they start: the daemon (fleetd.cli), the holder
(fleetd.holder.program) and the holder template (fleetd.holder.template)."""

import contextlib
import ctypes
import importlib
import resource
import sys
from typing import TypeVar

E = TypeVar("E", bound=BaseException)

LOADED_AS_ANYIO_RUNS = ("anyio._backends._asyncio", "anyio._core._signals", "uvloop")
"""What a program on anyio and uvloop loads only once anyio.run runs: anyio's asyncio backend,
its signal receiver, and uvloop."""


def load_what_anyio_loads_as_it_runs() -> None:
    """Load LOADED_AS_ANYIO_RUNS now, before a fork, so that the parent and child share it
    (the daemon and the template it forks; the template and its holders)."""
    for module in LOADED_AS_ANYIO_RUNS:
        importlib.import_module(module)


def leave_rich_out() -> None:
    """Keep rich (and the pygments it loads) out of this process. structlog imports it when
    it is installed (fleetctl top needs it) for tracebacks our plain log lines never render;
    it costs each fleetd process 3.4 MiB and seventy modules. Called before structlog is
    first imported, importing rich then fails as it would were rich not installed."""
    sys.modules.setdefault("rich", None)  # type: ignore[arg-type]


MEMBER_NOFILE_ENV = "FLEET_MEMBER_NOFILE"
"""In a detached holder's environment: fleetd's soft open-file limit as it started, which its
members get back (fleetd.holder.runenv)."""


def raise_fd_limit() -> int:
    """Use the whole hard limit of open files: fleetd holds a socket per client and per
    holder, and a holder a socket, two pipes and two log files per member. Returns the soft
    limit it was, for the members (which are not to inherit ours)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return soft


def leaf_errors(error: E | BaseExceptionGroup[E]) -> list[E]:
    """The errors inside a (possibly nested) exception group, or `error` itself: a program
    that fails to start reports each on a line of its own."""
    if not isinstance(error, BaseExceptionGroup):
        return [error]
    found: list[E] = []
    for inner in error.exceptions:
        found.extend(leaf_errors(inner))
    return found


def name_process(name: str) -> None:
    """What `ps -e`, top and pgrep show for this process (its comm: 15 bytes at most). A holder
    forked from the template (fleetd.holder.template) has the template's command line, and an
    exec'd one is "python3" there: both are "fleetd-holder", the template "fleetd-template"."""
    with contextlib.suppress(OSError), open("/proc/self/comm", "w") as comm:
        comm.write(name)


def return_free_memory() -> None:
    """Give the C heap's free pages back to the kernel (glibc's malloc_trim; elsewhere
    nothing). What start-up freed (imports, a cluster's spec decoded, its members spawned)
    malloc keeps for later, and a process's memory counts it until then; in the template,
    every holder forked would share it, and copy what it writes of it."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)
