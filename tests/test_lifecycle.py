"""The member lifecycle, in-process: every (phase, event) pair of its table, its behaviours one
by one, and random event sequences against a model of the world it drives."""

from dataclasses import dataclass, field, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetd.holder.backoff import Backoff
from fleetd.holder.lifecycle import (
    EVENTS,
    TRANSITIONS,
    Action,
    Actions,
    BackoffElapsed,
    Begin,
    Event,
    Exited,
    LeftoversEnded,
    Lifecycle,
    OthersExited,
    Phase,
    Ready,
    Rules,
    Spawned,
    SpawnFailed,
    StartTimedOut,
    StopRequested,
    StopTimedOut,
    SupervisionFailed,
    Then,
    step,
)
from protocol.members import MemberState

A = Action
BACKOFF = Backoff(initial=0.1, factor=2.0, cap=5.0, jitter=0.2, stable_after=10.0)


def rules(**changes: object) -> Rules:
    base = Rules(
        restart="on-failure",
        start_timeout=3.0,
        stop_timeout=5.0,
        prepare=False,
        ready_at_spawn=False,
        backoff=BACKOFF,
        random=lambda: 0.0,
    )
    return replace(base, **changes)


def feed(lifecycle: Lifecycle, *events: Event) -> tuple[Lifecycle, list[Actions]]:
    """The lifecycle after `events`, and each event's actions."""
    done = []
    for event in events:
        lifecycle, actions = step(lifecycle, event)
        done.append(actions)
    return lifecycle, done


def running(**changes: object) -> Lifecycle:
    """A member spawned at 0.0 and ready."""
    lifecycle, _ = feed(Lifecycle(rules(**changes)), Begin(), Spawned(0.0), Ready())
    return lifecycle


# --- the table, pair by pair --------------------------------------------------------------

TERMINATE = (A.CANCEL_TIMER, A.CANCEL_WATCH, A.ARM_STOP_TIMER, A.SIGNAL_STOP)
END_NOW = (A.CANCEL_TIMER, A.CANCEL_WATCH, A.END_LEFTOVERS)
TO_FAILED = (A.CANCEL_TIMER, A.CANCEL_WATCH, A.PUBLISH)

TYPICAL = {
    Phase.NEW: Lifecycle(rules()),
    Phase.PREPARING: Lifecycle(
        rules(prepare=True), phase=Phase.PREPARING, state=MemberState.PREPARING, live=True
    ),
    Phase.STARTING: Lifecycle(rules(), phase=Phase.STARTING, live=True),
    Phase.RUNNING: Lifecycle(
        rules(), phase=Phase.RUNNING, state=MemberState.RUNNING, live=True, ready=True
    ),
    Phase.TERMINATING: Lifecycle(rules(), phase=Phase.TERMINATING, live=True, then=Then.STOP),
    Phase.KILLING: Lifecycle(rules(), phase=Phase.KILLING, live=True, then=Then.STOP),
    Phase.ENDING_OTHERS: Lifecycle(rules(), phase=Phase.ENDING_OTHERS, then=Then.STOP),
    Phase.CLEANING: Lifecycle(
        rules(), phase=Phase.CLEANING, then=Then.DECIDE, failed=True, why="exited with code 3"
    ),
    Phase.BACKOFF: Lifecycle(rules(), phase=Phase.BACKOFF, state=MemberState.ERROR, delay=0.1),
    Phase.DOWN: Lifecycle(rules(), phase=Phase.DOWN, state=MemberState.STOPPED),
    Phase.FAILED: Lifecycle(rules(), phase=Phase.FAILED, state=MemberState.ERROR),
    Phase.STOPPED: Lifecycle(rules(), phase=Phase.STOPPED, state=MemberState.STOPPED),
}
"""A lifecycle in each phase, as the member usually gets there."""

EXAMPLES: dict[type, Event] = {
    Begin: Begin(),
    Spawned: Spawned(now=5.0),
    SpawnFailed: SpawnFailed("[Errno 2] No such file or directory: 'x'"),
    Ready: Ready(),
    StartTimedOut: StartTimedOut(),
    Exited: Exited(code=3, now=20.0),
    StopRequested: StopRequested(),
    StopTimedOut: StopTimedOut(),
    OthersExited: OthersExited(),
    LeftoversEnded: LeftoversEnded(),
    BackoffElapsed: BackoffElapsed(),
    SupervisionFailed: SupervisionFailed("RuntimeError: a bug"),
}

