"""Scoring a finished attempt into a receipt's verdict, and reading the worker's result line.

Both read files the worker wrote, so both run in a worker thread. A scorer's path is inside
the task's workspace (the run file's parser refuses one that is absolute or climbs out) and
is opened without following a symbolic link at any level under the workspace: a worker
cannot make fleetd read another file for it.
"""

import json
import os
import re
import stat
from dataclasses import dataclass

from protocol.tasks import (
    ExitCodeScorer,
    FileExistsScorer,
    JsonPathScorer,
    ManualScorer,
    RegexMatchScorer,
    ResultMessage,
    Scorer,
    TaskResult,
    evaluate_json_path,
    last_result,
)

RESULT_WINDOW = 64 * 1024
"""Bytes at the end of an attempt's output searched for its result line."""
SCORED_MAX = 16 * 1024 * 1024
"""Bytes of a scored file read at most."""


@dataclass(frozen=True)
class Verdict:
    """`result` None: a manual scorer's verdict is awaited."""

    result: TaskResult | None
    notes: str = ""


def result_line(log_path: str, offset: int) -> ResultMessage | None:
    """The last result line the attempt printed: in its stdout log after `offset` (where the
    slot's log stood when it started; all of it if the log was rotated since)."""
    try:
        with open(log_path, "rb") as log:
            size = os.fstat(log.fileno()).st_size
            start = offset if offset <= size else 0
            log.seek(max(start, size - RESULT_WINDOW))
            text = log.read().decode("utf-8", "replace")
    except OSError:
        return None
    return last_result(text)


def reads_files(scorer: Scorer | None) -> bool:
    """Whether scoring reads the workspace (then it runs in a thread)."""
    return isinstance(scorer, FileExistsScorer | RegexMatchScorer | JsonPathScorer)


def score(scorer: Scorer | None, workspace: str, exit_code: int | None) -> Verdict:
    """The verdict on an attempt that ended on its own with `exit_code` (0: it succeeded)."""
    match scorer:
        case None | ExitCodeScorer():
            return Verdict("pass" if exit_code == 0 else "fail", f"exit code {exit_code}")
        case ManualScorer():
            return Verdict(None, "awaiting a manual verdict")
        case FileExistsScorer(path=path):
            found = _read(workspace, path, want_content=False) is not None
            return Verdict(
                "pass" if found else "fail", f"{path} {'exists' if found else 'missing'}"
            )
        case RegexMatchScorer(path=path, pattern=pattern):
            content = _read(workspace, path)
            if content is None:
                return Verdict("fail", f"{path} missing")
            matched = re.search(pattern, content.decode("utf-8", "replace"), re.MULTILINE)
            return Verdict(
                "pass" if matched else "fail",
                f"/{pattern}/ {'matched' if matched else 'not found'} in {path}",
            )
        case JsonPathScorer(path=path, expression=expression):
            return _score_json(workspace, path, expression)
    raise AssertionError(f"unknown scorer {scorer!r}")


def _score_json(workspace: str, path: str, expression: str) -> Verdict:
    content = _read(workspace, path)
    if content is None:
        return Verdict("fail", f"{path} missing")
    try:
        document = json.loads(content)
    except ValueError as exc:
        return Verdict("fail", f"{path} is not JSON: {exc}")
    found, value = evaluate_json_path(document, expression)
    if not found:
        return Verdict("fail", f"{expression} selects nothing in {path}")
    return Verdict("pass" if value else "fail", f"{expression} is {json.dumps(value)[:80]}")


def _read(workspace: str, path: str, *, want_content: bool = True) -> bytes | None:
    """The file at `path` under `workspace`, never through a link; None when it is not a
    regular file there."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        return None
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(workspace, flags | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        for part in parts[:-1]:
            inner = os.open(part, flags | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = inner
        leaf = os.open(parts[-1], flags | os.O_NONBLOCK, dir_fd=fd)
    except OSError:
        os.close(fd)
        return None
    os.close(fd)
    try:
        if not _is_regular(leaf):
            return None
        return os.read(leaf, SCORED_MAX) if want_content else b""
    finally:
        os.close(leaf)


def _is_regular(fd: int) -> bool:
    return stat.S_ISREG(os.fstat(fd).st_mode)
