"""A member's lifecycle as a pure state machine: events in, the new state and actions out.

`step(lifecycle, event)` decides; `fleetd.holder.members.Member` feeds it the events the world
produces (a spawn, an exit, a timer, a stop request) and carries out the actions it returns, in
order. Nothing here does I/O or reads a clock: times come in the events, randomness through
`Rules.random`. As in h11's `_state.py`, every legal transition is in one table, `TRANSITIONS`;
an event a phase does not list is ignored (the lifecycle and no action change), which is how
late news is absorbed: a readiness signal after a stop, a probe's answer after a timeout.

    NEW ──Begin──▶ PREPARING ──Exited──▶ CLEANING ──(prepare ok)──▶ STARTING
     └──Begin (no prepare)─────────────────────────────────────────▶ STARTING
    STARTING ──Ready──▶ RUNNING          STARTING ──StartTimedOut──▶ TERMINATING
    STARTING, RUNNING ──Exited──▶ CLEANING ──LeftoversEnded──▶ decided by `then`:
        SPAWN: STARTING   DECIDE: restart now (STARTING), later (BACKOFF) or never (DOWN)
        REST: DOWN        FAIL: FAILED        STOP: STOPPED
    BACKOFF ──BackoffElapsed──▶ STARTING
    any live phase ──StopRequested──▶ TERMINATING ──Exited──▶ ENDING_OTHERS ──▶ CLEANING
                       TERMINATING ──StopTimedOut──▶ KILLING ──Exited──▶ CLEANING
    BACKOFF, DOWN, FAILED ──StopRequested──▶ CLEANING (then STOP) ──▶ STOPPED

Every stop goes through CLEANING, where whatever is left of the member is killed before it
is reported stopped. A supervision failure (a bug, a refused directory) ends the process if
one lives and leaves the member FAILED, reported `error`, until it is stopped.
"""

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from enum import Enum, auto
from signal import Signals
from typing import Any, Final, get_args

from fleetd.holder.backoff import Backoff, Exit, plan_restart
from protocol.members import MemberState


class Phase(Enum):
    NEW = auto()
    """Not supervised yet."""
    PREPARING = auto()
    """The one-time `prepare` command runs."""
    STARTING = auto()
    """The command is spawned (or being spawned), not ready yet."""
    RUNNING = auto()
    """The command runs and was ready."""
    TERMINATING = auto()
    """The stop signal went to every process of the member; stop_timeout is armed."""
    KILLING = auto()
    """stop_timeout passed with the main process alive: SIGKILL went to its group."""
    ENDING_OTHERS = auto()
    """The main process exited during a stop: its other processes get the rest of
    stop_timeout to end by themselves."""
    CLEANING = auto()
    """The main process is gone: what is left of the member is being killed; `then` says
    what follows."""
    BACKOFF = auto()
    """Waiting to restart (restart policy and backoff)."""
    DOWN = auto()
    """Will not run again (exited and not restarted, or its prepare failed) until stopped."""
    FAILED = auto()
    """Its supervision failed; stays so until stopped."""
    STOPPED = auto()
    """Final: every process of it ended; output drained by the shell."""


class Then(Enum):
    """What follows CLEANING (and so the terminating phases that lead to it)."""

    SPAWN = auto()
    """The prepare succeeded: spawn the command."""
    DECIDE = auto()
    """A run of the command ended: restart it or not, per policy and backoff."""
    REST = auto()
    """The prepare failed: DOWN, with `why` as the error."""
    FAIL = auto()
    """The supervision failed: FAILED, with `why` as the error."""
    STOP = auto()
    """A stop was requested: STOPPED."""


