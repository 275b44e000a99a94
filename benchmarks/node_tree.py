"""A loaded GPU node for the daemon benchmarks: a procfs/sysfs tree with Slurm jobs, 8 fake GPUs.

:func:`write_node` copies the ``normal_host`` fixture (``/proc/stat``, ``/proc/meminfo``, RAPL
zones) and adds ``jobs`` Slurm jobs in the ``cgroup/v2`` plugin's layout, the shape of the
``slurm_v2`` fixture: ``sys/fs/cgroup/system.slice/slurmstepd.scope/job_<id>/`` with
``cpuset.cpus.effective``, ``cpuset.cpus``, ``cpu.stat``, ``memory.current``, and
``step_batch/{slurm,user/task_0}/cgroup.procs``; each task PID has ``proc/<pid>/environ``
(NUL-separated ``SLURM_JOB_*``) and ``proc/<pid>/status``; the GPUs' processes have a
``proc/<pid>/cgroup`` outside any job. Each job also has the job-info file
``deploy/slurm/tally-prolog`` writes, in :func:`job_info_dir` (mode 0644 in a 0755 directory, as
the prolog leaves them): the daemon trusts them where it runs as root, who then owns them.

Two stand-ins present the same 8 loaded H100s (the ``H100_LOADED`` profile):

- :func:`build_driver_stub` compiles ``nvml_stub.c`` into a ``libnvidia-ml.so.1`` that the real
  nvidia-ml-py loads through ``LD_LIBRARY_PATH``: the daemon then runs tally, pynvml and ctypes
  as on a GPU node, only the driver's own work left out. What the daemon benchmarks measure.
- :data:`NVML` stands in for the whole pynvml module (``--nvml.module benchmarks.node_tree:NVML``):
  the tests' stand-in, whose fault-injection bookkeeping costs more per call than pynvml itself,
  called through its wrappers only. Where no C compiler is at hand.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tests.support.nvml.library import FakeClock, FakeNVML
from tests.support.nvml.profiles import H100_LOADED

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
CPUS = 64  # normal_host's logical CPUs


class MonotonicClock(FakeClock):
    """The fake driver's clock following real time, so energy and GPM samples advance."""

    def __init__(self) -> None:
        super().__init__(time.monotonic())

    def now(self) -> float:
        return time.monotonic()

    def __call__(self) -> float:
        return time.monotonic()


# Without its C functions: they are Python over its Python functions, dearer than its wrappers,
# so the daemon calls the wrappers, as it did before it called NVML's C functions.
NVML = FakeNVML([H100_LOADED] * 8, clock=MonotonicClock(), hidden=("_nvmlGetFunctionPointer",))
DRIVER_STUB_SOURCE = Path(__file__).resolve().parent / "nvml_stub.c"


def build_driver_stub(directory: Path) -> Path | None:
    """Compile the stand-in ``libnvidia-ml.so.1`` into ``directory`` (for ``LD_LIBRARY_PATH``);
    ``None`` when there is no C compiler or it fails (the compiler's message on stderr)."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    directory.mkdir(parents=True, exist_ok=True)
    library = directory / "libnvidia-ml.so.1"
    built = subprocess.run(
        [compiler, "-O2", "-shared", "-fPIC", "-Wl,-soname,libnvidia-ml.so.1", "-o",
         str(library), str(DRIVER_STUB_SOURCE)],
        capture_output=True, text=True,
    )  # fmt: skip
    if built.returncode != 0:
        print(f"the stand-in driver did not build:\n{built.stderr}", file=sys.stderr)
        return None
    return directory


def load_driver_stub(directory: Path) -> None:
    """Load the stub in this process, so that pynvml's ``CDLL("libnvidia-ml.so.1")`` finds it
    by its soname (``LD_LIBRARY_PATH`` is read only when a process starts)."""
    ctypes.CDLL(str(directory / "libnvidia-ml.so.1"), mode=ctypes.RTLD_GLOBAL)


_STATUS = """Name:\tpython3
Umask:\t0022
State:\tS (sleeping)
Tgid:\t{pid}
Ngid:\t0
Pid:\t{pid}
PPid:\t{ppid}
TracerPid:\t0
Uid:\t{uid}\t{uid}\t{uid}\t{uid}
Gid:\t{uid}\t{uid}\t{uid}\t{uid}
FDSize:\t64
Groups:\t{uid}
"""

_CPU_STAT = """usage_usec {usage}
user_usec {user}
system_usec {system}
core_sched.force_idle_usec 0
nr_periods 0
nr_throttled 0
throttled_usec 0
nr_bursts 0
burst_usec 0
"""


def job_info_dir(root: Path) -> Path:
    """The node's job-info directory (``--slurm.job-info-dir``)."""
    return root / "run" / "tally" / "jobs"