DOCUMENTED: dict[tuple[Phase, type], tuple[Phase, Actions]] = {
    (Phase.NEW, Begin): (Phase.STARTING, (A.SPAWN,)),
    (Phase.NEW, StopRequested): (Phase.STOPPED, (A.FINISH,)),
    (Phase.NEW, SupervisionFailed): (Phase.FAILED, TO_FAILED),
    (Phase.PREPARING, Spawned): (Phase.PREPARING, ()),
    (Phase.PREPARING, SpawnFailed): (Phase.DOWN, (A.PUBLISH, A.WATCH_LINGERING)),
    (Phase.PREPARING, Exited): (Phase.CLEANING, (A.KILL_GROUP, A.END_LEFTOVERS)),
    (Phase.PREPARING, StopRequested): (Phase.TERMINATING, TERMINATE),
    (Phase.PREPARING, SupervisionFailed): (Phase.TERMINATING, TERMINATE),
    (Phase.STARTING, Spawned): (
        Phase.STARTING,
        (A.PUBLISH, A.WATCH_READINESS, A.ARM_START_TIMER),
    ),
    (Phase.STARTING, SpawnFailed): (Phase.STARTING, (A.NOTE_RESTART, A.SPAWN)),
    (Phase.STARTING, Ready): (Phase.RUNNING, (A.CANCEL_TIMER, A.CANCEL_WATCH, A.PUBLISH)),
    (Phase.STARTING, StartTimedOut): (
        Phase.TERMINATING,
        (A.CANCEL_WATCH, A.PUBLISH, A.ARM_STOP_TIMER, A.SIGNAL_STOP),
    ),
    (Phase.STARTING, Exited): (
        Phase.CLEANING,
        (A.CANCEL_TIMER, A.CANCEL_WATCH, A.KILL_GROUP, A.END_LEFTOVERS),
    ),
    (Phase.STARTING, StopRequested): (Phase.TERMINATING, TERMINATE),
    (Phase.STARTING, SupervisionFailed): (Phase.TERMINATING, TERMINATE),
    (Phase.RUNNING, Exited): (
        Phase.CLEANING,
        (A.CANCEL_TIMER, A.CANCEL_WATCH, A.KILL_GROUP, A.END_LEFTOVERS),
    ),
    (Phase.RUNNING, StopRequested): (Phase.TERMINATING, TERMINATE),
    (Phase.RUNNING, SupervisionFailed): (Phase.TERMINATING, TERMINATE),
    (Phase.TERMINATING, Exited): (Phase.ENDING_OTHERS, (A.AWAIT_OTHERS,)),
    (Phase.TERMINATING, StopTimedOut): (Phase.KILLING, (A.KILL,)),
    (Phase.TERMINATING, StopRequested): (Phase.TERMINATING, ()),
    (Phase.TERMINATING, SupervisionFailed): (Phase.TERMINATING, TERMINATE),
    (Phase.KILLING, Exited): (Phase.CLEANING, (A.END_LEFTOVERS,)),
    (Phase.KILLING, StopRequested): (Phase.KILLING, ()),
    (Phase.KILLING, SupervisionFailed): (Phase.KILLING, ()),
    (Phase.ENDING_OTHERS, OthersExited): (Phase.CLEANING, (A.CANCEL_TIMER, A.END_LEFTOVERS)),
    (Phase.ENDING_OTHERS, StopTimedOut): (Phase.CLEANING, (A.CANCEL_WATCH, A.END_STRAGGLERS)),
    (Phase.ENDING_OTHERS, StopRequested): (Phase.ENDING_OTHERS, ()),
    (Phase.ENDING_OTHERS, SupervisionFailed): (
        Phase.STOPPED,
        (A.CANCEL_TIMER, A.CANCEL_WATCH, A.FINISH),
    ),
    (Phase.CLEANING, LeftoversEnded): (Phase.STARTING, (A.NOTE_RESTART, A.SPAWN)),
    (Phase.CLEANING, StopRequested): (Phase.CLEANING, ()),
    (Phase.CLEANING, SupervisionFailed): (Phase.FAILED, TO_FAILED),
    (Phase.BACKOFF, BackoffElapsed): (Phase.STARTING, (A.NOTE_RESTART, A.SPAWN)),
    (Phase.BACKOFF, StopRequested): (Phase.CLEANING, END_NOW),
    (Phase.BACKOFF, SupervisionFailed): (Phase.FAILED, TO_FAILED),
    (Phase.DOWN, StopRequested): (Phase.CLEANING, END_NOW),
    (Phase.DOWN, SupervisionFailed): (Phase.FAILED, TO_FAILED),
    (Phase.FAILED, StopRequested): (Phase.CLEANING, END_NOW),
    (Phase.FAILED, SupervisionFailed): (Phase.FAILED, TO_FAILED),
}
"""Every legal transition from the TYPICAL lifecycle of its phase; everything else is ignored."""

