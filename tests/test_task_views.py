"""fleetd.tasks.views: a run's views are made once and served again while what they were made
of holds; never a view its task, slot or clock has outgrown."""

import time

import msgspec

from fleetd.tasks.records import TaskRecord
from fleetd.tasks.views import PAGE_BYTES, EncodedTaskList, TaskViews, fill
from protocol.runs import TaskList, TaskView
from protocol.tasks import InboxEntry

NOW = time.time()


class Maker:
    """Makes views as fleetd's task service does (the part that matters here), counting them."""

    def __init__(self) -> None:
        self.made: list[str] = []

    def __call__(self, task: TaskRecord) -> TaskView:
        self.made.append(task.task_id)
        entry = InboxEntry(run_id="r", task_id=task.task_id, priority=0, enqueued_at="t")
        waiting = task.not_before > time.time()
        return TaskView(
            entry=entry,
            state=task.state,
            error=task.error,
            not_before=str(task.not_before) if waiting else "",
        )


def records(count: int) -> list[TaskRecord]:
    return [TaskRecord(task_id=f"t{n}", priority=0, enqueued_at=NOW) for n in range(count)]


def test_views_are_made_once_while_their_records_are_unchanged() -> None:
    views, make, tasks = TaskViews(), Maker(), records(3)
    first = views.of_run("r", tasks, [], make)
    again = views.of_run("r", tasks, [], make)
    assert make.made == ["t0", "t1", "t2"]
    assert [bytes(v) for v in again] == [bytes(v) for v in first]


def test_a_changed_record_gets_a_new_view_and_only_it() -> None:
    views, make, tasks = TaskViews(), Maker(), records(3)
    views.of_run("r", tasks, [], make)
    tasks[1].state = "failed"
    tasks[1].error = "exited 3"
    after = views.of_run("r", tasks, [], make)
    assert make.made == ["t0", "t1", "t2", "t1"]
    assert b'"error":"exited 3"' in bytes(after[1])


def test_a_running_task_is_made_anew_each_time() -> None:
    views, make, tasks = TaskViews(), Maker(), records(2)
    views.of_run("r", tasks, [tasks[0]], make)
    views.of_run("r", tasks, [tasks[0]], make)
    assert make.made == ["t0", "t1", "t0"]
    views.of_run("r", tasks, [], make)  # it ended: made once more, then kept
    views.of_run("r", tasks, [], make)
    assert make.made == ["t0", "t1", "t0", "t0"]


def test_a_waiting_task_is_made_anew_until_its_backoff_ends() -> None:
    views, make, tasks = TaskViews(), Maker(), records(1)
    tasks[0].not_before = time.time() + 0.2
    waiting = views.of_run("r", tasks, [], make)
    views.of_run("r", tasks, [], make)
    assert b"not_before" in bytes(waiting[0])
    assert make.made == ["t0", "t0"]
    time.sleep(0.25)
    over = views.of_run("r", tasks, [], make)
    assert b"not_before" not in bytes(over[0])
    views.of_run("r", tasks, [], make)
    assert make.made == ["t0", "t0", "t0"]


def test_views_of_a_run_that_is_gone_are_forgotten() -> None:
    views, make, tasks = TaskViews(), Maker(), records(1)
    views.of_run("r", tasks, [], make)
    views.forget_but({"other"})
    views.of_run("r", tasks, [], make)
    assert make.made == ["t0", "t0"]


class Tables:
    """Makes a run's table of its records as they are when asked, counting the tables made."""

    def __init__(self, tasks: list[TaskRecord]) -> None:
        self.tasks = tasks
        self.made = 0

    def __call__(self) -> str:
        self.made += 1
        now = time.time()
        return "\n".join(f"{t.task_id} {t.state} {t.not_before > now}" for t in self.tasks)


def test_a_table_is_made_once_while_its_records_are_unchanged() -> None:
    views, tasks = TaskViews(), records(3)
    make = Tables(tasks)
    first = views.table_of("r", tasks, make)
    assert views.table_of("r", tasks, make) == first
    assert make.made == 1


def test_a_record_changed_in_place_makes_the_table_again() -> None:
    views, tasks = TaskViews(), records(3)
    make = Tables(tasks)
    views.table_of("r", tasks, make)
    tasks[2].state = "done"
    assert "t2 done" in views.table_of("r", tasks, make)
    assert make.made == 2


def test_a_table_is_made_again_once_a_retrys_wait_ends() -> None:
    views, tasks = TaskViews(), records(2)
    tasks[1].not_before = time.time() + 0.2
    make = Tables(tasks)
    assert "t1 queued True" in views.table_of("r", tasks, make)
    views.table_of("r", tasks, make)
    assert make.made == 1
    time.sleep(0.25)
    assert "t1 queued False" in views.table_of("r", tasks, make)
    assert make.made == 2


def test_the_table_of_a_run_that_is_gone_is_forgotten() -> None:
    views, tasks = TaskViews(), records(1)
    make = Tables(tasks)
    views.table_of("r", tasks, make)
    views.forget_but({"other"})
    views.table_of("r", tasks, make)
    assert make.made == 2


def test_a_page_holds_what_its_limit_and_a_frame_let_it() -> None:
    small = [msgspec.Raw(b'{"x":1}')] * 10
    page: list[msgspec.Raw] = []
    assert fill(page, small, 4, 0) == (4, 28)
    big = [msgspec.Raw(b'"' + b"x" * (PAGE_BYTES // 3) + b'"')] * 5
    page = []
    taken, size = fill(page, big, 5000, 0)
    assert taken == 2
    assert size <= PAGE_BYTES
    alone = [msgspec.Raw(b'"' + b"x" * PAGE_BYTES + b'"')]
    assert fill([], alone, 5000, 0)[0] == 1  # one at least, whatever its size


def test_an_encoded_task_list_is_a_task_list_on_the_wire() -> None:
    view = TaskView(
        entry=InboxEntry(run_id="r", task_id="t", priority=0, enqueued_at="t"), state="queued"
    )
    raw = msgspec.Raw(msgspec.json.encode(view))
    for tasks, after in (([], ""), ([view], ""), ([view, view], "t")):
        encoded = EncodedTaskList(tasks=[raw] * len(tasks), next=after)
        assert msgspec.json.encode(encoded) == msgspec.json.encode(
            TaskList(tasks=tasks, next=after)
        )
