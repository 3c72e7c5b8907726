"""When to restart a member that exited: pure decisions, given times and a random source.

A crash streak is the run of exits that each came less than `stable_after` seconds after
their spawn. The first restart of a streak is immediate (a one-off crash costs no downtime);
each later one waits `initial * factor**(n-1)`, capped at `cap`, minus up to `jitter` of it at
random so that members that crashed together do not restart in lockstep. A run that lasted
`stable_after` ends the streak.
"""

from collections.abc import Callable
from dataclasses import dataclass

_MAX_EXPONENT = 60
"""Past this the cap has long applied; it keeps factor**n from overflowing a float."""


@dataclass(frozen=True, slots=True)
class Backoff:
    initial: float = 0.1
    factor: float = 2.0
    cap: float = 30.0
    jitter: float = 0.2
    stable_after: float = 10.0

    def delay(self, streak: int, random: Callable[[], float]) -> float:
        """Seconds to wait before restart number `streak` (0-based) of a crash streak.
        `random` returns a float in [0, 1), like random.random."""
        if streak <= 0:
            return 0.0
        base = min(self.cap, self.initial * self.factor ** min(streak - 1, _MAX_EXPONENT))
        return base * (1.0 - self.jitter * random())


@dataclass(frozen=True, slots=True)
class Exit:
    """How a run ended: `failed` is a non-zero exit, a signal, a failed spawn, or an exit
    before the member was ready; `ran_for` is seconds from spawn to exit."""

    failed: bool
    ran_for: float


@dataclass(frozen=True, slots=True)
class Restart:
    """Restart after `delay` seconds; `streak` is the streak to carry into the next exit."""

    delay: float
    streak: int


def should_restart(policy: str, failed: bool) -> bool:
    """The restart policy: "no", "on-failure" or "always"."""
    return policy == "always" or (policy == "on-failure" and failed)


def plan_restart(
    policy: str, exit: Exit, streak: int, backoff: Backoff, random: Callable[[], float]
) -> Restart | None:
    """Whether and when to restart after `exit`, given the restarts of the streak so far;
    None when the policy says the member stays down."""
    if not should_restart(policy, exit.failed):
        return None
    if exit.ran_for >= backoff.stable_after:
        streak = 0
    return Restart(delay=backoff.delay(streak, random), streak=streak + 1)
