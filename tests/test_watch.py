"""DirectoryWatch: which watched directories had an entry added, removed or renamed (inotify)."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from telemetry.collectors import watch as watch_module
from telemetry.collectors.watch import IN_Q_OVERFLOW, DirectoryWatch


@pytest.fixture
def opened() -> DirectoryWatch:
    watch = DirectoryWatch.open()
    if watch is None:
        pytest.skip("no inotify here")
    return watch


def test_entries_added_removed_or_renamed_are_told_once(
    tmp_path: Path, opened: DirectoryWatch
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "cpu.stat").write_text("1\n")
    assert opened.add(str(a)) and opened.add(str(b))
    assert opened.changed() == set()
    (a / "cpu.stat").write_text("2\n")  # rewritten in place: the same file, nothing to tell
    assert opened.changed() == set()
    (a / "new").write_text("x")
    os.replace(a / "new", a / "cpu.stat")
    assert opened.changed() == {str(a)}
    assert opened.changed() == set()
    (b / "x").write_text("x")
    (b / "x").unlink()
    assert opened.changed() == {str(b)}
    opened.close()


def test_a_directory_removed_or_moved_away_is_no_longer_watched(
    tmp_path: Path, opened: DirectoryWatch
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    assert opened.add(str(a)) and opened.add(str(b))
    a.rmdir()
    os.rename(b, tmp_path / "c")
    assert opened.changed() == {str(a), str(b)}
    assert not opened.watching(str(a)) and not opened.watching(str(b))
    b.mkdir()  # a new directory of the old name: watched again only when added again
    (b / "x").write_text("x")
    assert opened.changed() == set()
    assert opened.add(str(b))
    (b / "y").write_text("y")
    assert opened.changed() == {str(b)}
    opened.close()


def test_an_overflowed_queue_tells_nothing_and_starts_afresh(
    tmp_path: Path, opened: DirectoryWatch, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel dropped events: any directory may have changed, so none is watched any more
    (the caller asks every file and adds the directories again)."""
    assert opened.add(str(tmp_path))
    old_fd = opened.fd
    real_read = os.read
    overflow = struct.pack("iIII", -1, IN_Q_OVERFLOW, 0, 0)

    def read(fd: int, size: int) -> bytes:
        if fd == old_fd:
            monkeypatch.setattr(os, "read", real_read)
            return overflow
        return real_read(fd, size)

    monkeypatch.setattr(os, "read", read)
    assert opened.changed() is None
    assert not opened.watching(str(tmp_path))
    assert opened.fd >= 0  # a new instance
    assert opened.add(str(tmp_path))
    (tmp_path / "x").write_text("x")
    assert opened.changed() == {str(tmp_path)}
    opened.close()


def test_without_libc_there_is_no_watch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(watch_module, "_library", lambda: None)
    assert DirectoryWatch.open() is None


def test_a_path_that_is_not_a_directory_is_not_watched(
    tmp_path: Path, opened: DirectoryWatch
) -> None:
    (tmp_path / "file").write_text("x")
    assert not opened.add(str(tmp_path / "file"))
    assert not opened.add(str(tmp_path / "missing"))
    assert not opened.watching(str(tmp_path / "file"))
    opened.close()
