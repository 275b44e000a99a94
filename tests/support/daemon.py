"""``tally daemon`` as a subprocess on loopback (the one way tests start a serving daemon), and a
:class:`Daemon` in this process whose rounds a test runs by hand.

Output goes to files (no pipe can fill and stall the daemon); the daemon gets SIGTERM from the
kernel if the test process dies, so none outlives a killed run.
"""

from __future__ import annotations

import http.client
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from telemetry.config import DaemonConfig
from telemetry.daemon import Daemon
from tests.support.net import free_port

NORMAL_HOST = Path(__file__).resolve().parent.parent / "fixtures" / "normal_host"

# Runs the rest of argv in the same process (same pid) after asking the kernel to SIGTERM it when
# the test process dies (PR_SET_PDEATHSIG survives exec).
DIE_WITH_PARENT = [
    sys.executable, "-c",
    "import ctypes, os, signal, sys; ctypes.CDLL(None).prctl(1, signal.SIGTERM); "
    "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])",
]  # fmt: skip

STARTUP_TIMEOUT = 30.0


class DaemonProcess:
    """``tally GLOBAL_FLAGS daemon --listen 127.0.0.1:<free port> --data-dir DATA --interval I
    --node N FLAGS``.

    Logs land in ``logs/daemon-<port>.{out,err}``. With ``wait`` (default) the constructor
    returns once the daemon says it serves, and raises ``AssertionError`` with its stderr if it
    exits first or takes longer than ``STARTUP_TIMEOUT``.
    """

    def __init__(
        self,
        data: Path,
        logs: Path,
        node: str = "test",
        interval: float = 0.2,
        flags: tuple[str, ...] = (),
        wait: bool = True,
        global_flags: tuple[str, ...] = (),
    ) -> None:
        self.port = free_port()
        self.interval = interval
        logs.mkdir(parents=True, exist_ok=True)
        self.stdout_path = logs / f"daemon-{self.port}.out"
        self.stderr_path = logs / f"daemon-{self.port}.err"
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(
                [*DIE_WITH_PARENT, "-m", "telemetry.cli", *global_flags, "daemon",
                 "--listen", f"127.0.0.1:{self.port}", "--data-dir", str(data),
                 "--interval", f"{interval:g}", "--node", node, *flags],
                stdout=out, stderr=err,
            )  # fmt: skip
        self.pid = self.proc.pid
        if wait:
            self.wait_banner()

    # ------------------------------------------------------------ start and stop
    def banner(self) -> str:
        """The daemon's first stdout line so far ('' before it is written)."""
        text = self.stdout_path.read_text(errors="replace")
        return text.splitlines()[0] if "\n" in text else ""

    def banner_seen(self) -> bool:
        return f"://127.0.0.1:{self.port}/metrics" in self.banner()

    def wait_banner(self, timeout: float = STARTUP_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.banner_seen():
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.01)
        self.kill()
        raise AssertionError(f"daemon did not start: {self.banner()!r}\n{self.stderr()}")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def terminate(self, timeout: float = 15) -> tuple[int | None, float]:
        """SIGTERM; (exit code or None if it outlived ``timeout``, seconds it took)."""
        start = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code: int | None = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        return code, time.monotonic() - start

    def stop(self) -> None:
        """SIGTERM and require exit 0 (the daemon's clean shutdown)."""
        code, _ = self.terminate()
        if code is None:
            self.kill()
        assert code == 0, f"daemon exited {code}:\n{self.stderr()}"

    def kill(self) -> None:
        """SIGKILL unless it has exited; waits for it."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def __enter__(self) -> DaemonProcess:
        return self

    def __exit__(self, *_: object) -> None:
        self.kill()

    # ------------------------------------------------------------ scrapes
    def scrape(self, timeout: float = 5, accept: str | None = None) -> bytes:
        """One GET of /metrics over plain HTTP (with ``accept`` as the Accept header); asserts
        status 200."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("GET", "/metrics", headers={"Accept": accept} if accept else {})
            resp = conn.getresponse()
            body = resp.read()
            assert resp.status == 200, resp.status
            return body
        finally:
            conn.close()

    def value(self, name: str, **labels: str) -> float:
        """The value of the first sample ``name`` with ``labels``; ``KeyError`` if none."""
        for family in text_string_to_metric_families(self.scrape().decode()):
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    return float(s.value)
        raise KeyError(name)

    def rows(self) -> tuple[float, float]:
        """(rows written, monotonic time of the scrape that read them)."""
        before = time.monotonic()
        rows = self.value("tally_store_rows_written_total")
        return rows, (before + time.monotonic()) / 2

    def wait_rows(self, at_least: int, timeout: float = 20) -> float:
        """Scrape until at least ``at_least`` rows are written; returns how many."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rows = self.rows()[0]
            if rows >= at_least:
                return rows
            time.sleep(0.1)
        raise TimeoutError(f"fewer than {at_least} rows written")

    def status_field(self, field: str) -> int:
        """A number from /proc/<pid>/status, e.g. VmRSS (KiB) or Threads."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise KeyError(field)


def scrape_daemon(data_dir: Path, node: str, *flags: str, settle: float = 1.0) -> bytes:
    """Start a daemon (0.2 s interval) with ``flags``, scrape /metrics once after ``settle``
    seconds, stop it with SIGTERM and require exit 0."""
    daemon = DaemonProcess(data_dir, data_dir.parent / "logs", node=node, flags=flags)
    try:
        time.sleep(settle)
        text = daemon.scrape()
    except BaseException:
        daemon.kill()
        raise
    daemon.stop()
    return text


@contextmanager
def daemon_in_process(
    data_dir: Path, node: str, nvml_module: str, **config: object
) -> Iterator[Daemon]:
    """A daemon on the ``normal_host`` fixture tree with the ``cpu`` and ``gpu`` collectors and
    NVML from ``nvml_module`` (MODULE:ATTR), its store open; no server, no loop: the test calls
    ``round()``. ``config`` overrides :class:`DaemonConfig` fields."""
    settings: dict[str, object] = {
        "listen": "127.0.0.1:0",
        "data_dir": data_dir,
        "procfs": NORMAL_HOST / "proc",
        "sysfs": NORMAL_HOST / "sys",
        "node": node,
        "nvml_module": nvml_module,
        "collectors": {"cpu": True, "rapl": False, "gpu": True, "job": False},
        **config,
    }
    daemon = Daemon(DaemonConfig(**settings))  # type: ignore[arg-type]
    daemon.store.open()
    try:
        yield daemon
    finally:
        daemon.runner.close()
        daemon.store.close()