class Action(Enum):
    """What the shell must do, in the order given. Parameters come from the lifecycle
    (`state`, `error`, `delay`) and its rules."""

    PUBLISH = auto()
    """The status (state, error) changed: tell the holder."""
    NOTE_RESTART = auto()
    """`restarts` grew: say so (the status changed; the next PUBLISH follows soon)."""
    SPAWN_PREPARE = auto()
    """Spawn the prepare command, then feed Spawned or SpawnFailed at once."""
    SPAWN = auto()
    """Spawn the command, then feed Spawned or SpawnFailed at once. Always last."""
    WATCH_READINESS = auto()
    """Probe a tcp or unix readiness until it answers (Ready); notify and log come alone."""
    ARM_START_TIMER = auto()
    """StartTimedOut after rules.start_timeout (replacing any armed timer)."""
    ARM_STOP_TIMER = auto()
    """StopTimedOut after rules.stop_timeout."""
    ARM_BACKOFF_TIMER = auto()
    """BackoffElapsed after `delay`."""
    CANCEL_TIMER = auto()
    CANCEL_WATCH = auto()
    """End the side job running, if any (readiness probe, waits on other processes)."""
    SIGNAL_STOP = auto()
    """stop_signal (then SIGCONT) to the main process's group and every other process."""
    KILL_GROUP = auto()
    """The main process exited by itself: SIGKILL its group at once."""
    KILL = auto()
    """stop_timeout passed with the main process alive: SIGKILL its group (a warning)."""
    AWAIT_OTHERS = auto()
    """Side job: until every other process of the member is gone, then OthersExited."""
    END_LEFTOVERS = auto()
    """Side job: SIGKILL what is left of the member, count what lingers, LeftoversEnded."""
    END_STRAGGLERS = auto()
    """END_LEFTOVERS after stop_timeout passed with other processes alive (a warning)."""
    WATCH_LINGERING = auto()
    """Side job: until the processes that would not die are gone (lingering back to 0)."""
    FINISH = auto()
    """Drain the output, close everything, report the final state."""


Actions = tuple[Action, ...]


@dataclass(frozen=True, slots=True)
class Rules:
    """A member's fixed settings, as the lifecycle needs them."""

    restart: str
    start_timeout: float
    stop_timeout: float
    prepare: bool
    """It has a prepare command."""
    ready_at_spawn: bool
    """Its readiness is `none`."""
    backoff: Backoff
    random: Callable[[], float] = random.random


@dataclass(frozen=True, slots=True)
class Lifecycle:
    """Where a member is, and what its status reports (`state`, `error`, `restarts`)."""

    rules: Rules
    phase: Phase = Phase.NEW
    state: MemberState = MemberState.STARTING
    error: str = ""
    restarts: int = 0
    streak: int = 0
    """Restarts of the current crash streak (fleetd.holder.backoff)."""
    live: bool = False
    """A process of ours (prepare or command) runs: between Spawned and Exited."""
    ready: bool = False
    """The current run was ready."""
    spawned_at: float = 0.0
    then: Then = Then.DECIDE
    failed: bool = False
    """How the last run ended, for Then.DECIDE."""
    ran_for: float = 0.0
    why: str = ""
    """The last run's end in words, or the error that REST and FAIL report."""
    delay: float = 0.0
    """Seconds of the backoff armed."""


# --- events -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Begin:
    """Supervision begins (the member's directory is open)."""


@dataclass(frozen=True, slots=True)
class Spawned:
    now: float


@dataclass(frozen=True, slots=True)
class SpawnFailed:
    reason: str


@dataclass(frozen=True, slots=True)
class Ready:
    """The readiness check passed (probe, sd_notify READY=1, a log line)."""


@dataclass(frozen=True, slots=True)
class StartTimedOut:
    pass


@dataclass(frozen=True, slots=True)
class Exited:
    """The main process (prepare or command) exited: `code`, negative for a signal."""

    code: int
    now: float


@dataclass(frozen=True, slots=True)
class StopRequested:
    pass


@dataclass(frozen=True, slots=True)
class StopTimedOut:
    pass


@dataclass(frozen=True, slots=True)
class OthersExited:
    """Every other process of the member is gone (AWAIT_OTHERS)."""


@dataclass(frozen=True, slots=True)
class LeftoversEnded:
    """END_LEFTOVERS (or END_STRAGGLERS) is done."""


@dataclass(frozen=True, slots=True)
class BackoffElapsed:
    pass


@dataclass(frozen=True, slots=True)
class SupervisionFailed:
    """Carrying out an action, or a side job, raised: a bug, or the member's directory
    refused."""

    reason: str