PAIRS = [(phase, kind) for phase in Phase for kind in EVENTS]


@pytest.mark.parametrize(("phase", "kind"), PAIRS, ids=[f"{p.name}-{k.__name__}" for p, k in PAIRS])
def test_every_phase_and_event_pair_is_documented_or_ignored(phase: Phase, kind: type) -> None:
    lifecycle = TYPICAL[phase]
    after, actions = step(lifecycle, EXAMPLES[kind])
    if (phase, kind) in DOCUMENTED:
        assert kind in TRANSITIONS[phase]
        assert (after.phase, actions) == DOCUMENTED[phase, kind]
    else:
        assert kind not in TRANSITIONS[phase]
        assert after is lifecycle and actions == ()


def test_the_table_covers_every_phase() -> None:
    assert set(TRANSITIONS) == set(Phase) == set(TYPICAL)


# --- behaviours -----------------------------------------------------------------------------


def test_a_member_with_a_prepare_step_reports_preparing_then_spawns_it() -> None:
    lifecycle, (actions,) = feed(Lifecycle(rules(prepare=True)), Begin())
    assert lifecycle.state == MemberState.PREPARING
    assert actions == (A.PUBLISH, A.SPAWN_PREPARE)


def test_a_prepare_that_succeeded_is_followed_by_the_command_once_its_leftovers_end() -> None:
    lifecycle, done = feed(
        Lifecycle(rules(prepare=True)), Begin(), Spawned(0.0), Exited(0, 1.0), LeftoversEnded()
    )
    assert done[-1] == (A.SPAWN,) and lifecycle.phase == Phase.STARTING
    assert lifecycle.restarts == 0


def test_a_prepare_that_failed_leaves_the_member_down_with_its_exit() -> None:
    lifecycle, _ = feed(
        Lifecycle(rules(prepare=True)), Begin(), Spawned(0.0), Exited(2, 1.0), LeftoversEnded()
    )
    assert (lifecycle.phase, lifecycle.state) == (Phase.DOWN, MemberState.ERROR)
    assert lifecycle.error == "prepare exited with code 2"


def test_a_prepare_that_cannot_be_spawned_is_an_error_with_the_reason() -> None:
    lifecycle, _ = feed(Lifecycle(rules(prepare=True)), Begin(), SpawnFailed("[Errno 13] no"))
    assert lifecycle.state == MemberState.ERROR
    assert lifecycle.error == "cannot run prepare: [Errno 13] no"


def test_a_member_without_readiness_check_runs_once_spawned() -> None:
    lifecycle, done = feed(Lifecycle(rules(ready_at_spawn=True)), Begin(), Spawned(0.0))
    assert (lifecycle.phase, lifecycle.state) == (Phase.RUNNING, MemberState.RUNNING)
    assert done[-1] == (A.PUBLISH,)


def test_a_member_with_a_readiness_check_is_starting_until_ready() -> None:
    lifecycle, done = feed(Lifecycle(rules()), Begin(), Spawned(0.0))
    assert lifecycle.state == MemberState.STARTING
    assert done[-1] == (A.PUBLISH, A.WATCH_READINESS, A.ARM_START_TIMER)
    lifecycle, done = feed(lifecycle, Ready())
    assert lifecycle.state == MemberState.RUNNING and A.CANCEL_TIMER in done[0]


