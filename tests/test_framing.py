"""The wire format as pure code: frames, requests, responses, error codes and exit codes.

No sockets here. Golden bytes pin the format, so that a change to it is a visible diff in this
file rather than a silent incompatibility between a new fleetctl and an old fleetd.
"""

import itertools
import time

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from protocol import MAX_FRAME, PROTOCOL_VERSION
from protocol.claims import (
    ClaimAcquire,
    ClaimGc,
    ClaimInspect,
    ClaimListRequest,
    ClaimRelease,
)
from protocol.clusters import (
    ClusterApply,
    ClusterApplyToml,
    ClusterDown,
    ClusterUp,
    ClusterUpToml,
    LogsNamed,
    MemberAdd,
    MemberLogs,
    MemberRestart,
    MemberStart,
    MemberStatusRequest,
    MemberStop,
    MemberWait,
)
from protocol.definitions import ClusterSpec, MemberSpec
from protocol.errors import (
    ERRORS_BY_CODE,
    BadFrame,
    ConnectionLost,
    FleetError,
    FrameTooLarge,
    InvalidRequest,
    UnknownOp,
    _all_subclasses,
    error_for_code,
)
from protocol.framing import (
    FrameSplitter,
    decode_request,
    decode_response,
    encode,
    encode_response,
    error_response,
    request_id_of,
)
from protocol.messages import (
    OPS,
    REQUEST_TYPES,
    Empty,
    ErrorBody,
    Hello,
    HelloResult,
    LeaseAcquire,
    LeaseHeartbeat,
    LeaseInspect,
    LeaseListRequest,
    LeaseRelease,
    LeaseWatch,
    Metrics,
    Ping,
    Request,
    Response,
    Shutdown,
    Version,
)
from protocol.outcomes import EXIT_CODES, Outcome
from protocol.runs import (
    Drain,
    EventEmit,
    EventList,
    ReceiptListRequest,
    ReceiptScore,
    RunCancel,
    RunListRequest,
    RunShow,
    RunSubmit,
    TaskListRequest,
)

# Every property runs with deadline=None: these are pure functions, and on a loaded machine
# Hypothesis's default 200 ms deadline would only measure the load.

# -- strategies ---------------------------------------------------------------------------------

ids = st.integers(min_value=-(2**63), max_value=2**64 - 1) | st.integers()
"""Request ids: the client counts up from 1, but the codec must carry any JSON integer."""
payloads = st.dictionaries(st.text(), st.text() | st.integers(-(2**63), 2**63 - 1), max_size=3)

finite = st.floats(allow_nan=False, allow_infinity=False)
"""JSON has no NaN or infinity: a float field carries any finite double."""

valid_names = st.from_regex(r"[a-z0-9][a-z0-9._-]{0,10}", fullmatch=True)
member_specs = st.builds(
    MemberSpec,
    name=valid_names,
    command=st.lists(st.text(min_size=1).filter(lambda a: "\0" not in a), min_size=1),
)
cluster_specs = st.builds(
    ClusterSpec,
    name=valid_names,
    members=st.lists(member_specs, min_size=1, max_size=3, unique_by=lambda m: m.name),
)

