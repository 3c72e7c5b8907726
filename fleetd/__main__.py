"""The daemon's command, `fleetd` and `python -m fleetd`."""

from fleetd.core.startup import leave_rich_out


def main() -> None:
    leave_rich_out()  # before fleetd.cli imports structlog
    from fleetd.cli import main as run

    run()


if __name__ == "__main__":
    main()