def test_not_ready_within_start_timeout_is_an_error_and_ends_the_run() -> None:
    lifecycle, done = feed(Lifecycle(rules()), Begin(), Spawned(0.0), StartTimedOut())
    assert lifecycle.state == MemberState.ERROR and lifecycle.error == "not ready within 3s"
    assert A.SIGNAL_STOP in done[-1]


def test_a_run_that_was_not_ready_in_time_is_restarted_as_a_failure() -> None:
    lifecycle, _ = feed(Lifecycle(rules()), Begin(), Spawned(0.0), StartTimedOut())
    lifecycle, done = feed(lifecycle, Exited(-15, 3.1), OthersExited(), LeftoversEnded())
    assert done[-1] == (A.NOTE_RESTART, A.SPAWN) and lifecycle.restarts == 1


def test_a_run_not_ready_in_time_without_restart_policy_stays_in_error() -> None:
    lifecycle, _ = feed(Lifecycle(rules(restart="no")), Begin(), Spawned(0.0), StartTimedOut())
    lifecycle, _ = feed(lifecycle, Exited(-15, 3.1), OthersExited(), LeftoversEnded())
    assert (lifecycle.phase, lifecycle.state) == (Phase.DOWN, MemberState.ERROR)
    assert lifecycle.error == "not ready within 3s"


def test_a_readiness_signal_after_the_start_timeout_is_ignored() -> None:
    lifecycle, _ = feed(Lifecycle(rules()), Begin(), Spawned(0.0), StartTimedOut())
    assert step(lifecycle, Ready()) == (lifecycle, ())


def crash_loop(lifecycle: Lifecycle, crashes: int) -> tuple[Lifecycle, list[float]]:
    """Crash `crashes` times half a second after each spawn; the delays before each restart."""
    delays, now = [], 0.0
    for _ in range(crashes):
        lifecycle, _ = feed(lifecycle, Spawned(now), Exited(3, now + 0.5), LeftoversEnded())
        now += 0.5
        if lifecycle.phase == Phase.BACKOFF:
            delays.append(lifecycle.delay)
            now += lifecycle.delay
            lifecycle, _ = feed(lifecycle, BackoffElapsed())
        else:
            delays.append(0.0)
    return lifecycle, delays


def test_a_crashing_member_restarts_at_once_then_with_growing_delays() -> None:
    lifecycle, _ = feed(Lifecycle(rules()), Begin())
    lifecycle, delays = crash_loop(lifecycle, 6)
    assert delays == pytest.approx([0.0, 0.1, 0.2, 0.4, 0.8, 1.6])
    assert lifecycle.restarts == 6


def test_a_member_waiting_to_restart_after_a_crash_is_in_error_with_the_delay() -> None:
    lifecycle, _ = feed(Lifecycle(rules()), Begin())
    lifecycle, _ = crash_loop(lifecycle, 1)
    lifecycle, _ = feed(lifecycle, Spawned(1.0), Exited(3, 1.5), LeftoversEnded())
    assert (lifecycle.phase, lifecycle.state) == (Phase.BACKOFF, MemberState.ERROR)
    assert lifecycle.error == "exited with code 3 before it was ready"
    assert lifecycle.delay == pytest.approx(0.1)


def test_a_clean_exit_restarted_by_policy_always_waits_as_starting() -> None:
    lifecycle = running(restart="always")
    lifecycle, _ = feed(lifecycle, Exited(0, 1.0), LeftoversEnded(), Spawned(1.0), Ready())
    lifecycle, _ = feed(lifecycle, Exited(0, 2.0), LeftoversEnded())
    assert (lifecycle.phase, lifecycle.state) == (Phase.BACKOFF, MemberState.STARTING)


def test_a_clean_exit_not_restarted_is_stopped_not_an_error() -> None:
    lifecycle, _ = feed(running(), Exited(0, 1.0), LeftoversEnded())
    assert (lifecycle.phase, lifecycle.state, lifecycle.error) == (
        Phase.DOWN,
        MemberState.STOPPED,
        "",
    )


