"""fleetd.core.dirs.PrivateDir's cheap paths keep its promise: never through a link."""

import os

import pytest

from fleetd.core.dirs import PrivateDir
from protocol.errors import UnsafePath


def test_make_subdir_makes_a_private_directory(tempdir: str) -> None:
    with PrivateDir.open(tempdir) as directory:
        directory.make_subdir("w")
        directory.make_subdir("w")  # there already: checked, kept
    assert os.stat(os.path.join(tempdir, "w")).st_mode & 0o777 == 0o700


def test_make_subdir_refuses_a_link_and_leaves_its_target_alone(tempdir: str) -> None:
    target = os.path.join(tempdir, "target")
    os.mkdir(target)
    os.symlink(target, os.path.join(tempdir, "w"))
    with PrivateDir.open(tempdir) as directory, pytest.raises(UnsafePath):
        directory.make_subdir("w")
    assert os.listdir(target) == []


def test_write_new_writes_a_file_or_replaces_what_is_there(tempdir: str) -> None:
    with PrivateDir.open(tempdir) as directory:
        directory.write_new("a", b"one")
        directory.write_new("a", b"two")
        assert directory.read_file("a") == b"two"


def test_write_new_replaces_a_link_not_its_target(tempdir: str) -> None:
    target = os.path.join(tempdir, "target")
    with open(target, "wb") as f:
        f.write(b"keep me")
    os.symlink(target, os.path.join(tempdir, "a"))
    with PrivateDir.open(tempdir) as directory:
        directory.write_new("a", b"mine")
        assert directory.read_file("a") == b"mine"
    with open(target, "rb") as f:
        assert f.read() == b"keep me"