REQUEST_STRATEGIES: dict[type[Request], st.SearchStrategy[Request]] = {
    Hello: st.builds(Hello, id=ids, version=st.integers(-(2**63), 2**63 - 1), client=st.text()),
    Ping: st.builds(Ping, id=ids),
    Version: st.builds(Version, id=ids),
    Shutdown: st.builds(Shutdown, id=ids),
    Metrics: st.builds(Metrics, id=ids),
    **{
        kind: st.builds(
            kind,
            id=ids,
            name=st.text(),
            owner=st.text(),
            token=st.integers(0, 2**63 - 1),
        )
        for kind in (LeaseHeartbeat, LeaseRelease)
    },
    LeaseAcquire: st.builds(
        LeaseAcquire,
        id=ids,
        name=st.text(),
        owner=st.text(),
        ttl=finite,
        pid=st.integers(0, 2**31),
    ),
    LeaseInspect: st.builds(LeaseInspect, id=ids, name=st.text()),
    LeaseListRequest: st.builds(LeaseListRequest, id=ids, prefix=st.text()),
    LeaseWatch: st.builds(
        LeaseWatch,
        id=ids,
        prefix=st.text(),
        after=st.none() | st.integers(0, 2**63 - 1),
        epoch=st.text(),
        wait=finite,
    ),
    ClusterUp: st.builds(ClusterUp, id=ids, spec=cluster_specs, idempotent=st.booleans()),
    ClusterUpToml: st.builds(
        ClusterUpToml,
        id=ids,
        text=st.text(),
        source=st.text(),
        name=st.none() | st.text(),
        idempotent=st.booleans(),
    ),
    ClusterDown: st.builds(ClusterDown, id=ids, cluster=st.text()),
    MemberStatusRequest: st.builds(MemberStatusRequest, id=ids, names=st.lists(st.text())),
    MemberWait: st.builds(MemberWait, id=ids, names=st.lists(st.text()), wait=finite),
    MemberStop: st.builds(MemberStop, id=ids, name=st.text()),
    MemberAdd: st.builds(
        MemberAdd, id=ids, name=st.text(), sibling=st.text(), spec=st.none() | member_specs
    ),
    MemberLogs: st.builds(MemberLogs, id=ids, name=st.text()),
    LogsNamed: st.builds(LogsNamed, id=ids, name=st.text()),
    MemberStart: st.builds(MemberStart, id=ids, name=st.text()),
    MemberRestart: st.builds(MemberRestart, id=ids, name=st.text()),
    ClusterApply: st.builds(ClusterApply, id=ids, spec=cluster_specs),
    ClusterApplyToml: st.builds(
        ClusterApplyToml,
        id=ids,
        text=st.text(),
        source=st.text(),
        name=st.none() | st.text(),
        directory=st.text(),
    ),
    ClaimAcquire: st.builds(
        ClaimAcquire,
        id=ids,
        kind=st.text(),
        key=st.text(),
        owner=st.text(),
        content=st.binary(),
    ),
    ClaimRelease: st.builds(ClaimRelease, id=ids, kind=st.text(), key=st.text(), owner=st.text()),
    ClaimInspect: st.builds(ClaimInspect, id=ids, kind=st.text(), key=st.text()),
    ClaimListRequest: st.builds(ClaimListRequest, id=ids, kind=st.text(), owner=st.text()),
    ClaimGc: st.builds(ClaimGc, id=ids, dry_run=st.booleans()),
    RunSubmit: st.builds(
        RunSubmit,
        id=ids,
        text=st.text(),
        format=st.sampled_from(["toml", "json"]),
        source=st.text(),
        directory=st.text(),
    ),
    RunListRequest: st.builds(RunListRequest, id=ids),
    RunShow: st.builds(RunShow, id=ids, run=st.text()),
    RunCancel: st.builds(RunCancel, id=ids, run=st.text()),
    TaskListRequest: st.builds(TaskListRequest, id=ids, run=st.text()),
    EventList: st.builds(
        EventList,
        id=ids,
        run=st.text(),
        after=st.dictionaries(st.text(), st.integers(0, 2**63 - 1), max_size=3),
        from_now=st.booleans(),
        wait=st.floats(0, 1e6),
        limit=st.integers(0, 2**31),
    ),
    EventEmit: st.builds(
        EventEmit,
        id=ids,
        attempt_id=st.text(),
        event=payloads,
        events=st.lists(payloads, max_size=3),
    ),
    ReceiptListRequest: st.builds(ReceiptListRequest, id=ids, run=st.text()),
    ReceiptScore: st.builds(
        ReceiptScore,
        id=ids,
        task=st.text(),
        result=st.sampled_from(["pass", "fail"]),
        notes=st.text(),
    ),
    Drain: st.builds(Drain, id=ids, wait=st.floats(0, 1e6), resume=st.booleans()),
}
requests = st.one_of(*REQUEST_STRATEGIES.values())


@st.composite
def chunked(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """`data` cut at arbitrary points (empty chunks included: a read can return little)."""
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=20)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def feed_all(splitter: FrameSplitter, chunks: list[bytes]) -> list[bytes]:
    frames: list[bytes] = []
    for chunk in chunks:
        frames.extend(splitter.feed(chunk))
    return frames


# -- requests: round trip -----------------------------------------------------------------------


def test_every_request_type_has_a_strategy() -> None:
    """A new op must get a strategy here, and so a round-trip property."""
    assert set(REQUEST_STRATEGIES) == set(REQUEST_TYPES)
    assert {str(t.__struct_config__.tag) for t in REQUEST_TYPES} == OPS


@settings(deadline=None)
@given(requests)
def test_every_request_round_trips(request: Request) -> None:
    frame = encode(request)
    assert frame.endswith(b"\n") and frame.count(b"\n") == 1
    assert decode_request(frame[:-1]) == request