Event = (
    Begin
    | Spawned
    | SpawnFailed
    | Ready
    | StartTimedOut
    | Exited
    | StopRequested
    | StopTimedOut
    | OthersExited
    | LeftoversEnded
    | BackoffElapsed
    | SupervisionFailed
)
EVENTS: Final[tuple[type, ...]] = get_args(Event)
"""Every event type, for whoever walks the table."""

Step = tuple[Lifecycle, Actions]


def describe_exit(exit_code: int) -> str:
    if exit_code < 0:
        try:
            name = Signals(-exit_code).name
        except ValueError:
            name = f"signal {-exit_code}"
        return f"killed by {name}"
    return f"exited with code {exit_code}"


# --- transitions --------------------------------------------------------------------------
# Action tuples are built once: a step allocates the new lifecycle and nothing else.

_TERMINATE: Final = (
    Action.CANCEL_TIMER,
    Action.CANCEL_WATCH,
    Action.ARM_STOP_TIMER,  # before the signal: a stop that fails half-way still times out
    Action.SIGNAL_STOP,
)
_END_NOW: Final = (Action.CANCEL_TIMER, Action.CANCEL_WATCH, Action.END_LEFTOVERS)
_EXITED: Final = (Action.CANCEL_TIMER, Action.CANCEL_WATCH, Action.KILL_GROUP, Action.END_LEFTOVERS)
_AWAIT_READINESS: Final = (Action.PUBLISH, Action.WATCH_READINESS, Action.ARM_START_TIMER)
_START_TIMED_OUT: Final = (
    Action.CANCEL_WATCH,
    Action.PUBLISH,
    Action.ARM_STOP_TIMER,
    Action.SIGNAL_STOP,
)


def _begin(lc: Lifecycle, event: Begin) -> Step:
    if lc.rules.prepare:
        preparing = replace(lc, phase=Phase.PREPARING, state=MemberState.PREPARING)
        return preparing, (Action.PUBLISH, Action.SPAWN_PREPARE)
    return replace(lc, phase=Phase.STARTING), (Action.SPAWN,)


def _prepare_spawned(lc: Lifecycle, event: Spawned) -> Step:
    return replace(lc, live=True), ()


def _prepare_not_spawned(lc: Lifecycle, event: SpawnFailed) -> Step:
    return _rest(lc, f"cannot run prepare: {event.reason}")


def _prepare_exited(lc: Lifecycle, event: Exited) -> Step:
    then, why = Then.SPAWN, ""
    if event.code != 0:
        then, why = Then.REST, f"prepare {describe_exit(event.code)}"
    cleaning = replace(lc, phase=Phase.CLEANING, live=False, then=then, why=why)
    return cleaning, (Action.KILL_GROUP, Action.END_LEFTOVERS)


def _spawned(lc: Lifecycle, event: Spawned) -> Step:
    if lc.rules.ready_at_spawn:
        running = replace(
            lc,
            phase=Phase.RUNNING,
            state=MemberState.RUNNING,
            error="",
            live=True,
            ready=True,
            spawned_at=event.now,
        )
        return running, (Action.PUBLISH,)
    starting = replace(
        lc, state=MemberState.STARTING, error="", live=True, ready=False, spawned_at=event.now
    )
    return starting, _AWAIT_READINESS


def _not_spawned(lc: Lifecycle, event: SpawnFailed) -> Step:
    return _decide(replace(lc, failed=True, ran_for=0.0, why=f"cannot start: {event.reason}"))


def _ready(lc: Lifecycle, event: Ready) -> Step:
    running = replace(lc, phase=Phase.RUNNING, state=MemberState.RUNNING, error="", ready=True)
    return running, (Action.CANCEL_TIMER, Action.CANCEL_WATCH, Action.PUBLISH)


def _start_timed_out(lc: Lifecycle, event: StartTimedOut) -> Step:
    why = f"not ready within {lc.rules.start_timeout:g}s"
    terminating = replace(
        lc,
        phase=Phase.TERMINATING,
        state=MemberState.ERROR,
        error=why,
        then=Then.DECIDE,
        failed=True,
        why=why,
    )
    return terminating, _START_TIMED_OUT


