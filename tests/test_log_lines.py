"""fleetd.core.log: the daemon's and the holders' lines, as JSON, written once per loop turn."""

import io
import json
import sys

import anyio
import pytest
import structlog

from fleetd.core.log import configure_logging


class Writes(io.StringIO):
    """A stderr that counts the writes it gets."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


@pytest.fixture
def stderr(monkeypatch: pytest.MonkeyPatch) -> Writes:
    file = Writes()
    monkeypatch.setattr(sys, "stderr", file)
    configure_logging("info", json=True)
    return file


def lines(file: Writes) -> list[dict[str, object]]:
    return [json.loads(line) for line in file.getvalue().splitlines()]


async def test_the_lines_of_one_loop_turn_go_out_in_one_write_after_it(stderr: Writes) -> None:
    log = structlog.get_logger("test")
    for n in range(3):
        log.info("request_handled", n=n)
    assert stderr.writes == 0
    await anyio.lowlevel.checkpoint()
    assert stderr.writes == 1
    assert [line["n"] for line in lines(stderr)] == [0, 1, 2]


def test_a_line_logged_with_no_loop_running_is_written_at_once(stderr: Writes) -> None:
    structlog.get_logger("test").warning("store_opened", path="/x")
    assert stderr.writes == 1
    (line,) = lines(stderr)
    assert (line["event"], line["level"], line["path"]) == ("store_opened", "warning", "/x")


def test_a_line_with_an_exception_carries_its_traceback(stderr: Writes) -> None:
    try:
        raise ValueError("bad")
    except ValueError:
        structlog.get_logger("test").exception("request_crashed")
    (line,) = lines(stderr)
    assert line["level"] == "error"
    assert "ValueError: bad" in str(line["exception"])