def test_an_exit_with_code_0_before_ready_is_a_failure() -> None:
    lifecycle, _ = feed(Lifecycle(rules(restart="no")), Begin(), Spawned(0.0))
    lifecycle, _ = feed(lifecycle, Exited(0, 1.0), LeftoversEnded())
    assert lifecycle.state == MemberState.ERROR
    assert lifecycle.error == "exited with code 0 before it was ready"


def test_a_killed_member_that_ran_stably_restarts_at_once() -> None:
    lifecycle, _ = feed(Lifecycle(rules()), Begin())
    lifecycle, _ = crash_loop(lifecycle, 4)  # a streak that would make it wait
    lifecycle, done = feed(lifecycle, Spawned(100.0), Ready(), Exited(-9, 200.0))
    lifecycle, done = feed(lifecycle, LeftoversEnded())
    assert done[-1] == (A.NOTE_RESTART, A.SPAWN)


def test_the_leftovers_of_a_run_are_ended_before_it_restarts() -> None:
    lifecycle, (exited,) = feed(running(), Exited(-9, 1.0))
    assert exited[-2:] == (A.KILL_GROUP, A.END_LEFTOVERS) and A.SPAWN not in exited
    assert lifecycle.phase == Phase.CLEANING


def test_a_program_that_cannot_be_spawned_backs_off_like_a_crash() -> None:
    lifecycle, _ = feed(Lifecycle(rules(restart="always")), Begin(), SpawnFailed("[Errno 2]"))
    assert lifecycle.phase == Phase.STARTING and lifecycle.restarts == 1  # at once, once
    lifecycle, _ = feed(lifecycle, SpawnFailed("[Errno 2]"))
    assert lifecycle.phase == Phase.BACKOFF and lifecycle.delay == pytest.approx(0.1)
    assert lifecycle.error == "cannot start: [Errno 2]"


def test_a_stop_sends_the_stop_signal_and_arms_stop_timeout() -> None:
    lifecycle, (actions,) = feed(running(), StopRequested())
    assert lifecycle.phase == Phase.TERMINATING and actions == TERMINATE


def test_a_member_alive_at_stop_timeout_is_killed_and_then_stopped() -> None:
    lifecycle, done = feed(running(), StopRequested(), StopTimedOut(), Exited(-9, 9.0))
    assert done[1] == (A.KILL,)
    lifecycle, done = feed(lifecycle, LeftoversEnded())
    assert (lifecycle.phase, lifecycle.state) == (Phase.STOPPED, MemberState.STOPPED)


def test_other_processes_left_at_stop_timeout_are_killed_as_stragglers() -> None:
    lifecycle, done = feed(running(), StopRequested(), Exited(-15, 1.0), StopTimedOut())
    assert done[1] == (A.AWAIT_OTHERS,) and done[2] == (A.CANCEL_WATCH, A.END_STRAGGLERS)
    assert lifecycle.phase == Phase.CLEANING


def test_a_stop_during_backoff_cancels_the_restart() -> None:
    lifecycle, _ = feed(Lifecycle(rules()), Begin())
    lifecycle, _ = crash_loop(lifecycle, 1)
    lifecycle, _ = feed(lifecycle, Spawned(1.0), Exited(3, 1.5), LeftoversEnded())
    assert lifecycle.phase == Phase.BACKOFF
    lifecycle, done = feed(lifecycle, StopRequested(), LeftoversEnded(), BackoffElapsed())
    assert done[0] == END_NOW and lifecycle.phase == Phase.STOPPED
    assert A.SPAWN not in done[2]


def test_a_stop_while_a_run_ends_waits_for_its_cleaning_then_stops() -> None:
    lifecycle, done = feed(running(), Exited(3, 1.0), StopRequested(), LeftoversEnded())
    assert done[1] == () and done[2] == (A.FINISH,)
    assert lifecycle.phase == Phase.STOPPED


def test_a_second_stop_changes_nothing() -> None:
    lifecycle, _ = feed(running(), StopRequested())
    assert step(lifecycle, StopRequested()) == (replace(lifecycle, then=Then.STOP), ())