def _exited(lc: Lifecycle, event: Exited) -> Step:
    why = describe_exit(event.code)
    if not lc.ready:
        why += " before it was ready"
    cleaning = replace(
        lc,
        phase=Phase.CLEANING,
        live=False,
        then=Then.DECIDE,
        failed=event.code != 0 or not lc.ready,
        ran_for=event.now - lc.spawned_at,
        why=why,
    )
    return cleaning, _EXITED


def _terminated(lc: Lifecycle, event: Exited) -> Step:
    ending = replace(lc, phase=Phase.ENDING_OTHERS, live=False, ran_for=event.now - lc.spawned_at)
    return ending, (Action.AWAIT_OTHERS,)


def _kill(lc: Lifecycle, event: StopTimedOut) -> Step:
    return replace(lc, phase=Phase.KILLING), (Action.KILL,)


def _killed(lc: Lifecycle, event: Exited) -> Step:
    cleaning = replace(lc, phase=Phase.CLEANING, live=False, ran_for=event.now - lc.spawned_at)
    return cleaning, (Action.END_LEFTOVERS,)


def _others_exited(lc: Lifecycle, event: OthersExited) -> Step:
    return replace(lc, phase=Phase.CLEANING), (Action.CANCEL_TIMER, Action.END_LEFTOVERS)


def _end_stragglers(lc: Lifecycle, event: StopTimedOut) -> Step:
    return replace(lc, phase=Phase.CLEANING), (Action.CANCEL_WATCH, Action.END_STRAGGLERS)


def _cleaned(lc: Lifecycle, event: LeftoversEnded) -> Step:
    match lc.then:
        case Then.STOP:
            return _finish(lc)
        case Then.SPAWN:
            return replace(lc, phase=Phase.STARTING), (Action.SPAWN,)
        case Then.REST:
            return _rest(lc, lc.why)
        case Then.FAIL:
            return _failed(lc, lc.why)
        case Then.DECIDE:
            return _decide(lc)


def _decide(lc: Lifecycle) -> Step:
    """Restart per policy and backoff, or stay DOWN: stopped after a clean exit, error
    after a failure."""
    exit = Exit(failed=lc.failed, ran_for=lc.ran_for)
    rules = lc.rules
    plan = plan_restart(rules.restart, exit, lc.streak, rules.backoff, rules.random)
    if plan is None:
        if lc.failed:
            return _rest(lc, lc.why)
        down = replace(lc, phase=Phase.DOWN, state=MemberState.STOPPED, error="")
        return down, (Action.PUBLISH, Action.WATCH_LINGERING)
    if plan.delay <= 0:
        return _restarted(replace(lc, streak=plan.streak))
    waiting = replace(
        lc,
        phase=Phase.BACKOFF,
        state=MemberState.ERROR if lc.failed else MemberState.STARTING,
        error=lc.why,  # the member adds when it restarts (fleetd.holder.members)
        streak=plan.streak,
        delay=plan.delay,
    )
    return waiting, (Action.PUBLISH, Action.ARM_BACKOFF_TIMER)


def _restart(lc: Lifecycle, event: BackoffElapsed) -> Step:
    return _restarted(lc)


def _restarted(lc: Lifecycle) -> Step:
    restarting = replace(lc, phase=Phase.STARTING, restarts=lc.restarts + 1)
    return restarting, (Action.NOTE_RESTART, Action.SPAWN)


def _rest(lc: Lifecycle, error: str) -> Step:
    down = replace(lc, phase=Phase.DOWN, state=MemberState.ERROR, error=error)
    return down, (Action.PUBLISH, Action.WATCH_LINGERING)


def _failed(lc: Lifecycle, error: str) -> Step:
    failed = replace(lc, phase=Phase.FAILED, state=MemberState.ERROR, error=error)
    return failed, (Action.PUBLISH,)


def _finish(lc: Lifecycle) -> Step:
    stopped = replace(lc, phase=Phase.STOPPED, state=MemberState.STOPPED, error="")
    return stopped, (Action.FINISH,)


def _stop(lc: Lifecycle, event: StopRequested) -> Step:
    """A live process is terminated; with none, what may be left of one is killed."""
    if lc.live:
        return replace(lc, phase=Phase.TERMINATING, then=Then.STOP), _TERMINATE
    return replace(lc, phase=Phase.CLEANING, then=Then.STOP), _END_NOW


