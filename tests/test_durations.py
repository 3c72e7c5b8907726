"""The one duration grammar: fleetctl options and fleet.toml keys parse through it alike."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.durations import parse_duration
from protocol.errors import InvalidRequest

UNITS = (("h", 3600.0), ("m", 60.0), ("s", 1.0), ("ms", 0.001))
"""In the only order the grammar takes them."""


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("15", 15.0),
        ("1.5", 1.5),
        ("0", 0.0),
        ("500ms", 0.5),
        ("5s", 5.0),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("1m30s", 90.0),
        ("1h5m", 3900.0),
        ("2s500ms", 2.5),
        ("1h2m3s4ms", 3723.004),
        ("1.5m", 90.0),
    ],
)
def test_what_people_write(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text",
    ["", " 5s", "5 s", "1d", "s", "1.s", ".5", "ms5", "30s1m", "1s1s", "1m1h", "1e3", "nan", "inf"],
)
def test_other_spellings_are_refused(text: str) -> None:
    with pytest.raises(InvalidRequest, match=r"invalid duration .*: write seconds"):
        parse_duration(text)


@pytest.mark.parametrize("value", ["-1", "-1s", "-0.5", -1, -0.001])
def test_a_negative_duration_is_refused_as_such(value: object) -> None:
    with pytest.raises(InvalidRequest, match="a duration is never negative"):
        parse_duration(value)


@pytest.mark.parametrize("value", ["9" * 400 + "s", math.inf, math.nan, 10**400])
def test_what_a_float_cannot_hold_is_refused(value: object) -> None:
    with pytest.raises(InvalidRequest, match="not a finite number of seconds"):
        parse_duration(value)


@pytest.mark.parametrize("value", [True, None, [5], {"s": 5}])
def test_a_value_of_another_type_is_refused(value: object) -> None:
    with pytest.raises(InvalidRequest, match="invalid duration"):
        parse_duration(value)


def test_a_long_bad_value_is_echoed_cut_short() -> None:
    with pytest.raises(InvalidRequest) as raised:
        parse_duration("x" * 1000)
    assert len(raised.value.message) < 300


parts = st.lists(st.booleans(), min_size=len(UNITS), max_size=len(UNITS)).filter(any)


@given(parts, st.lists(st.integers(0, 10_000), min_size=len(UNITS), max_size=len(UNITS)))
def test_parts_written_in_order_parse_to_their_sum(used: list[bool], numbers: list[int]) -> None:
    chosen = [
        (n, unit, scale) for u, n, (unit, scale) in zip(used, numbers, UNITS, strict=True) if u
    ]
    text = "".join(f"{n}{unit}" for n, unit, _ in chosen)
    assert parse_duration(text) == pytest.approx(sum(n * scale for n, _, scale in chosen))


@given(st.permutations([unit for unit, _ in UNITS]))
def test_units_out_of_order_are_refused(order: list[str]) -> None:
    text = "".join(f"1{unit}" for unit in order)
    descending = order == [unit for unit, _ in UNITS]
    if descending:
        assert parse_duration(text) == pytest.approx(3661.001)
    else:
        with pytest.raises(InvalidRequest):
            parse_duration(text)


@given(st.decimals(min_value=0, max_value=10**9, places=3, allow_nan=False))
def test_seconds_written_as_a_decimal_round_trip(seconds: object) -> None:
    text = f"{seconds:f}"
    assert parse_duration(text) == float(text)
    assert parse_duration(text + "s") == float(text)


@given(st.floats(min_value=0, max_value=1e12) | st.integers(0, 10**12))
def test_a_number_is_seconds(value: float) -> None:
    assert parse_duration(value) == float(value)


@given(st.text(max_size=20))
def test_any_text_parses_to_finite_non_negative_seconds_or_is_refused(text: str) -> None:
    try:
        seconds = parse_duration(text)
    except InvalidRequest as error:
        assert error.message.startswith("invalid duration ")
    else:
        assert math.isfinite(seconds) and seconds >= 0
