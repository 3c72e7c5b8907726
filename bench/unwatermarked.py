"""fleetd with its watermark never advanced: the baseline that the watermark's cost per write
is measured against (bench.leases runs both in one run). fleetd itself has no such switch."""

from fleetd.__main__ import main
from fleetd.store.watermark import Watermark


def _not_advanced(self: Watermark, floor: int, revision: int) -> None:
    return None


def _not_noted(self: Watermark, floor: int) -> None:
    return None


Watermark.advance = _not_advanced  # type: ignore[method-assign]
Watermark.note = _not_noted  # type: ignore[method-assign]
main()
