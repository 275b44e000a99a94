"""How the kubelet names pod cgroups (its cgroup manager: ``ToSystemd`` for the systemd driver,
``pod<uid>`` directories for cgroupfs), for the ``pod`` collector, which finds the pods'
cgroups, and for GPU attribution, which finds the pod of a process NVML lists.

systemd driver: ``kubepods.slice/[kubepods-<qos>.slice/]kubepods[-<qos>]-pod<uid>.slice`` with
each ``-`` of the UID written ``_``; cgroupfs driver: ``kubepods/[<qos>/]pod<uid>``.
"""

from __future__ import annotations

import re

_SYSTEMD_POD = re.compile(r"kubepods(?:-burstable|-besteffort)?-pod([0-9A-Fa-f_]{1,64})\.slice")
_CGROUPFS_POD = re.compile(r"pod([0-9A-Fa-f-]{1,64})")
# how a pod's cgroup is named among the cgroup → job aliases (``_job_alias``) of a round
POD_CGROUP = "kubepods:"
QOS_DIRS = frozenset(
    {"kubepods-burstable.slice", "kubepods-besteffort.slice", "burstable", "besteffort"}
)


def normal_uid(uid: str) -> str:
    """A pod UID as the API writes it: the systemd driver's ``_`` back to ``-``, lower case."""
    return uid.replace("_", "-").lower()


def pod_uid_of_dir(name: str) -> str | None:
    """The pod UID a kubepods cgroup directory name holds, or None for any other directory."""
    match = _SYSTEMD_POD.fullmatch(name) or _CGROUPFS_POD.fullmatch(name)
    return normal_uid(match.group(1)) if match else None


def pod_uid_from_cgroup(text: str) -> str | None:
    """The UID of the pod whose cgroup holds a process, from ``/proc/<pid>/cgroup`` text
    (``0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid>.slice/
    cri-containerd-<id>.scope``, v1 ``4:cpuacct:/kubepods/burstable/pod<uid>/<id>``); None
    where no line puts it in a pod."""
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        names = parts[2].split("/")
        for at, name in enumerate(names):
            if name not in ("kubepods", "kubepods.slice"):
                continue
            below = names[at + 1 : at + 3]  # the pod, or its QoS directory and then the pod
            for child in below:
                uid = pod_uid_of_dir(child)
                if uid is not None:
                    return uid
                if child not in QOS_DIRS:
                    break
    return None
