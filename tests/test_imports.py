from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from telemetry.blas import BLAS_THREAD_VARIABLES


def _python(
    code: str, timeout: float = 60, cwd: Path | None = None, env: dict[str, str] | None = None
) -> str:
    """What ``code`` prints, run by this interpreter in a fresh process (which must succeed)."""
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_importing_the_packages_touches_neither_cupy_nor_nvml() -> None:
    code = (
        "import sys, telemetry, kernels, exporters, telemetry.cli, telemetry.daemon, "
        "telemetry.replay, exporters.prometheus, exporters.http, kernels.backend\n"
        "roots = {m.split('.')[0] for m in sys.modules}\n"
        "bad = sorted(roots & {'cupy', 'pynvml', 'cupy_backends'})\n"
        "print(','.join(bad))\n"
    )
    assert _python(code).strip() == ""


# Records the BLAS thread variables as they stand when NumPy is first imported.
_BLAS_AT_NUMPY_IMPORT = """
import os, sys
seen = []
class Watch:
    def find_spec(self, name, path=None, target=None):
        if name == "numpy":
            seen.append([os.environ.get(v) for v in
                         ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS")])
        return None
sys.meta_path.insert(0, Watch())
"""


def _without_blas_settings() -> dict[str, str]:
    """This environment without any variable tally sets (one this process set would pass)."""
    return {k: v for k, v in os.environ.items() if k not in BLAS_THREAD_VARIABLES}


def test_the_command_line_asks_for_one_blas_thread_before_numpy_is_imported() -> None:
    """NumPy's OpenBLAS would start a spinning thread per core in the daemon, its hourly
    compactor child and every bill worker; tally multiplies no matrices."""
    code = _BLAS_AT_NUMPY_IMPORT + (
        "import telemetry.cli\nprint(seen, len(os.listdir('/proc/self/task')))\n"
    )
    assert _python(code, env=_without_blas_settings()).split() == ["[['1',", "'1',", "'1']]", "1"]


def test_an_operators_own_blas_threads_are_kept_and_the_library_sets_none() -> None:
    env = _without_blas_settings() | {"OPENBLAS_NUM_THREADS": "4"}
    code = _BLAS_AT_NUMPY_IMPORT + "import telemetry.cli\nprint(seen)\n"
    assert _python(code, env=env).strip() == "[['4', '1', '1']]"
    library = _BLAS_AT_NUMPY_IMPORT + (
        "import telemetry.daemon, telemetry.state, telemetry.api\nprint(seen)\n"
    )
    assert _python(library, env=_without_blas_settings()).strip() == "[[None, None, None]]"


def test_billing_on_workers_imports_dask_only_when_a_cluster_is_asked_for() -> None:
    """The bill's process pool needs no Dask; ``--cluster`` is the optional extra (SPEC §9)."""
    code = (
        "import sys, telemetry.cli, telemetry.commands, telemetry.executors, "
        "telemetry.billing.bill, telemetry.billing.partitioned, telemetry.billing.report\n"
        "roots = {m.split('.')[0] for m in sys.modules}\n"
        "print(','.join(sorted(roots & {'dask', 'distributed', 'tornado'})))\n"
    )
    assert _python(code).strip() == ""


# What a node daemon must not load: Arrow (it collects, journals and aggregates NumPy columns;
# compaction to Parquet runs in a child), prometheus-client (it renders both text formats
# itself), bcrypt and OpenSSL without basic-auth users or TLS, the standard HTTP server, the
# bill engine and the dataset reader behind it, the report's and the cluster's libraries, the
# kubelet client while the pod collector is off.
NOT_IN_THE_DAEMON = (
    "pyarrow",
    "prometheus_client",
    "bcrypt",
    # OpenSSL (5 MiB resident) where no TLS is configured, and http.server's baggage
    "ssl",
    "_hashlib",
    "http.server",
    "http.client",
    "email",
    "plotly",
    "polars",
    "dask",
    "distributed",
    "duckdb",
    "pandas",
    "grpc",
    "yaml",
    "zoneinfo",
    "telemetry.billing",
    "telemetry.store.dataset",
    "telemetry.replay",
    "telemetry.report",
)


def test_a_running_daemon_imports_no_billing_report_or_cluster_module(tmp_path: Path) -> None:
    """``tally daemon``'s own path (its parser, config and Daemon), three rounds on the Slurm
    fixture with the NVML stand-in and a scrape, then ``sys.modules``: the daemon's memory is
    what it imports."""
    tree = Path(__file__).resolve().parent / "fixtures" / "slurm_v2"
    argv = [
        "daemon", "--data-dir", str(tmp_path / "data"), "--node", "n1",
        "--path.procfs", str(tree / "proc"), "--path.sysfs", str(tree / "sys"),
        "--nvml.module", "tests.support.nvml.standin:NVML", "--listen", "127.0.0.1:0",
    ]  # fmt: skip
    code = (
        "import sys\n"
        "from telemetry.cli import build_parser, daemon_config\n"
        "from telemetry.daemon import Daemon\n"
        f"daemon = Daemon(daemon_config(build_parser().parse_args({argv!r})))\n"
        "daemon.store.open()\n"
        "for _ in range(3):\n"
        "    daemon.round()\n"
        "text = daemon.render_text()\n"
        "assert b'tally_gpu_info{' in text and b'tally_job_info{' in text, text[:2000]\n"
        "assert daemon.render_openmetrics().endswith(b'# EOF\\n')\n"
        # a node of many jobs: one family of 300 series still formatted without Arrow
        "from telemetry.frame import Frame\n"
        "t = daemon.runner.run().time_ns\n"
        "jobs = [dict(time=t, node='n1', job_id=str(j), user='u', account='a', "
        "cpus_allocated=1.0, gpus_allocated=0.0, cpu_seconds=1.0, memory_bytes=1) "
        "for j in range(300)]\n"
        "daemon.state.ingest('job', Frame.from_rows('job', jobs))\n"
        "daemon._published = None\n"
        "assert daemon.render_text().count(b'tally_job_info{') >= 300\n"
        "assert daemon.render_openmetrics().count(b'tally_job_info{') >= 300\n"
        "daemon.store.rotate()\n"
        "daemon.runner.close()\n"
        "daemon.store.close()\n"
        "print('\\n'.join(sorted(sys.modules)))\n"
    )
    loaded = set(_python(code, timeout=120, cwd=Path(__file__).resolve().parent.parent).split())
    assert "telemetry.daemon" in loaded and "numpy" in loaded
    bad = sorted(
        m for m in loaded if any(m == n or m.startswith(n + ".") for n in NOT_IN_THE_DAEMON)
    )
    assert bad == []


def test_the_compactor_child_loads_no_compute_kernels() -> None:
    """The daemon's hourly compaction child reads journals, validates and writes Parquet:
    pyarrow.compute (0.1 s of CPU to import, its function table built from docstrings) is not
    on that path."""
    code = (
        "import sys, telemetry.store.compactor, telemetry.schema, pyarrow.parquet, pyarrow.ipc\n"
        "print('pyarrow.compute' in sys.modules)\n"
    )
    assert _python(code).strip() == "False"
