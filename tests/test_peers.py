"""FLEET_PEERS: every sibling's address but the member's own, whatever the names."""

from hypothesis import given
from hypothesis import strategies as st

from fleetd.holder.program import Peers

names = st.from_regex(r"[a-z0-9][a-z0-9._-]{0,8}", fullmatch=True)
addresses = st.from_regex(r"(127\.0\.0\.1:[0-9]{1,5})?", fullmatch=True)


@given(st.dictionaries(names, addresses, max_size=8), names)
def test_peers_are_every_sibling_but_the_member_itself(members: dict[str, str], name: str) -> None:
    expected = ",".join(f"{n}={a}" for n, a in members.items() if n != name)
    assert Peers(members).without(name) == expected
