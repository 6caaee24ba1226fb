"""The file-system module: files appear whole or not at all."""

from __future__ import annotations

import os

import pytest

from jobs.storage import atomic_file


def write_half_then_fail(destination):
    with atomic_file(destination) as out:
        out.write(b"half")
        raise RuntimeError("the disk caught fire")


def test_atomic_file_leaves_nothing_when_the_writer_fails(tmp_path):
    destination = tmp_path / "a.zip"
    with pytest.raises(RuntimeError, match="caught fire"):
        write_half_then_fail(destination)
    assert list(tmp_path.iterdir()) == []


def test_atomic_file_keeps_the_old_file_when_the_rename_fails(tmp_path):
    destination = tmp_path / "a.zip"
    destination.mkdir()
    with pytest.raises(OSError, match="directory"), atomic_file(destination) as out:
        out.write(b"a")
    assert [path.name for path in tmp_path.iterdir()] == ["a.zip"]
    assert destination.is_dir()


def test_atomic_file_passes_a_full_disk_on_and_leaves_nothing(tmp_path, monkeypatch):
    def no_space(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    destination = tmp_path / "out" / "a.zip"
    with pytest.raises(OSError, match="No space left"), atomic_file(destination) as out:
        out.write(b"data")
    assert not destination.parent.exists(), "a folder made for it goes too"


def test_atomic_file_creates_the_folder_and_replaces_an_old_file(tmp_path):
    destination = tmp_path / "deep" / "er" / "a.zip"
    with atomic_file(destination) as out:
        out.write(b"old")
    with atomic_file(destination) as out:
        out.write(b"hello")
    assert destination.read_bytes() == b"hello"
    assert [path.name for path in destination.parent.iterdir()] == ["a.zip"]
