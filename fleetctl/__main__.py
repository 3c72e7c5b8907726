"""Entry point of the `fleetctl` command."""

import sys

TYPE_CHECKING = False  # typing itself costs the fast path 3 ms
if TYPE_CHECKING:
    from fleetctl._fast import Command


def main() -> None:
    argv = sys.argv[1:]
    from fleetctl import _fast

    command = _fast.parse(argv)
    if command is not None and not _shows_progress(command):
        _fast.exit_now(_fast.run(command))
    from fleetctl.cli import run

    sys.exit(run(argv))


def _shows_progress(command: "Command") -> bool:
    """A wait on a terminal shows its pending members (fleetctl.progress): click's path."""
    waits = command.name == "wait" or (command.name == "up" and command.params.get("wait"))
    return bool(waits) and sys.stderr.isatty()


if __name__ == "__main__":
    main()
