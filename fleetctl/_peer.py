"""Who answers on a unix socket, by the kernel's word: every client checks it before it sends.

A socket path is only a name: whoever could create the file (a stale directory, a mistyped
--socket, a world-writable runtime directory) answers there. fleetd checks its clients'
credentials (fleetd.core.server.admit); clients check the server's the same way, right after
connect and before writing a byte, and refuse a peer that runs neither as their own uid nor
as root. One getsockopt per connection, nothing per request.

Every client-side connection goes through `check_peer`: the async and the blocking
connections (fleetctl.connection, fleetctl.blocking), whether to fleetd (Client, SyncClient) or
to a holder (fleetctl.members_client, which fleetd follows its holders through too; a blocking
cluster's status), and fleetctl.logs to a holder. fleetctl._fast repeats these few lines, to
keep its imports down, and prints the same message.
"""

import os
import socket
import struct

from protocol.errors import PermissionDenied

_UCRED = struct.Struct("iII")
"""struct ucred: pid_t pid, uid_t uid, gid_t gid."""


def check_peer(sock: socket.socket, path: str, peer: str = "fleetd") -> None:
    """Raise PermissionDenied unless the process listening at `path`, on the other end of the
    connected `sock` (or an asyncio transport's, uvloop's PseudoSocket included), runs as this
    process's uid or as root. `peer` names it for the message ("fleetd", "the holder")."""
    pid, uid, _ = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    me = os.getuid()
    if uid not in (me, 0):
        raise PermissionDenied(refusal(peer, path, uid, pid, me))


def refusal(peer: str, path: str, uid: int, pid: int, me: int) -> str:
    return (
        f"refusing {peer} at {path}: it runs as uid {uid} (pid {pid}), "
        f"not as you (uid {me}) or root"
    )
