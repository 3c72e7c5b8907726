"""The blocking client is generated from the async one (tests/unasync.py): it must be current,
and the two must offer the same calls with the same parameters."""

import inspect

from fleetctl.client import Client
from fleetctl.sync import SyncClient
from tests.unasync import SOURCE, TARGET, generate


def test_the_sync_client_is_generated_from_the_current_async_client() -> None:
    assert TARGET.read_text() == generate(SOURCE.read_text()), "stale: run `make unasync`"


def test_both_clients_have_the_same_calls_and_parameters() -> None:
    def calls(cls: type) -> dict[str, list[tuple[str, object, object]]]:
        renamed = {"__aenter__": "__enter__", "__aexit__": "__exit__", "aclose": "close"}
        dunders = {"__init__", "__aenter__", "__aexit__", "__enter__", "__exit__"}
        return {
            renamed.get(name, name): [
                (p.name, p.kind, p.default) for p in inspect.signature(member).parameters.values()
            ]
            for name, member in vars(cls).items()
            if callable(member) and (not name.startswith("_") or name in dunders)
        }

    assert calls(Client) == calls(SyncClient)
