"""KeptFiles: small kernel files kept open between rounds, and what they cost in descriptors."""

from __future__ import annotations

import gc
import os
from pathlib import Path
from typing import Any

import pytest

from telemetry.collectors.files import KeptFiles


def _open_fds() -> int:
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


def _job(root: Path, n: int) -> list[Path]:
    """A cgroup v1 job: one file in each of three controller hierarchies."""
    paths = []
    for controller, name in (("cpuset", "cpuset.cpus"), ("cpuacct", "cpuacct.usage"),
                             ("memory", "memory.usage_in_bytes")):  # fmt: skip
        directory = root / controller / f"job_{n}"
        directory.mkdir(parents=True)
        (directory / name).write_text("1\n")
        paths.append(directory / name)
    return paths


def test_a_file_that_failed_leaves_no_descriptor_or_watch_behind(tmp_path: Path) -> None:
    """On cgroup v1 a job's files sit in three directories, and one hierarchy's cgroup may go
    before the others: the file that failed is dropped, and when the job ends every
    descriptor it held is closed and none of its directories is watched any more (review
    finding: a directory's descriptor was kept until the collector closed)."""
    baseline = _open_fds()
    files = KeptFiles()
    jobs = {n: _job(tmp_path, n) for n in range(5)}
    for _ in range(2):
        files.begin_round()
        for n, paths in jobs.items():
            for path in paths:
                assert files.read(n, path) == "1\n"
    assert len(files) == 5 * 3  # three files a job
    watch = files._watch
    assert watch is not None
    assert all(watch.watching(str(path.parent)) for paths in jobs.values() for path in paths)
    for n, paths in jobs.items():
        paths[0].unlink()  # the cpuset cgroup's file is gone, its directory not yet
        files.begin_round()
        try:
            files.read(n, paths[0])
        except FileNotFoundError:
            pass
        else:
            raise AssertionError("a removed file read")
        files.keep_only({m for m in jobs if m > n})  # the job ends
    assert len(files) == 0
    assert not any(watch.watching(str(path.parent)) for paths in jobs.values() for path in paths)
    assert _open_fds() == baseline  # the watch's own descriptor too, with its last directory
    files.close()


def test_a_kept_file_past_64_kib_is_read_whole_each_round(tmp_path: Path) -> None:
    """A large host's /proc/stat passes 64 KiB (a line per CPU, one number per interrupt): a
    kept file is read whole, and stays kept, round after round."""
    path = tmp_path / "stat"
    files = KeptFiles()
    for size in (70_000, 200_000, 10):
        text = "cpu " + "1" * size + "\n"
        path.write_text(text)  # rewritten in place, as the kernel does
        files.begin_round()
        assert files.read("proc", path) == text
    assert len(files) == 1  # opened once
    files.close()


def test_a_kept_file_reads_as_a_text_mode_read(tmp_path: Path) -> None:
    """Newlines are translated as a text-mode read does, and bytes that are not UTF-8 are
    replaced, on the first read (which opens the file) and on every kept one after."""
    path = tmp_path / "odd"
    files = KeptFiles()
    for data in (b"a\r\nb\rc\n", b"x\xffy\r\n", b"plain\n"):
        path.write_bytes(data)
        files.begin_round()
        with path.open(encoding="utf-8", errors="replace") as text_mode:
            assert files.read("o", path) == text_mode.read()
    assert len(files) == 1
    files.close()


def test_a_file_past_64_kib_is_read_from_one_moment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A proc file is made afresh for every read of it: one past 64 KiB read in two pieces could
    join the start of one moment's text to the end of the next's. It is read whole, from its
    start, in one read (opened by name, and kept)."""
    path = tmp_path / "stat"
    path.write_text("x")
    moments = iter(range(10**6))
    real = os.pread
    opened: set[int] = set()

    def proc_pread(fd: int, size: int, offset: int) -> bytes:
        if fd not in opened:
            return real(fd, size, offset)
        k = next(moments)  # each read sees the file as it is now
        text = f"cpu {k}\n" + "y" * 100_000 + f"\nintr {k}\n"
        return text.encode()[offset : offset + size]

    monkeypatch.setattr(os, "pread", proc_pread)
    real_open = os.open

    def open_proc(name: Any, flags: int, *args: Any) -> int:
        fd = real_open(name, flags, *args)
        opened.add(fd)
        return fd

    monkeypatch.setattr(os, "open", open_proc)
    files = KeptFiles()
    for _ in range(3):
        files.begin_round()
        text = files.read("proc", path)
        first, last = text.splitlines()[0], text.splitlines()[-1]
        assert first.split()[1] == last.split()[1], (first, last)
        assert len(text) > 100_000
    files.close()
