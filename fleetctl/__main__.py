"""Entry point of the `fleetctl` command."""

import sys


def main() -> None:
    sys.exit(_run(sys.argv[1:]))


def _run(argv: list[str]) -> int:
    from fleetctl.cli import run

    return run(argv)


if __name__ == "__main__":
    main()
