"""What a member runs with: the environment it inherits, its resource limits and its user.

A detached member (under fleetd) inherits what a systemd service would, not fleetd's whole
environment: PATH, the locale (LANG, LANGUAGE, LC_*), and HOME, USER, LOGNAME and SHELL of the
user it runs as. A bound member (a test suite's cluster) inherits its client's environment, as
a subprocess would, with HOME, USER, LOGNAME and SHELL replaced only when it has a `user`. Its
`env_file`, its `env` and fleet's own variables (fleetd.holder.members) go over either.

Its limits are those the holder started with, as a service's are the manager's defaults: the
holder raises its own open-file limit (fleetd.core.startup.raise_fd_limit), and fleetd its, so
a member is given back the soft limit fleetd (detached; MEMBER_NOFILE_ENV) or the client
(bound) had; then its `limits` over those. Only a limit that differs from the holder's own is
set in the member's process (fleetd.holder.spawn.Setup), so that restoring the default costs
each member one prlimit64.

A `user` or `group` needs a root holder; a holder of another user refuses one that is not its
own, when the cluster comes up or the member is added, rather than run it as itself. The
runtime directory stays the holder's alone (0700), so a member of another user cannot reach
its `{dir}`; its NOTIFY_SOCKET is in the abstract namespace instead (Holder.notify_address).
Its output still comes through the pipes it inherited, into its logs (the pipes are its
user's: fleetd.holder.spawn gives them).
"""

import grp
import os
import pwd
import resource
from dataclasses import dataclass

from fleetd.core.startup import MEMBER_NOFILE_ENV
from fleetd.holder.spawn import NO_SETUP, Credentials, Setup
from protocol.definitions import RLIMITS, MemberSpec
from protocol.errors import FleetError

INHERITED = ("PATH", "LANG", "LANGUAGE")
INHERITED_PREFIXES = ("LC_",)
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin"
"""A detached member's PATH when fleetd has none: systemd's for its services."""

_RLIMIT_LOCKS = 10
"""RLIMIT_LOCKS, which Python's resource module lacks (asm-generic's number)."""
_RLIMITS = {
    name: _RLIMIT_LOCKS if name == "locks" else getattr(resource, f"RLIMIT_{name.upper()}")
    for name in RLIMITS
}
_RLIM_CEILING = 2**64
"""A limit's order, infinity (-1) last."""


@dataclass(frozen=True, slots=True)
class RunEnv:
    """A member's: the environment under its env_file and env, and its spawn's Setup."""

    environment: dict[str, str]
    setup: Setup


class RunEnvs:
    """The holder's member environments, made once per distinct user and limits."""

    def __init__(self, *, inherit: bool, member_nofile: int) -> None:
        """`inherit`: the holder's whole environment (bound mode), else the minimal one;
        `member_nofile`: the soft open-file limit members get unless they set theirs."""
        self._inherit = inherit
        self._environ = dict(os.environ)
        self._defaults = {resource.RLIMIT_NOFILE: member_nofile}
        self._known: dict[tuple[object, ...], RunEnv] = {}

    def of(self, spec: MemberSpec) -> RunEnv:
        """Raises FleetError naming the member when its user or limits cannot be had."""
        key = (spec.user, spec.group, tuple((k, tuple(v)) for k, v in spec.limits.items()))
        known = self._known.get(key)
        if known is None:
            try:
                known = self._known[key] = self._made(spec)
            except FleetError as exc:
                raise FleetError(f"member {spec.name!r}: {exc.message}") from None
        return known

    def _made(self, spec: MemberSpec) -> RunEnv:
        account, credentials = _credentials(spec.user, spec.group)
        limits = self._limits(spec.limits)
        setup = NO_SETUP if not limits and credentials is None else Setup(limits, credentials)
        return RunEnv(self._environment(account, spec.user is not None), setup)

    def _environment(self, account: "_Account", has_user: bool) -> dict[str, str]:
        if self._inherit:
            env = dict(self._environ)
            if has_user:
                env.update(account.variables())
            return env
        env = {
            key: value
            for key, value in self._environ.items()
            if key in INHERITED or key.startswith(INHERITED_PREFIXES)
        }
        env.setdefault("PATH", DEFAULT_PATH)
        env.update(account.variables())
        return env

    def _limits(self, written: dict[str, list[int]]) -> tuple[tuple[int, int, int], ...]:
        """The limits to set: the defaults and `written`, where they differ from ours."""
        wanted = {r: (soft, resource.getrlimit(r)[1]) for r, soft in self._defaults.items()}
        wanted |= {_RLIMITS[name]: (soft, hard) for name, (soft, hard) in written.items()}
        limits = []
        for name, r in _RLIMITS.items():
            if r not in wanted or wanted[r] == resource.getrlimit(r):
                continue
            soft, hard = wanted[r]
            if r == resource.RLIMIT_NOFILE and hard % _RLIM_CEILING > _nr_open():
                raise FleetError(
                    f"limits.nofile: {_shown(hard)} is above the kernel's most open files "
                    f"(fs.nr_open, {_nr_open()})"
                )
            ours = resource.getrlimit(r)[1]
            if hard % _RLIM_CEILING > ours % _RLIM_CEILING and not may_raise_hard_limits():
                raise FleetError(
                    f"limits.{name}: hard limit {_shown(hard)} is above the holder's "
                    f"{_shown(ours)}, which it may not raise (that takes CAP_SYS_RESOURCE)"
                )
            limits.append((r, soft, hard))
        return tuple(limits)


