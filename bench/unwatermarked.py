"""fleetd with its watermark never advanced: the baseline that the watermark's cost per write
is measured against (bench.leases runs both in one run). fleetd itself has no such switch."""

from fleetd.__main__ import main
from fleetd.store.watermark import Watermark


def _not_written(self: Watermark, floor: int, revision: int) -> None:
    return None


Watermark.advance = _not_written  # type: ignore[method-assign]
main()
