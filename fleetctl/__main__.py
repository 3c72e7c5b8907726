"""Entry point of the `fleetctl` command."""

import sys


def main() -> None:
    sys.exit(_run(sys.argv[1:]))


def _run(argv: list[str]) -> int:
    from fleetctl import _fast

    fast = _fast.parse(argv)
    if fast is not None:
        return _fast.run(*fast)
    from fleetctl.cli import run

    return run(argv)


if __name__ == "__main__":
    main()