_CAP_SYS_RESOURCE = 24


def may_raise_hard_limits() -> bool:
    """Whether we hold CAP_SYS_RESOURCE: root does, but not in a container that dropped it."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"CapEff:"):
                    return bool(int(line.split()[1], 16) >> _CAP_SYS_RESOURCE & 1)
    except OSError:
        pass
    return os.geteuid() == 0


def _nr_open() -> int:
    """The kernel's ceiling on an open-file limit, root's included."""
    try:
        with open("/proc/sys/fs/nr_open", "rb") as f:
            return int(f.read())
    except (OSError, ValueError):
        return _RLIM_CEILING


def _shown(limit: int) -> str:
    return "infinity" if limit == resource.RLIM_INFINITY else str(limit)


@dataclass(frozen=True, slots=True)
class _Account:
    name: str
    home: str
    shell: str

    def variables(self) -> dict[str, str]:
        return {"HOME": self.home, "USER": self.name, "LOGNAME": self.name, "SHELL": self.shell}


def _credentials(user: str | None, group: str | None) -> tuple[_Account, Credentials | None]:
    """The member's account, and the Credentials to switch to (None: the holder's own)."""
    euid, egid = os.geteuid(), os.getegid()
    entry = _own_entry(euid) if user is None else _user_entry(user)
    uid = euid if user is None else entry.pw_uid if entry is not None else int(user)
    gid: int | None = egid if user is None else entry.pw_gid if entry is not None else None
    if group is not None:
        gid = _group_id(group)
    if gid is None:
        raise FleetError(f"user {user} is not in the user database: give its group too")
    account = _account(entry, uid)
    if user is None and group is None:
        return account, None
    if euid != 0:
        if uid != euid or gid != egid:
            who = f"user {user!r}" if uid != euid else f"group {group!r}"
            raise FleetError(
                f"{who}: the holder runs as uid {euid}, not as root, "
                "and cannot run a member as another user or group"
            )
        return account, None
    groups = os.getgrouplist(entry.pw_name, gid) if entry is not None and user else [gid]
    return account, Credentials(uid, gid, tuple(groups))


def _user_entry(user: str) -> pwd.struct_passwd | None:
    """The user's passwd entry; None for a uid that has none."""
    try:
        return pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except KeyError:
        if user.isdigit():
            return None
        raise FleetError(f"no such user: {user!r}") from None


def _own_entry(uid: int) -> pwd.struct_passwd | None:
    try:
        return pwd.getpwuid(uid)
    except KeyError:
        return None


def _account(entry: pwd.struct_passwd | None, uid: int) -> _Account:
    if entry is None:
        return _Account(name=str(uid), home="/", shell="/bin/sh")
    return _Account(name=entry.pw_name, home=entry.pw_dir or "/", shell=entry.pw_shell or "/bin/sh")


def _group_id(group: str) -> int:
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise FleetError(f"no such group: {group!r}") from None


def member_nofile(started_with: int) -> int:
    """The soft open-file limit members get: fleetd's as it started (MEMBER_NOFILE_ENV, taken
    out of our environment so that no member inherits it), else ours as we started."""
    given = os.environ.pop(MEMBER_NOFILE_ENV, "")
    return int(given) if given.isdigit() else started_with