def test_a_stop_before_supervision_began_finishes_at_once() -> None:
    lifecycle, done = feed(Lifecycle(rules()), StopRequested(), Begin())
    assert lifecycle.phase == Phase.STOPPED and done == [(A.FINISH,), ()]


def test_a_supervision_failure_without_a_process_leaves_the_member_failed() -> None:
    lifecycle, _ = feed(Lifecycle(rules()), Begin(), SupervisionFailed("RuntimeError: a bug"))
    assert (lifecycle.phase, lifecycle.state) == (Phase.FAILED, MemberState.ERROR)
    assert lifecycle.error == "supervision failed: RuntimeError: a bug"


def test_a_supervision_failure_ends_a_live_process_before_reporting_it() -> None:
    lifecycle, (actions,) = feed(running(), SupervisionFailed("RuntimeError: a bug"))
    assert actions == TERMINATE and lifecycle.state == MemberState.RUNNING
    lifecycle, _ = feed(lifecycle, Exited(-15, 1.0), OthersExited(), LeftoversEnded())
    assert (lifecycle.phase, lifecycle.error) == (
        Phase.FAILED,
        "supervision failed: RuntimeError: a bug",
    )


def test_a_supervision_failure_during_a_stop_still_ends_stopped() -> None:
    lifecycle, _ = feed(running(), StopRequested(), SupervisionFailed("OSError: x"))
    lifecycle, _ = feed(lifecycle, Exited(-15, 1.0), OthersExited(), LeftoversEnded())
    assert lifecycle.phase == Phase.STOPPED


def test_a_failed_member_is_cleaned_up_when_stopped() -> None:
    lifecycle, _ = feed(Lifecycle(rules()), Begin(), SupervisionFailed("RuntimeError: a bug"))
    lifecycle, done = feed(lifecycle, StopRequested(), LeftoversEnded())
    assert done == [END_NOW, (A.FINISH,)] and lifecycle.phase == Phase.STOPPED


# --- random sequences against a model of the world ------------------------------------------