def _stop_never_begun(lc: Lifecycle, event: StopRequested) -> Step:
    return _finish(lc)


def _stop_when_ended(lc: Lifecycle, event: StopRequested) -> Step:
    """A termination or a cleaning under way goes on; it then ends in STOPPED."""
    return replace(lc, then=Then.STOP), ()


def _supervision_failed(lc: Lifecycle, event: SupervisionFailed) -> Step:
    """The process, if one lives, is terminated afresh (the failure may have cut its stop
    short); then FAILED, or STOPPED if a stop was under way. A side job that failed is
    abandoned: what it would have done is left to the stop."""
    why = f"supervision failed: {event.reason}"
    then = Then.STOP if lc.then is Then.STOP and lc.phase in _ENDING else Then.FAIL
    if lc.live and lc.phase is not Phase.KILLING:
        return replace(lc, phase=Phase.TERMINATING, then=then, why=why), _TERMINATE
    if lc.live:
        return replace(lc, then=then, why=why), ()
    if then is Then.STOP:
        stopped, actions = _finish(lc)
        return stopped, (Action.CANCEL_TIMER, Action.CANCEL_WATCH, *actions)
    failed, actions = _failed(lc, why)
    return failed, (Action.CANCEL_TIMER, Action.CANCEL_WATCH, *actions)


_ENDING: Final = frozenset({Phase.TERMINATING, Phase.KILLING, Phase.ENDING_OTHERS, Phase.CLEANING})
"""Phases on the way to CLEANING's decision (`then`)."""

Handler = Callable[[Lifecycle, Any], Step]

TRANSITIONS: Final[Mapping[Phase, Mapping[type, Handler]]] = {
    Phase.NEW: {
        Begin: _begin,
        StopRequested: _stop_never_begun,
        SupervisionFailed: _supervision_failed,
    },
    Phase.PREPARING: {
        Spawned: _prepare_spawned,
        SpawnFailed: _prepare_not_spawned,
        Exited: _prepare_exited,
        StopRequested: _stop,
        SupervisionFailed: _supervision_failed,
    },
    Phase.STARTING: {
        Spawned: _spawned,
        SpawnFailed: _not_spawned,
        Ready: _ready,
        StartTimedOut: _start_timed_out,
        Exited: _exited,
        StopRequested: _stop,
        SupervisionFailed: _supervision_failed,
    },
    Phase.RUNNING: {
        Exited: _exited,
        StopRequested: _stop,
        SupervisionFailed: _supervision_failed,
    },
    Phase.TERMINATING: {
        Exited: _terminated,
        StopTimedOut: _kill,
        StopRequested: _stop_when_ended,
        SupervisionFailed: _supervision_failed,
    },
    Phase.KILLING: {
        Exited: _killed,
        StopRequested: _stop_when_ended,
        SupervisionFailed: _supervision_failed,
    },
    Phase.ENDING_OTHERS: {
        OthersExited: _others_exited,
        StopTimedOut: _end_stragglers,
        StopRequested: _stop_when_ended,
        SupervisionFailed: _supervision_failed,
    },
    Phase.CLEANING: {
        LeftoversEnded: _cleaned,
        StopRequested: _stop_when_ended,
        SupervisionFailed: _supervision_failed,
    },
    Phase.BACKOFF: {
        BackoffElapsed: _restart,
        StopRequested: _stop,
        SupervisionFailed: _supervision_failed,
    },
    Phase.DOWN: {
        StopRequested: _stop,
        SupervisionFailed: _supervision_failed,
    },
    Phase.FAILED: {
        StopRequested: _stop,
        SupervisionFailed: _supervision_failed,
    },
    Phase.STOPPED: {},
}
"""Every legal (phase, event): its handler. Any other pair is ignored."""


def step(lifecycle: Lifecycle, event: Event) -> Step:
    """The lifecycle after `event`, and the actions to carry out, in order."""
    handler = TRANSITIONS[lifecycle.phase].get(type(event))
    if handler is None:
        return lifecycle, ()
    return handler(lifecycle, event)
