"""DirectoryWatch: which watched directories had an entry added, removed or renamed (inotify)."""

from __future__ import annotations

import gc
import os
import struct
from pathlib import Path

import pytest

from telemetry.collectors import watch as watch_module
from telemetry.collectors.watch import IN_Q_OVERFLOW, DirectoryWatch


def _watches(watch: DirectoryWatch) -> int:
    """Watches the kernel holds for the instance (its fdinfo lists one line each)."""
    info = Path(f"/proc/self/fdinfo/{watch.fd}").read_text()
    return sum(line.startswith("inotify wd:") for line in info.splitlines())


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
    assert opened.add(str(a)) == opened.add(str(b)) == "new"
    assert opened.add(str(a)) == "kept"
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
    assert opened.add(str(a)) == opened.add(str(b)) == "new"
    a.rmdir()
    os.rename(b, tmp_path / "c")
    assert opened.changed() == {str(a), str(b)}
    assert not opened.watching(str(a)) and not opened.watching(str(b))
    assert _watches(opened) == 0, "no watch left on the moved directory"
    b.mkdir()  # a new directory of the old name: watched again only when added again
    (b / "x").write_text("x")
    assert opened.changed() == set()
    assert opened.add(str(b)) == "new"
    (b / "y").write_text("y")
    assert opened.changed() == {str(b)}
    opened.close()


def test_a_name_made_again_is_new_to_add_even_unannounced(
    tmp_path: Path, opened: DirectoryWatch
) -> None:
    """cgroupfs tells a directory's own watch nothing of its removal: asking for the name again
    finds another inode, and says so."""
    a = tmp_path / "a"
    a.mkdir()
    assert opened.add(str(a)) == "new"
    a.rmdir()
    a.mkdir()  # the queue is not read in between, as if no event had come
    assert opened.add(str(a)) == "new"
    assert opened.add(str(a)) == "kept"
    assert _watches(opened) == 1
    opened.close()


def test_an_overflowed_queue_tells_nothing_and_starts_afresh(
    tmp_path: Path, opened: DirectoryWatch, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel dropped events: any directory may have changed, so none is watched any more
    (the caller asks every file and adds the directories again)."""
    assert opened.add(str(tmp_path)) == "new"
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
    assert opened.add(str(tmp_path)) == "new"
    (tmp_path / "x").write_text("x")
    assert opened.changed() == {str(tmp_path)}
    opened.close()


def test_a_watch_dropped_unclosed_closes_its_descriptor(tmp_path: Path) -> None:
    watch = DirectoryWatch.open()
    if watch is None:
        pytest.skip("no inotify here")
    fd = watch.fd
    assert watch.add(str(tmp_path)) == "new"
    del watch
    gc.collect()
    assert (
        not os.path.exists(f"/proc/self/fd/{fd}")
        or os.readlink(f"/proc/self/fd/{fd}") != "anon_inode:inotify"
    )


def test_without_libc_there_is_no_watch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(watch_module, "_library", lambda: None)
    assert DirectoryWatch.open() is None


def test_a_path_that_is_not_a_directory_is_not_watched(
    tmp_path: Path, opened: DirectoryWatch
) -> None:
    (tmp_path / "file").write_text("x")
    assert opened.add(str(tmp_path / "file")) == "failed"
    assert opened.add(str(tmp_path / "missing")) == "failed"
    assert not opened.watching(str(tmp_path / "file"))
    opened.close()
