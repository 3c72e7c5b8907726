import sys

from fleetd.core.startup import leave_rich_out


def run() -> int:
    leave_rich_out()  # before the holder program imports structlog
    from fleetd.holder.program import main

    return main()


sys.exit(run())
