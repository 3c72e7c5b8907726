"""Entry point of the `fleetctl` command."""

import sys


def main() -> None:
    argv = sys.argv[1:]
    from fleetctl import _fast

    command = _fast.parse(argv)
    if command is not None:
        _fast.exit_now(_fast.run(command))
    from fleetctl.cli import run

    sys.exit(run(argv))


if __name__ == "__main__":
    main()
