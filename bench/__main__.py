"""`python -m bench [SECTION ...]`: run the benchmarks, print a table, write results/latest.json.

With no arguments every section runs; results/latest.json holds only the sections that ran.
"""

import compileall
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import anyio

from bench import control, members
from bench.harness import Figure

RESULTS = Path(__file__).parent / "results" / "latest.json"


def _store() -> list[Figure]:
    from bench.store import measure

    figures = anyio.run(measure, backend_options={"use_uvloop": True})
    return [Figure(key, key, value) for key, value in figures.items()]


def _leases() -> list[Figure]:
    from bench.leases import measure

    return measure()


def _bounds() -> list[Figure]:
    from bench.bounds import measure

    return measure()


def _claims() -> list[Figure]:
    from bench.claims import measure

    return measure()


def _clusters() -> list[Figure]:
    from bench.clusters import measure

    return measure()


def _holders() -> list[Figure]:
    from bench.holders import measure

    return measure()


def _etcd() -> list[Figure]:
    from bench.etcd import measure

    return measure()


def _tasks() -> list[Figure]:
    from bench.tasks import measure

    return measure()


SECTIONS: dict[str, Callable[[], list[Figure]]] = {
    "control": control.measure,
    "store": _store,
    "leases": _leases,
    "claims": _claims,
    "members": members.measure,
    "bounds": _bounds,
    "clusters": _clusters,
    "holders": _holders,
    "etcd": _etcd,
    "tasks": _tasks,
}


def _byte_compile() -> None:
    """An installed package ships compiled modules; the editable checkout may have none
    (PYTHONDONTWRITEBYTECODE), which would charge source compilation to every CLI start."""
    root = Path(__file__).parent.parent
    for package in ("fleetd", "fleetctl", "protocol"):
        compileall.compile_dir(root / package, quiet=1)


def main(argv: list[str]) -> int:
    unknown = [name for name in argv if name not in SECTIONS]
    if unknown:
        print(
            f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}",
            file=sys.stderr,
        )
        return 2
    _byte_compile()
    results = {}
    for name in argv or SECTIONS:
        print(f"running {name}…", file=sys.stderr, flush=True)
        started = time.perf_counter()
        figures = SECTIONS[name]()
        print(_table(name, figures, time.perf_counter() - started), flush=True)
        results[name] = {figure.key: _as_json(figure) for figure in figures}
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"machine": _machine(), "sections": results}, indent=2) + "\n")
    print(f"wrote {RESULTS}", file=sys.stderr)
    return 0


def _table(section: str, figures: list[Figure], seconds: float) -> str:
    lines = [
        f"\n== {section} ({seconds:.0f} s)",
        f"{'figure':<36} {'value':>12}  {'unit':<6} {'target':>10}",
    ]
    for f in figures:
        lines.append(
            f"{f.label:<36} {_number(f.value):>12}  {f.unit:<6} "
            f"{f.target or ''!s:>10}  {f.verdict}".rstrip()
        )
    return "\n".join(lines)


def _number(value: float) -> str:
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"


def _as_json(figure: Figure) -> dict[str, object]:
    entry: dict[str, object] = {"value": figure.value, "unit": figure.unit, "label": figure.label}
    if figure.target is not None:
        entry |= {"target": str(figure.target), "pass": figure.target.met(figure.value)}
    return entry


def _machine() -> dict[str, object]:
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