@dataclass
class World:
    """What the shell would do with the actions: processes, one timer, one side job."""

    lifecycle: Lifecycle
    spawn_works: st.DataObject
    now: float = 0.0
    live: int = 0
    timer: type | None = None
    job: type | None = None
    """The event the side job running will deliver (None for the lingering watch)."""
    watching_lingering: bool = False
    stop_asked: bool = False
    finished: bool = False
    streak_delays: list[float] = field(default_factory=list)

    def feed(self, event: Event) -> None:
        queue = [event]
        while queue:
            before = self.lifecycle
            self.lifecycle, actions = step(before, queue.pop(0))
            for action in actions:
                queue.extend(self.perform(action))
            self.check(before, actions)

    def check(self, before: Lifecycle, actions: Actions) -> None:
        after = self.lifecycle
        assert after.restarts >= before.restarts
        assert (after.restarts > before.restarts) == (A.NOTE_RESTART in actions)
        shown = (after.state, after.error, after.restarts)
        if shown != (before.state, before.error, before.restarts):
            assert {A.PUBLISH, A.NOTE_RESTART, A.FINISH} & set(actions), "changed unreported"
        if A.SPAWN in actions:
            assert actions[-1] == A.SPAWN
        if before.phase == Phase.STOPPED:
            assert actions == () and after == before
        if after.phase == Phase.STOPPED:
            assert self.live == 0 and self.timer is None and self.finished
            assert after.state == MemberState.STOPPED

    def perform(self, action: Action) -> list[Event]:
        match action:
            case A.SPAWN | A.SPAWN_PREPARE:
                assert self.live == 0, "two processes at once"
                assert not self.stop_asked, "spawned after a stop"
                if self.spawn_works.draw(st.booleans()):
                    self.live = 1
                    return [Spawned(self.now)]
                return [SpawnFailed("[Errno 2] No such file or directory")]
            case A.ARM_START_TIMER | A.ARM_STOP_TIMER | A.ARM_BACKOFF_TIMER:
                assert self.timer is None, "a second timer"
                self.timer = {
                    A.ARM_START_TIMER: StartTimedOut,
                    A.ARM_STOP_TIMER: StopTimedOut,
                    A.ARM_BACKOFF_TIMER: BackoffElapsed,
                }[action]
                if action == A.ARM_BACKOFF_TIMER:
                    self.check_backoff()
            case A.CANCEL_TIMER:
                self.timer = None
            case A.CANCEL_WATCH:
                self.job, self.watching_lingering = None, False
            case A.WATCH_READINESS | A.AWAIT_OTHERS | A.END_LEFTOVERS | A.END_STRAGGLERS:
                assert self.job is None and not self.watching_lingering, "a second side job"
                self.job = {
                    A.WATCH_READINESS: Ready,
                    A.AWAIT_OTHERS: OthersExited,
                    A.END_LEFTOVERS: LeftoversEnded,
                    A.END_STRAGGLERS: LeftoversEnded,
                }[action]
            case A.WATCH_LINGERING:
                assert self.job is None, "a second side job"
                self.watching_lingering = True
            case A.SIGNAL_STOP | A.KILL:
                assert self.live, "signalled no process"
            case A.FINISH:
                assert not self.finished
                self.finished = True
        return []

    def check_backoff(self) -> None:
        """Within a crash streak (no jitter here), each wait is at least the one before."""
        lifecycle = self.lifecycle
        if lifecycle.streak <= len(self.streak_delays):
            self.streak_delays = self.streak_delays[: lifecycle.streak - 1]
        if self.streak_delays:
            assert lifecycle.delay >= self.streak_delays[-1]
        self.streak_delays.append(lifecycle.delay)

    def possible(self) -> list[Event]:
        """What the world may do next, stops and failures aside."""
        events: list[Event] = []
        if self.lifecycle.phase == Phase.NEW:
            events.append(Begin())
        if self.live:
            events += [Exited(self.draw_code(), self.now), Ready()]
        if self.timer is not None:
            events.append(self.timer())
        if self.job is not None:
            events.append(self.job())
        return events

    def draw_code(self) -> int:
        return self.spawn_works.draw(st.sampled_from([0, 1, -9, -15]))

    def happen(self, event: Event) -> None:
        """The world's side of an event, then the lifecycle's."""
        if isinstance(event, Exited):
            self.live = 0
        elif isinstance(event, StopRequested):
            self.stop_asked = True
        if self.timer is not None and isinstance(event, self.timer):
            self.timer = None
        if self.job is not None and isinstance(event, self.job):
            self.job = None
        self.feed(event)

    def settle(self) -> None:
        """Let timers, jobs and processes run their course (a process ends at last)."""
        for _ in range(50):
            if self.lifecycle.phase == Phase.STOPPED:
                return
            if self.job is not None:
                self.happen(self.job())
            elif self.timer is not None:
                self.happen(self.timer())
            elif self.live:
                self.happen(Exited(-9, self.now))
            else:
                raise AssertionError(f"stuck in {self.lifecycle.phase}")
        raise AssertionError("a stop did not end")


world_rules = st.builds(
    rules,
    restart=st.sampled_from(["no", "on-failure", "always"]),
    prepare=st.booleans(),
    ready_at_spawn=st.booleans(),
)


@settings(max_examples=500, deadline=None)
@given(world_rules, st.data())
def test_random_event_sequences_keep_the_invariants_and_a_stop_always_ends(
    member_rules: Rules, data: st.DataObject
) -> None:
    """Never two processes, one timer, one side job; a stopped member never spawns; every
    change of the status is reported; restarts and backoff only grow; a stop always ends in
    STOPPED with no process left."""
    world = World(Lifecycle(member_rules), data)
    for _ in range(data.draw(st.integers(0, 60))):
        world.now += data.draw(st.sampled_from([0.0, 0.3, 4.0, 12.0]))
        events = world.possible()
        if not events or data.draw(st.integers(0, 9)) == 0:
            events = [StopRequested(), SupervisionFailed("RuntimeError: a bug")]
        world.happen(data.draw(st.sampled_from(events)))
    world.happen(StopRequested())
    world.settle()
    assert world.lifecycle.phase == Phase.STOPPED and world.finished
    assert world.live == 0 and world.timer is None
