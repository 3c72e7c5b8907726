"""The holder template's wire: what a client (fleetctl.template) asks of a warm template
(fleetd.holder.template), and what it answers. One request, one answer, each one datagram on a
SOCK_SEQPACKET socketpair, with the descriptors it passes as SCM_RIGHTS.

    fork  ->  forked (the holder's pid, a pidfd of it attached)  |  refused (why)

A fork passes the holder's descriptors in this order: its stdin, stdout and stderr, then its
gate if `gated`, then any number to keep, which the holder finds at KEPT_FROM, KEPT_FROM + 1...
The gate is a pipe's read end: the holder runs once a line arrives there, and exits without
running at EOF (fleetd.clusters.launch.GATE does the same for an exec'd holder).
"""

import msgspec

from protocol.base import Message

MAX_TEMPLATE_MESSAGE = 1 << 20
"""Largest request or answer either side accepts, in bytes."""
MAX_FORK_FDS = 16
"""Most descriptors one fork may pass."""
KEPT_FROM = 3
"""Where a forked holder finds the first descriptor it was asked to keep."""


class TemplateRequest(Message, tag_field="op", frozen=True):
    """What a template is asked."""


class Fork(TemplateRequest, tag="fork", frozen=True):
    """Fork a holder: run the holder program's main with `argv` (its arguments, without the
    program's name), in `cwd`, with exactly the environment `env`; in a session of its own
    when `session` (a detached holder); behind the gate passed when `gated`."""

    argv: list[str]
    env: dict[str, str]
    cwd: str = "/"
    session: bool = False
    gated: bool = False

    def fds_problem(self, passed: int) -> str | None:
        """Why `passed` descriptors do not go with this request, or None when they do."""
        needed = 4 if self.gated else 3
        if passed < needed:
            return f"a fork passes at least {needed} descriptors, this one passed {passed}"
        return None


class TemplateAnswer(Message, tag_field="answer", frozen=True):
    """What a template answers."""


class Forked(TemplateAnswer, tag="forked", frozen=True):
    """The holder runs (or waits at its gate); a pidfd of it comes with this answer."""

    pid: int


class Refused(TemplateAnswer, tag="refused", frozen=True):
    """Nothing was forked: the request was malformed, or the fork failed."""

    message: str


encode = msgspec.json.Encoder().encode
decode_request = msgspec.json.Decoder(Fork).decode
decode_answer = msgspec.json.Decoder(Forked | Refused).decode