def write_node(root: Path, jobs: int = 50, job_info: bool = True) -> tuple[Path, Path]:
    """Write the tree under ``root``; return (procfs, sysfs). ``job_info``: with the job-info
    directory and files (else neither, as on a node without the prolog).

    Job ``i`` (id ``5000 + i``) holds one CPU and, for the first 8 jobs, GPU ``i``; its batch
    step's task runs as uid ``2000 + i % 10``.
    """
    shutil.copytree(FIXTURES / "normal_host", root, dirs_exist_ok=True)
    proc, sys_ = root / "proc", root / "sys"
    cgroup = sys_ / "fs" / "cgroup"
    cgroup.mkdir(parents=True, exist_ok=True)
    (cgroup / "cgroup.controllers").write_text("cpuset cpu io memory hugetlb pids rdma misc\n")
    scope = cgroup / "system.slice" / "slurmstepd.scope"
    (scope / "system").mkdir(parents=True, exist_ok=True)
    (scope / "cgroup.procs").write_text("")
    # The processes the stand-in H100s list (the same three on each) run outside any Slurm job
    # here: the daemon reads their cgroup every round, as on a GPU node, and finds no job.
    for process in H100_LOADED.processes:
        (proc / str(process.pid)).mkdir(parents=True, exist_ok=True)
        (proc / str(process.pid) / "cgroup").write_text("0::/system.slice/gpu-burn.service\n")
    info = job_info_dir(root)
    if job_info:
        info.mkdir(parents=True, exist_ok=True)
        for directory in (info.parent.parent, info.parent, info):
            directory.chmod(0o755)
    for i in range(jobs):
        job_id, uid = 5000 + i, 2000 + i % 10
        stepd, task = 20_000 + 2 * i, 20_001 + 2 * i
        job = scope / f"job_{job_id}"
        (job / "step_batch" / "slurm").mkdir(parents=True, exist_ok=True)
        (job / "step_batch" / "user" / "task_0").mkdir(parents=True, exist_ok=True)
        cpu = str(i % CPUS)
        (job / "cpuset.cpus.effective").write_text(cpu + "\n")
        (job / "cpuset.cpus").write_text(cpu + "\n")
        usage = 3_600_000_000 + i * 1_000_000
        (job / "cpu.stat").write_text(
            _CPU_STAT.format(usage=usage, user=usage * 9 // 10, system=usage - usage * 9 // 10)
        )
        (job / "memory.current").write_text(f"{(4 + i % 8) << 30}\n")
        (job / "cgroup.procs").write_text("")
        (job / "step_batch" / "slurm" / "cgroup.procs").write_text(f"{stepd}\n")
        (job / "step_batch" / "user" / "task_0" / "cgroup.procs").write_text(f"{task}\n")
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": f"/home/user{uid}",
            "SLURM_CLUSTER_NAME": "bench",
            "SLURM_JOB_ID": str(job_id),
            "SLURM_JOB_NAME": "train.sh",
            "SLURM_JOB_USER": f"user{uid}",
            "SLURM_JOB_UID": str(uid),
            "SLURM_JOB_ACCOUNT": f"project{i % 5}",
            "SLURM_JOB_PARTITION": "gpu",
            "SLURM_PROCID": "0",
        }
        if i < 8:
            env |= {"SLURM_JOB_GPUS": str(i), "CUDA_VISIBLE_DEVICES": "0"}
        if job_info:
            written = info / str(job_id)
            written.write_text(
                f"# written by tally-prolog for Slurm job {job_id}\njob_id={job_id}\n"
                f"uid={uid}\nuser=user{uid}\naccount=project{i % 5}\n"
                f"gpus={env.get('SLURM_JOB_GPUS', '')}\n"
            )
            written.chmod(0o644)
        (proc / str(task)).mkdir(parents=True, exist_ok=True)
        (proc / str(task) / "environ").write_bytes(
            b"".join(f"{k}={v}".encode() + b"\0" for k, v in env.items())
        )
        (proc / str(task) / "status").write_text(_STATUS.format(pid=task, ppid=stepd, uid=uid))
    return proc, sys_