@settings(deadline=None)
@given(st.lists(requests, max_size=20), st.data())
def test_frames_split_anywhere_or_merged_into_one_read_give_the_same_frames(
    batch: list[Request], data: st.DataObject
) -> None:
    stream = b"".join(encode(r) for r in batch)
    expected = [encode(r)[:-1] for r in batch]

    merged = FrameSplitter()
    assert merged.feed(stream) == expected
    assert merged.pending == 0

    split = FrameSplitter()
    assert feed_all(split, data.draw(chunked(stream))) == expected
    assert split.pending == 0
    assert [decode_request(f) for f in expected] == batch


def test_incomplete_frame_is_held_back_until_its_newline() -> None:
    splitter = FrameSplitter()
    assert splitter.feed(b'{"op":"pi') == []
    assert splitter.pending == len(b'{"op":"pi')
    assert splitter.feed(b'ng","id":1}\n{"op"') == [b'{"op":"ping","id":1}']
    assert splitter.pending == len(b'{"op"')


# -- frame size limit ---------------------------------------------------------------------------


@settings(deadline=None)
@given(st.integers(1, 64), st.data())
def test_line_of_max_plus_one_bytes_is_too_large_however_chunked(
    max_frame: int, data: st.DataObject
) -> None:
    """Refused as soon as the line outgrows the limit, before its newline (if any) arrives."""
    line = b"x" * (max_frame + 1)
    newline = data.draw(st.sampled_from([b"", b"\n"]))
    chunks = data.draw(chunked(line + newline))
    splitter = FrameSplitter(max_frame)
    received = 0
    with pytest.raises(FrameTooLarge):
        for chunk in chunks:
            splitter.feed(chunk)
            received += len(chunk)
    assert received <= max_frame, "the limit was only checked after the whole line arrived"


@settings(deadline=None)
@given(st.integers(1, 64), st.data())
def test_line_of_exactly_max_bytes_passes_however_chunked(
    max_frame: int, data: st.DataObject
) -> None:
    line = b"x" * max_frame
    splitter = FrameSplitter(max_frame)
    assert feed_all(splitter, data.draw(chunked(line + b"\n" + line + b"\n"))) == [line, line]


def test_default_limit_is_max_frame_exactly() -> None:
    chunk = 65536
    for size, too_large in ((MAX_FRAME, False), (MAX_FRAME + 1, True)):
        data = b"x" * size + b"\n"
        splitter = FrameSplitter()
        if too_large:
            with pytest.raises(FrameTooLarge, match=str(MAX_FRAME)):
                feed_all(splitter, [data[i : i + chunk] for i in range(0, len(data), chunk)])
        else:
            frames = feed_all(splitter, [data[i : i + chunk] for i in range(0, len(data), chunk)])
            assert [len(f) for f in frames] == [MAX_FRAME]


byte_streams = st.lists(
    st.one_of(st.just(b"\n"), st.binary(min_size=1, max_size=24)), max_size=30
).map(b"".join)
"""Bytes with newlines among them: lines empty, short and long, the last one unfinished."""


@settings(deadline=None)
@given(byte_streams, st.integers(1, 64), st.data())
def test_however_a_stream_is_chunked_the_splitter_sees_what_the_whole_stream_holds(
    stream: bytes, max_frame: int, data: st.DataObject
) -> None:
    """After every chunk: the frames so far are the complete lines so far, `pending` is the
    length of the unfinished line exactly, and FrameTooLarge comes with the first chunk that
    makes some line longer than the limit, never earlier."""
    splitter = FrameSplitter(max_frame)
    frames: list[bytes] = []
    seen = b""
    for chunk in data.draw(chunked(stream)):
        seen += chunk
        *complete, unfinished = seen.split(b"\n")
        if any(len(line) > max_frame for line in [*complete, unfinished]):
            with pytest.raises(FrameTooLarge):
                splitter.feed(chunk)
            return
        frames += splitter.feed(chunk)
        assert frames == complete
        assert splitter.pending == len(unfinished)


@given(byte_streams, st.data())
def test_a_discarded_unfinished_frame_leaves_nothing_behind(
    stream: bytes, data: st.DataObject
) -> None:
    splitter = FrameSplitter()
    feed_all(splitter, data.draw(chunked(stream)))
    splitter.discard()
    assert splitter.pending == 0
    assert splitter.feed(b'{"op":"ping","id":1}\n') == [b'{"op":"ping","id":1}']


