"""Where the control socket and state live, from the environment alone."""

from protocol.paths import (
    SYSTEM_SOCKET,
    client_socket_path,
    control_socket_path,
    socket_path_problem,
    state_dir_path,
)


def test_fleet_socket_wins_over_everything() -> None:
    env = {"FLEET_SOCKET": "/x/f.sock", "XDG_RUNTIME_DIR": "/run/user/1"}
    assert control_socket_path(env) == "/x/f.sock"
    assert client_socket_path(env, lambda path: path == SYSTEM_SOCKET) == "/x/f.sock"


def test_daemon_listens_in_the_users_runtime_dir() -> None:
    assert (
        control_socket_path({"XDG_RUNTIME_DIR": "/run/user/1"}) == "/run/user/1/fleet/fleetd.sock"
    )


def test_system_socket_without_a_runtime_dir() -> None:
    assert control_socket_path({}) == "/run/fleet/fleetd.sock"


def test_client_finds_the_system_daemon_from_a_shell_with_a_runtime_dir() -> None:
    env = {"XDG_RUNTIME_DIR": "/run/user/0"}
    assert client_socket_path(env, lambda path: path == SYSTEM_SOCKET) == SYSTEM_SOCKET


def test_client_names_the_first_candidate_when_none_exists() -> None:
    env = {"XDG_RUNTIME_DIR": "/run/user/0"}
    assert client_socket_path(env, lambda path: False) == "/run/user/0/fleet/fleetd.sock"


def test_state_dir_order() -> None:
    assert state_dir_path({"FLEET_STATE_DIR": "/s", "XDG_STATE_HOME": "/h"}) == "/s"
    assert state_dir_path({"XDG_STATE_HOME": "/h"}) == "/h/fleet"
    assert state_dir_path({}) == "/var/lib/fleet"


def test_socket_path_of_107_bytes_is_accepted_and_108_refused() -> None:
    assert socket_path_problem("/" + "a" * 106) is None
    problem = socket_path_problem("/" + "a" * 107)
    assert problem is not None and "107-byte limit" in problem
