"""`fleetctl tasks list`'s table, made where the tasks are: fleetd makes it whole for one
answer (protocol.runs.TaskListRequest's `table`), and fleetctl of the cells it pages through
when the tasks do not fit one. It imports nothing but itertools: fleetctl's start-up fast
path loads neither msgspec nor typing (fleetctl._fast)."""

from itertools import repeat

TASK_COLUMNS = ("RUN", "TASK", "STATE", "ATTEMPTS", "WORKER", "RESULT", "NOTE")


def tasks_table(columns: list[list[str]]) -> str:
    """`fleetctl tasks list`'s table from its columns (one list of cells each, in
    TASK_COLUMNS' order): each cell padded to its column's widest, two spaces between, no
    space at a line's end.

    Built a column at a time, in C (a row at a time took some 10 ms for 10,000 tasks): as a
    RESULT is never blank (a result, or "-"), only a NOTE can leave space at a line's end."""
    same = [bool(column) and column.count(column[0]) == len(column) for column in columns]
    widths = [
        max(len(title), len(column[0]) if alike else max(map(len, column), default=0))
        for title, column, alike in zip(TASK_COLUMNS, columns, same, strict=True)
    ]
    header = "  ".join(t.ljust(w) for t, w in zip(TASK_COLUMNS, widths, strict=True)).rstrip()
    *padded, results, notes = columns
    count = len(results)
    stride = len(padded) + 3  # a newline, the padded cells, the result, the note's part
    cells: list[str] = [""] * (count * stride)
    cells[0::stride] = ["\n"] * count
    for at, (column, width, alike) in enumerate(zip(padded, widths, same, strict=False), start=1):
        if alike:  # one value all down: padded once
            cells[at::stride] = [column[0].ljust(width + 2)] * count
        else:
            cells[at::stride] = map(str.ljust, column, repeat(width + 2))
    cells[stride - 2 :: stride] = results
    cells[stride - 1 :: stride] = _note_parts(results, notes, widths[-2])
    return header + "".join(cells)


def _note_parts(results: list[str], notes: list[str], width: int) -> list[str]:
    """What follows each RESULT: nothing for a blank note, else the space up to the NOTE
    column and the note, without its trailing space."""
    joined = "".join(notes)
    if not joined or joined.isspace():
        return [""] * len(notes)
    return [
        " " * (width - len(result) + 2) + note.rstrip() if note.strip() else ""
        for result, note in zip(results, notes, strict=True)
    ]