def test_a_frame_fed_a_byte_at_a_time_costs_linear_time() -> None:
    """Each byte of an unfinished frame is searched and copied once: a 256 KiB frame fed one
    byte per read (262,144 feeds) takes well under a second; concatenating the held bytes on
    every feed made it quadratic, some 34 GB copied."""
    frame = b"x" * (256 << 10)
    splitter = FrameSplitter()
    started = time.perf_counter()
    for byte in range(len(frame)):
        splitter.feed(frame[byte : byte + 1])
    assert splitter.feed(b"\n") == [frame]
    assert time.perf_counter() - started < 2.0


def test_frame_too_large_is_a_bad_frame() -> None:
    """The server closes the stream on any BadFrame; an oversized line must be one."""
    assert issubclass(FrameTooLarge, BadFrame)


# -- anything at all in, only FleetErrors out ---------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=10,
)


@st.composite
def hostile_bytes(draw: st.DrawFn) -> bytes:
    """Random bytes, JSON that is not a request, and valid frames with bytes mutated."""
    kind = draw(st.sampled_from(["binary", "json", "mutated"]))
    if kind == "binary":
        return draw(st.binary(max_size=200))
    if kind == "json":
        import msgspec

        return msgspec.json.encode(draw(json_values)) + b"\n"
    frame = bytearray(encode(draw(requests)))
    for _ in range(draw(st.integers(1, 4))):
        position = draw(st.integers(0, len(frame) - 1))
        frame[position] = draw(st.integers(0, 255))
    return bytes(frame)


def _decode_everything(data: bytes, chunks: list[bytes]) -> None:
    splitter = FrameSplitter(max_frame=1000)
    for chunk in chunks:
        try:
            frames = splitter.feed(chunk)
        except FrameTooLarge:
            return
        for frame in frames:
            try:
                decode_request(frame)
            except FleetError:
                request_id_of(frame)


UTF8_ERROR_IN_STRING = b'{"op":"hello","id":1,"version":1,"client":"\xff"}\n'
DEEP_NESTING = b'{"op":"ping","id":1,"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}\n"


@settings(deadline=None)
@given(st.data())
@example(UTF8_ERROR_IN_STRING)
@example(DEEP_NESTING)
def test_any_bytes_raise_nothing_but_fleet_errors(data: st.DataObject | bytes) -> None:
    if isinstance(data, bytes):
        _decode_everything(data, [data])
        return
    stream = data.draw(hostile_bytes())
    _decode_everything(stream, data.draw(chunked(stream)))


def test_utf8_error_inside_a_string_field_is_a_bad_frame() -> None:
    with pytest.raises(BadFrame):
        decode_request(UTF8_ERROR_IN_STRING[:-1])


def test_utf8_error_inside_an_unknown_field_is_a_bad_frame() -> None:
    with pytest.raises(BadFrame):
        decode_request(b'{"op":"ping","id":1,"note":"\xff"}')


def test_deeply_nested_frame_is_a_bad_frame() -> None:
    with pytest.raises(BadFrame):
        decode_request(DEEP_NESTING[:-1])


# -- specific refusals ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "frame",
    [b"\xff\xfe\xfd", b'{"op":"ping","id":1\xff}', b"\xc3\x28", b"{\x80}"],
    ids=["garbage", "after-value", "overlong", "continuation"],
)
def test_non_utf8_frame_is_a_bad_frame(frame: bytes) -> None:
    with pytest.raises(BadFrame) as raised:
        decode_request(frame)
    assert type(raised.value) is BadFrame


@pytest.mark.parametrize(
    "frame", [b"", b"not json", b'{"op":"ping","id":1', b'{"op":"ping","id":1}}'], ids=repr
)
def test_non_json_frame_is_a_bad_frame(frame: bytes) -> None:
    with pytest.raises(BadFrame):
        decode_request(frame)


@pytest.mark.parametrize("frame", [b"42", b"[1]", b'"ping"', b"null", b"true"], ids=repr)
def test_json_that_is_not_an_object_is_a_bad_frame(frame: bytes) -> None:
    with pytest.raises(FleetError) as raised:
        decode_request(frame)
    assert isinstance(raised.value, BadFrame), raised.value


@settings(deadline=None)
@given(
    st.dictionaries(
        st.text().filter(lambda k: k not in {"op", "id", "version", "client"}),
        json_values,
        max_size=5,
    ),
    requests,
)
def test_unknown_fields_are_ignored(extra: dict[str, object], request: Request) -> None:
    import msgspec

    fields = msgspec.json.decode(encode(request))
    assert decode_request(msgspec.json.encode({**extra, **fields})) == request


