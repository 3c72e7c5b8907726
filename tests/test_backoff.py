"""Restart decisions: pure, with an explicit random source and explicit run lengths."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleetd.holder.backoff import Backoff, Exit, Restart, plan_restart, should_restart

BACKOFF = Backoff(initial=0.1, factor=2.0, cap=5.0, jitter=0.2, stable_after=10.0)


def no_jitter() -> float:
    return 0.0


def most_jitter() -> float:
    return 0.999


def crash(ran_for: float = 0.5) -> Exit:
    return Exit(failed=True, ran_for=ran_for)


def test_the_first_restart_of_a_streak_is_immediate() -> None:
    assert plan_restart("on-failure", crash(), 0, BACKOFF, no_jitter) == Restart(0.0, 1)


def test_later_restarts_back_off_exponentially_up_to_the_cap() -> None:
    streak, delays = 0, []
    for _ in range(9):
        plan = plan_restart("on-failure", crash(), streak, BACKOFF, no_jitter)
        assert plan is not None
        delays.append(plan.delay)
        streak = plan.streak
    assert delays == pytest.approx([0.0, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0])


def test_jitter_only_shortens_a_delay_by_up_to_its_fraction() -> None:
    assert BACKOFF.delay(3, most_jitter) == pytest.approx(0.4 * (1 - 0.2 * 0.999))
    assert BACKOFF.delay(3, no_jitter) == pytest.approx(0.4)


def test_a_stable_run_ends_the_streak() -> None:
    plan = plan_restart("on-failure", crash(ran_for=10.0), 6, BACKOFF, no_jitter)
    assert plan == Restart(0.0, 1)
    plan = plan_restart("on-failure", crash(ran_for=9.9), 6, BACKOFF, no_jitter)
    assert plan is not None and plan.delay == pytest.approx(3.2)


@pytest.mark.parametrize(
    ("policy", "failed", "restarts"),
    [
        ("no", True, False),
        ("no", False, False),
        ("on-failure", True, True),
        ("on-failure", False, False),
        ("always", True, True),
        ("always", False, True),
    ],
)
def test_policies(policy: str, failed: bool, restarts: bool) -> None:
    assert should_restart(policy, failed) is restarts
    plan = plan_restart(policy, Exit(failed=failed, ran_for=1.0), 0, BACKOFF, no_jitter)
    assert (plan is not None) is restarts


@given(st.integers(0, 10_000), st.floats(0, 1, exclude_max=True))
def test_a_delay_is_never_negative_nor_over_the_cap(streak: int, random: float) -> None:
    delay = BACKOFF.delay(streak, lambda: random)
    assert 0.0 <= delay <= BACKOFF.cap
    if streak > 0:
        assert delay >= BACKOFF.initial * (1 - BACKOFF.jitter)
