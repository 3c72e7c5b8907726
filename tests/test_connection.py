"""The sans-io client connection core (protocol.connection), fed bytes by hand: ids, answers
matched by id in any order, a watch's pushes, late answers, and one sticky failure."""

import json

import pytest

from protocol.connection import ClientConnection, TypedResponse, check_version, result_of
from protocol.errors import BadFrame, ConnectionLost, Incompatible, InvalidRequest, NotOwned
from protocol.framing import encode, leading_id
from protocol.members import MemberState, MemberStatus, StatusAll, Watch, WatchResult
from protocol.messages import (
    Empty,
    LeaseInspect,
    Ping,
    RawResponse,
    Response,
    Version,
    VersionResult,
)
from tests.test_layering import modules_after, top_level


def answer(request_id: int | None, result: object = None, **fields: object) -> bytes:
    body = {"id": request_id, "ok": True, "result": result, **fields}
    return json.dumps(body).encode() + b"\n"


def test_ids_count_up_and_frames_carry_them() -> None:
    connection = ClientConnection()
    first, frame = connection.send(Ping, {})
    second, _ = connection.send(Version, {})
    assert (first, second) == (1, 2)
    assert json.loads(frame) == {"op": "ping", "id": 1}
    assert connection.waiting == 2


def test_answers_are_matched_by_id_in_any_order_and_split_anywhere() -> None:
    connection = ClientConnection()
    ping, _ = connection.send(Ping, {})
    version, _ = connection.send(Version, {})
    stream = answer(version, {"version": "1", "protocol": 1}) + answer(ping, {})
    for i in range(len(stream)):  # one byte at a time
        connection.receive_data(stream[i : i + 1])
    assert connection.take(ping) is not None
    got = connection.take(version)
    assert got is not None
    assert result_of(got, Version) == VersionResult(version="1", protocol=1)
    assert connection.waiting == 0


def test_an_abandoned_request_drops_its_late_answer() -> None:
    connection = ClientConnection()
    request_id, _ = connection.send(Ping, {})
    connection.abandon(request_id)
    connection.receive_data(answer(request_id, {}))
    assert connection.take(request_id) is None
    assert connection.waiting == 0 and connection.failure is None


def test_a_watch_is_answered_once_then_its_frames_are_pushes() -> None:
    pushed: list[RawResponse] = []
    answered: list[int] = []
    connection = ClientConnection(on_answer=lambda i, _: answered.append(i), on_push=pushed.append)
    watch, _ = connection.send(Watch, {}, pushes=True)
    connection.receive_data(answer(watch, {"members": []}) + answer(watch, {"name": "a"}) * 2)
    assert answered == [watch]
    assert len(pushed) == 2
    ping, _ = connection.send(Ping, {})
    connection.receive_data(answer(ping, {}))  # other answers still go to their callers
    assert answered == [watch, ping] and len(pushed) == 2


def test_an_answer_as_msgspec_spells_it_is_decoded_once_as_its_ops_result() -> None:
    connection = ClientConnection()
    request_id, _ = connection.send(StatusAll, {})
    members = [MemberStatus(name=f"m{i}", state=MemberState.RUNNING, pid=i) for i in range(3)]
    connection.receive_data(encode(Response(id=request_id, ok=True, result=WatchResult(members))))
    got = connection.take(request_id)
    assert isinstance(got, TypedResponse)
    assert result_of(got, StatusAll) == WatchResult(members)


def test_an_answer_that_does_not_fit_its_op_fails_that_request_alone() -> None:
    connection = ClientConnection()
    request_id, _ = connection.send(StatusAll, {})
    connection.receive_data(encode(Response(id=request_id, ok=True, result={"members": 7})))
    got = connection.take(request_id)
    assert got is not None
    with pytest.raises(BadFrame, match="malformed result"):
        result_of(got, StatusAll)
    ping, _ = connection.send(Ping, {})
    connection.receive_data(encode(Response(id=ping, ok=True, result=Empty())))
    assert connection.failure is None and connection.take(ping) is not None


def test_an_answer_missing_its_result_is_malformed() -> None:
    connection = ClientConnection()
    request_id, _ = connection.send(Version, {})
    connection.receive_data(encode(Response(id=request_id, ok=True)))
    got = connection.take(request_id)
    assert got is not None
    with pytest.raises(BadFrame, match="malformed result"):
        result_of(got, Version)


@pytest.mark.parametrize(
    ("frame", "request_id"),
    [
        (b'{"id":12,"ok":true}', 12),
        (b'{"id":0,"ok":true}', 0),
        (b'{"id": 12, "ok": true}', None),
        (b'{"ok":true,"id":12}', None),
        (b'{"id":null,"ok":false}', None),
        (b'{"id":-1,"ok":true}', None),
        (b'{"id":1' + b"0" * 30 + b',"ok":true}', None),
        (b'{"id":12}', None),
    ],
)
def test_the_leading_id_is_read_only_as_msgspec_spells_it(
    frame: bytes, request_id: int | None
) -> None:
    assert leading_id(frame) == request_id


def test_an_error_answer_raises_its_error() -> None:
    connection = ClientConnection()
    request_id, _ = connection.send(Ping, {})
    error = {"code": "not_owned", "message": "lost it"}
    connection.receive_data(
        json.dumps({"id": request_id, "ok": False, "error": error}).encode() + b"\n"
    )
    got = connection.take(request_id)
    assert got is not None
    with pytest.raises(NotOwned, match="lost it"):
        result_of(got, Ping)


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"", "fleetd closed the connection"),
        (b"not json\n", "fleetd sent a bad frame"),
        (b'{"id":null,"ok":false,"error":{"code":"bad_frame","message":"m"}}\n', "m"),
    ],
)
def test_a_failure_fails_every_waiting_and_every_later_request(data: bytes, error: str) -> None:
    connection = ClientConnection()
    request_id, _ = connection.send(Ping, {})
    connection.receive_data(data)
    with pytest.raises(Exception, match=error) as raised:
        connection.take(request_id)
    assert raised.value is connection.failure
    with pytest.raises(type(raised.value)):
        connection.send(Ping, {})
    connection.receive_data(answer(request_id, {}))  # nothing after the failure counts
    assert connection.failure is raised.value


def test_the_first_failure_sticks() -> None:
    connection = ClientConnection(peer="the holder")
    connection.receive_data(b"")
    connection.fail(ConnectionLost("later"))
    assert connection.failure is not None
    assert connection.failure.message == "the holder closed the connection"


def test_text_json_cannot_carry_is_refused_before_anything_is_sent() -> None:
    connection = ClientConnection()
    with pytest.raises(InvalidRequest, match="not UTF-8"):
        connection.send(LeaseInspect, {"name": "\udcff"})
    assert connection.waiting == 0
    assert connection.send(Ping, {})[0] == 1, "the refused request took no id"


def test_a_peer_of_another_protocol_version_is_refused() -> None:
    with pytest.raises(Incompatible, match="the holder speaks protocol 99"):
        check_version(99, "the holder")


def test_every_op_knows_its_result_type() -> None:
    assert Ping.result_type is Empty
    assert Version.result_type is VersionResult


def test_the_core_does_no_io() -> None:
    loaded = top_level(modules_after("import protocol.connection"))
    assert not loaded & {"socket", "asyncio", "anyio", "selectors", "fleetctl", "fleetd"}
