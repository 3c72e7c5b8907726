"""A task worker for tests: does what its task's instructions, a JSON plan, say.

    {"sleep": 2, "heartbeat": 0.1, "exit": 3, "result": {"kind": "fail", "summary": "x"},
     "write": {"out.txt": "hello"}, "emit": [{"state": "completed"}], "mark": "PATH"}

`mark` appends "TASK ATTEMPT PID" to PATH as the worker starts; `heartbeat` reports one every
that many seconds (through fleetd's socket, as `fleetctl events emit` would) while it sleeps;
`emit` reports those events first. Flags only, as fleetd starts a worker.
"""

import argparse
import json
import os
import sys
import time

from fleetctl.sync import SyncClient
from protocol.runs import EventEmit
from protocol.tasks import ResultMessage, format_result


def main() -> int:
    parser = argparse.ArgumentParser()
    for flag in ("run-id", "task-id", "attempt-id", "title", "workspace", "instructions-file"):
        parser.add_argument(f"--{flag}", required=True)
    args = parser.parse_args()
    with open(args.instructions_file) as file:
        text = file.read()
    plan = json.loads(text) if text.startswith("{") else {}
    if "mark" in plan:
        with open(plan["mark"], "a") as mark:
            mark.write(f"{args.task_id} {args.attempt_id} {os.getpid()} {os.getcwd()}\n")
    for name, content in plan.get("write", {}).items():
        with open(os.path.join(args.workspace, name), "w") as out:
            out.write(content)
    deadline = time.monotonic() + plan.get("sleep", 0)
    if "emit" in plan or "heartbeat" in plan:  # else it needs no fleetd (one may be restarting)
        with SyncClient(os.environ["FLEET_SOCKET"]) as client:
            for event in plan.get("emit", []):
                client.request(EventEmit, attempt_id=args.attempt_id, event=event)
            beat = plan.get("heartbeat", 1.0)
            while time.monotonic() < deadline:
                client.request(EventEmit, attempt_id=args.attempt_id, event={"state": "heartbeat"})
                time.sleep(min(beat, max(0.0, deadline - time.monotonic())))
    time.sleep(max(0.0, deadline - time.monotonic()))
    if "result" in plan:
        print(format_result(ResultMessage(**plan["result"])), flush=True)
    return int(plan.get("exit", 0))


if __name__ == "__main__":
    sys.exit(main())