@settings(deadline=None)
@given(st.text().filter(lambda op: op not in OPS), ids)
def test_unknown_op_is_named_in_the_error(op: str, request_id: int) -> None:
    """Named up to 100 characters: an error frame does not echo a huge value back."""
    import msgspec

    frame = msgspec.json.encode({"op": op, "id": request_id})
    with pytest.raises(UnknownOp) as raised:
        decode_request(frame)
    assert raised.value.details == {"op": op[:100]}
    assert repr(op[:100]) in raised.value.message
    assert request_id_of(frame) == request_id


@pytest.mark.parametrize(
    ("frame", "path"),
    [
        (b'{"op":"ping"}', "`id`"),
        (b'{"id":1}', "`op`"),
        (b'{"op":"hello","id":1}', "`version`"),
        (b'{"op":"ping","id":"1"}', "`$.id`"),
        (b'{"op":"ping","id":1.5}', "`$.id`"),
        (b'{"op":"ping","id":true}', "`$.id`"),
        (b'{"op":"hello","id":1,"version":"1"}', "`$.version`"),
        (b'{"op":"hello","id":1,"version":1,"client":7}', "`$.client`"),
        (b'{"op":5,"id":1}', "`$.op`"),
    ],
    ids=lambda value: value.decode() if isinstance(value, bytes) else None,
)
def test_missing_field_or_wrong_type_is_invalid_request_naming_the_field(
    frame: bytes, path: str
) -> None:
    with pytest.raises(InvalidRequest) as raised:
        decode_request(frame)
    assert type(raised.value) is InvalidRequest
    assert path in raised.value.message


@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        (b'{"op":"ping","id":7}', 7),
        (b'{"op":"nope","id":8}', 8),
        (b'{"op":"hello","id":9}', 9),
        (b'{"op":"ping","id":"x"}', None),
        (b"not json", None),
        (b"[1]", None),
    ],
)
def test_request_id_of_reads_the_id_when_it_is_readable(frame: bytes, expected: int | None) -> None:
    assert request_id_of(frame) == expected


# -- golden bytes -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "golden"),
    [
        (Ping(id=1), b'{"op":"ping","id":1}\n'),
        (Version(id=2), b'{"op":"version","id":2}\n'),
        (Shutdown(id=3), b'{"op":"shutdown","id":3}\n'),
        (Hello(id=4, version=1), b'{"op":"hello","id":4,"version":1}\n'),
        (
            Hello(id=5, version=1, client="fleetctl"),
            b'{"op":"hello","id":5,"version":1,"client":"fleetctl"}\n',
        ),
        (Response(id=1, ok=True, result=Empty()), b'{"id":1,"ok":true,"result":{}}\n'),
        (
            Response(id=6, ok=True, result=HelloResult(version=1, server="0.1.0", pid=42)),
            b'{"id":6,"ok":true,"result":{"version":1,"server":"0.1.0","pid":42}}\n',
        ),
        (
            error_response(None, "bad_frame", "malformed frame"),
            b'{"id":null,"ok":false,"error":{"code":"bad_frame","message":"malformed frame"}}\n',
        ),
        (
            error_response(3, "unknown_op", "unknown op 'nope'", op="nope"),
            b'{"id":3,"ok":false,"error":{"code":"unknown_op","message":"unknown op \'nope\'",'
            b'"details":{"op":"nope"}}}\n',
        ),
        (
            Hello(id=1, version=1, client="caf\u00e9 \u2603"),
            '{"op":"hello","id":1,"version":1,"client":"caf\u00e9 \u2603"}\n'.encode(),
        ),
    ],
    ids=lambda value: value.decode().strip() if isinstance(value, bytes) else None,
)
def test_golden_bytes(message: Request | Response, golden: bytes) -> None:
    assert encode(message) == golden
    if isinstance(message, Response):
        batch = bytearray(b"previous\n")
        encode_response(message, batch)
        assert bytes(batch) == b"previous\n" + golden


def test_protocol_version_is_pinned() -> None:
    """Bumping it is an incompatible change: do it on purpose, and update this test."""
    assert PROTOCOL_VERSION == 1
    assert MAX_FRAME == 1 << 20


def test_no_frame_contains_a_raw_newline() -> None:
    """The framing relies on compact JSON escaping every newline inside strings."""
    frame = encode(Hello(id=1, version=1, client="a\nb\r\n\u2028"))
    assert frame.count(b"\n") == 1
    assert decode_request(frame[:-1]).client == "a\nb\r\n\u2028"  # type: ignore[attr-defined]


