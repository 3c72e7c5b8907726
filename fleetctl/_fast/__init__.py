"""A start-up fast path for the commands that scripts and health checks run in loops.

The interpreter starts in 12 to 30 ms; importing click and msgspec would add about 40 ms more,
several times the cost of the work itself. For the commands below, spelt plainly, fleetctl
speaks the protocol here with only the C modules `_socket`, `_json` and `binascii`, and prints
exactly what the click commands print, on stdout and stderr, with the same exit codes, success
and failure alike (tests/test_fast.py runs both and compares):

    ping, version, status [NAME…]             --json or not; global --socket, --timeout
    wait NAME… [--timeout D]
    up [-f FILE] [--name N] [--wait] [--timeout D] [--idempotent]
    lease acquire|heartbeat|release|inspect   with their options
    claims acquire|release|inspect            with their options; acquire reads stdin
    runs show RUN, tasks list [--run RUN]     --json or not; tasks list pages through

Anything else (another command, an option spelt otherwise, --help, a typo) is parsed as None
and goes through click, which prints the usage error. Nothing here imports click, msgspec or
typing at run time (tests/test_layering.py runs each command and looks).

    argv        command lines read as click reads them, or None
    commands    each command: its requests, what it prints, its exit code
    wire        the control socket: one request or two at a time, answers read with _json
    tasks       task_list's pages, read without decoding every task
"""

from fleetctl._fast.argv import Command as Command
from fleetctl._fast.argv import parse as parse
from fleetctl._fast.commands import exit_now as exit_now
from fleetctl._fast.commands import run as run
