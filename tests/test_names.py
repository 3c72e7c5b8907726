"""The one name check: member and cluster names safe in paths, lease names as store keys."""

import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.errors import InvalidRequest
from protocol.names import PATH_SAFE, STORE_KEY, NameKind, check_name

PATH_SAFE_CHARACTERS = string.ascii_lowercase + string.digits + "._-"
STORE_KEY_CHARACTERS = string.ascii_letters + string.digits + "._:@/-"


def follows(name: str, characters: str, longest: int) -> bool:
    return (
        1 <= len(name) <= longest
        and name[0].isascii()
        and name[0].isalnum()
        and all(c in characters for c in name)
    )


@given(st.from_regex(PATH_SAFE.pattern, fullmatch=True))
def test_path_safe_names_pass_as_every_kind(name: str) -> None:
    for what in ("member", "cluster", "lease"):
        assert check_name(name, what) == name


@given(st.from_regex(STORE_KEY.pattern, fullmatch=True))
def test_lease_names_pass(name: str) -> None:
    assert check_name(name, "lease") == name


@given(st.text(max_size=80) | st.text(PATH_SAFE_CHARACTERS, max_size=70))
def test_member_and_cluster_names_follow_the_written_rule(name: str) -> None:
    for what in ("member", "cluster"):
        agrees_with(name, what, follows(name, PATH_SAFE_CHARACTERS, 63))


@given(st.text(max_size=140) | st.text(STORE_KEY_CHARACTERS, max_size=140))
def test_lease_names_follow_the_written_rule(name: str) -> None:
    agrees_with(name, "lease", follows(name, STORE_KEY_CHARACTERS, 128))


def agrees_with(name: str, what: NameKind, valid: bool) -> None:
    if valid:
        assert check_name(name, what) == name
    else:
        with pytest.raises(InvalidRequest, match=f"invalid {what} name"):
            check_name(name, what)


@pytest.mark.parametrize("name", ["build/main", "deploy:prod@eu", "Upper", "a" * 128])
def test_a_lease_name_may_be_what_a_member_name_may_not(name: str) -> None:
    assert check_name(name, "lease") == name
    with pytest.raises(InvalidRequest, match="invalid member name"):
        check_name(name, "member")


@pytest.mark.parametrize("name", ["", ".", "..", ".hidden", "-x", "a b", "a\nb", "é"])
def test_no_kind_takes_these(name: str) -> None:
    for what in ("member", "cluster", "lease"):
        with pytest.raises(InvalidRequest, match=f"invalid {what} name"):
            check_name(name, what)


@pytest.mark.parametrize("name", [None, 5, b"web", ["web"]])
def test_a_name_that_is_not_a_string_is_refused(name: object) -> None:
    with pytest.raises(InvalidRequest, match="invalid member name"):
        check_name(name)


def test_the_error_says_the_rule_and_echoes_a_long_name_cut_short() -> None:
    with pytest.raises(InvalidRequest) as raised:
        check_name("Z" * 500, "cluster")
    assert "use 1 to 63 characters" in raised.value.message
    assert len(raised.value.message) < 250
    assert raised.value.details["name"] == "Z" * 80