# -- responses ----------------------------------------------------------------------------------


@settings(deadline=None)
@given(ids, st.text(), st.text(), st.dictionaries(st.text(), json_values, max_size=3))
def test_error_response_round_trips(
    request_id: int, code: str, message: str, details: dict[str, object]
) -> None:
    frame = encode(error_response(request_id, code, message, **details))
    decoded = decode_response(frame[:-1])
    assert decoded.id == request_id and decoded.ok is False
    assert decoded.error == ErrorBody(code=code, message=message, details=details)


@pytest.mark.parametrize(
    "frame", [b"", b"nope", b"[]", b'{"ok":true}', b'{"id":"1","ok":true}', b'{"id":1}']
)
def test_malformed_response_is_a_bad_frame(frame: bytes) -> None:
    with pytest.raises(BadFrame):
        decode_response(frame)


def test_response_ignores_unknown_fields() -> None:
    response = decode_response(b'{"id":1,"ok":true,"result":{},"trace":"abc"}')
    assert response.id == 1 and response.ok and bytes(response.result) == b"{}"


# -- error codes and exit codes -----------------------------------------------------------------

BRIEF_EXIT_CODES = {
    "acquired": 0, "already_acquired": 0, "renewed": 0, "released": 0, "already_released": 0,
    "connected": 0, "ok": 0, "error": 1, "usage": 2, "not_owned": 10, "not_enabled": 10,
    "absent": 11, "contested": 12, "timeout": 13, "unavailable": 14, "incompatible": 15,
}  # fmt: skip
"""The table in BRIEF.md "Outcomes and exit codes", copied by hand: it is a public contract.
`renewed` comes from the brief's Leases section (heartbeat -> renewed | not_owned)."""

BRIEF_ERROR_EXITS = {
    "error": 1, "bad_frame": 1, "frame_too_large": 1, "unknown_op": 1, "invalid_request": 1,
    "unsupported": 1, "internal": 1, "no_space": 1, "already_running": 1, "closed": 1,
    "permission_denied": 1, "limit_exceeded": 1, "not_owned": 10, "not_enabled": 10,
    "absent": 11, "contested": 12, "timeout": 13, "unavailable": 14, "connection_lost": 14,
    "store_unavailable": 14, "incompatible": 15,
}  # fmt: skip
"""Each wire code and its exit code, from the tree in protocol/errors.py and the brief's table."""


def test_outcome_exit_codes_match_the_brief() -> None:
    assert {outcome.value: outcome.exit_code for outcome in Outcome} == BRIEF_EXIT_CODES
    assert set(EXIT_CODES) == set(Outcome)


def test_every_error_class_has_a_unique_code() -> None:
    classes = _all_subclasses(FleetError)
    codes = [cls.code for cls in classes]
    assert len(codes) == len(set(codes)), codes
    assert set(ERRORS_BY_CODE.values()) == set(classes)


def test_every_error_class_exits_as_its_outcome_does_in_the_brief() -> None:
    for cls in ERRORS_BY_CODE.values():
        assert cls.outcome.exit_code == BRIEF_EXIT_CODES[cls.outcome.value], cls


@pytest.mark.parametrize(("code", "exit_code"), sorted(BRIEF_ERROR_EXITS.items()))
def test_stable_error_codes_keep_their_class_and_exit_code(code: str, exit_code: int) -> None:
    """Codes are never reused or removed; new ones may appear (and are checked above)."""
    assert code in ERRORS_BY_CODE
    assert ERRORS_BY_CODE[code].outcome.exit_code == exit_code


@pytest.mark.parametrize("code", sorted(ERRORS_BY_CODE))
def test_error_for_code_rebuilds_the_class(code: str) -> None:
    error = error_for_code(code, "it failed", {"server_version": 2})
    assert type(error) is ERRORS_BY_CODE[code]
    assert error.code == code
    assert error.message == "it failed" and str(error) == "it failed"
    assert error.details == {"server_version": 2}


def test_error_for_unknown_code_is_a_plain_fleet_error_keeping_the_code() -> None:
    error = error_for_code("from_the_future", "newer fleetd", None)
    assert type(error) is FleetError
    assert error.details == {"code": "from_the_future"}
    assert error.outcome is Outcome.ERROR


def test_connection_lost_is_unavailable() -> None:
    """Scripts that retry on exit 14 also retry a dropped connection."""
    assert issubclass(ConnectionLost, ERRORS_BY_CODE["unavailable"])
