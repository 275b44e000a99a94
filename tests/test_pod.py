"""The Kubernetes ``pod`` collector against a real gRPC server serving the kubelet's
PodResources v1 messages on a unix socket, over fixture node trees of both cgroup drivers.

Expected rows are worked out by hand from the fixture files (see the README of each tree)
and the pods the test kubelet serves below.
"""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from exporters.prometheus import TallyCollector
from telemetry.cli import build_parser, daemon_config
from telemetry.collectors import REGISTRY, CollectorContext, Runner
from telemetry.collectors.attribution import attribute_gpus
from telemetry.collectors.kubepods import pod_uid_from_cgroup
from telemetry.collectors.pod import (
    PodCollector,
    decode_allocatable_response,
    decode_list_response,
    find_pod_cgroups,
    gpu_device,
    parse_cpu_limit,
    pod_log_dirs,
)
from telemetry.errors import ParseError
from telemetry.state import State
from tests.support.daemon import DaemonProcess
from tests.support.kubelet import FakeKubelet, FakePod, allocatable_response, list_response
from tests.support.promtool import promtool_check

FIXTURES = Path(__file__).resolve().parent / "fixtures"
SYSTEMD_V2 = FIXTURES / "k8s_systemd_v2"
CGROUPFS_V1 = FIXTURES / "k8s_cgroupfs_v1"

GPU_A = "GPU-8f2c6a41-1d3e-4b7a-9c5f-2e8d7b6a4c10"
GPU_B = "GPU-0b1c2d3e-4f50-4172-8394-a5b6c7d8e9f0"
GPU_C = "GPU-c3d4e5f6-a7b8-49c0-91e2-f3a4b5c6d7e8"
MIG_1 = "MIG-5e1d7f3a-6b2c-5d8e-9f0a-1b2c3d4e5f60"
MIG_2 = "MIG-7a8b9c0d-1e2f-5a3b-8c4d-5e6f7a8b9c0d"
# An SR-IOV RDMA resource under nvidia.com/ (NVIDIA's network operator): VFs by PCI address.
RDMA = "nvidia.com/cx7_sriov_rdma"
SHARED = "nvidia.com/gpu.shared"  # the device plugin's time-slicing resource (renamed)

PODS = [
    FakePod(
        "ml-team",
        "trainer-0",
        [
            ("fetch-data", [], []),
            (
                "trainer",
                [("nvidia.com/gpu", [GPU_A, GPU_B]), (RDMA, ["0000:3b:00.2", "0000:3b:00.3"])],
                list(range(4, 12)),
            ),
        ],
    ),
    FakePod("ml-team", "notebook-alice", [("notebook", [(SHARED, [f"{GPU_C}::3"])], [])]),
    FakePod(
        "research",
        "infer-7d9f8b6c5-x2x4q",
        [("server", [(SHARED, [f"{GPU_C}::0", f"{GPU_C}::1"])], [])],
    ),
    FakePod("research", "mig-eval", [("eval", [("nvidia.com/mig-1g.18gb", [MIG_1])], [])]),
    FakePod("kube-system", "coredns-5d78c9869d-8kq2z", [("coredns", [], [])]),
    FakePod("default", "sleeper", [("sleep", [], [])]),
    # Admitted but not started: no cgroup and no log directory yet, so no row.
    FakePod("research", "pending-job", [("main", [], [])]),
]
ALLOCATABLE = [
    ("nvidia.com/gpu", [GPU_A, GPU_B]),
    (SHARED, [f"{GPU_C}::{n}" for n in range(4)]),
    ("nvidia.com/mig-1g.18gb", [MIG_1, MIG_2]),
    (RDMA, ["0000:3b:00.2", "0000:3b:00.3", "0000:3b:00.4", "0000:3b:00.5"]),
]


def expected(version: int) -> dict[str, dict[str, Any]]:
    """job_id → row. v2: cpu.stat usage_usec / 1e6; v1: cpuacct.usage (ns) / 1e9, which the
    v1 tree writes as usage_usec × 1000 + 417."""

    def seconds(usec: int) -> float:
        return usec / 1e6 if version == 2 else (usec * 1000 + 417) / 1e9

    def row(cpus: float, gpus: float, usec: int, memory: int, account: str) -> dict[str, Any]:
        return {
            "user": "unknown",
            "account": account,
            "cpus_allocated": cpus,
            "gpus_allocated": gpus,
            "cpu_seconds": seconds(usec),
            "memory_bytes": memory,
        }

    return {
        # exclusive cpu_ids 4-11; two whole GPUs; the RDMA VFs are no GPUs
        "ml-team/trainer-0": row(8.0, 2.0, 987_654_321_012, 34_359_738_368, "ml-team"),
        # cpu.max 400000 100000; one of GPU_C's four replicas
        "ml-team/notebook-alice": row(4.0, 0.25, 12_345_678_901, 4_294_967_296, "ml-team"),
        # cpu.max 200000 100000; two of the four replicas
        "research/infer-7d9f8b6c5-x2x4q": row(2.0, 0.5, 500_000_000, 8_589_934_592, "research"),
        # cpu.max max: no limit, 0 CPUs; one MIG instance
        "research/mig-eval": row(0.0, 1.0, 7_000_000, 1_073_741_824, "research"),
        "kube-system/coredns-5d78c9869d-8kq2z": row(
            0.0, 0.0, 3_600_123_456, 25_165_824, "kube-system"
        ),
        "default/sleeper": row(0.0, 0.0, 1_500, 204_800, "default"),
    }


EXPECTED_SHARES = {
    (GPU_C, "ml-team/notebook-alice"): 0.25,
    (GPU_C, "research/infer-7d9f8b6c5-x2x4q"): 0.5,
}


def context(tree: Path, sock: Path, **extra: Any) -> CollectorContext:
    return CollectorContext(
        procfs=tree / "proc",
        sysfs=tree / "sys",
        node="gpu-node-1",
        rootfs=tree,
        podresources=sock,
        **extra,
    )


@pytest.fixture
def kubelet(tmp_path: Path) -> Any:
    with FakeKubelet(tmp_path / "kubelet.sock", list(PODS), list(ALLOCATABLE)) as server:
        yield server


def collect(tree: Path, sock: Path, **extra: Any) -> dict[str, list[dict[str, Any]]]:
    collector = PodCollector(context(tree, sock, **extra))
    try:
        return collector.collect()
    finally:
        collector.close()


def by_job(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["job_id"]: {k: v for k, v in r.items() if k != "job_id"} for r in rows}


# ---------------------------------------------------------------- rows from real node shapes


@pytest.mark.parametrize(("tree", "version"), [(SYSTEMD_V2, 2), (CGROUPFS_V1, 1)])
def test_pods_become_job_rows(tree: Path, version: int, kubelet: FakeKubelet) -> None:
    out = collect(tree, kubelet.socket)
    rows = by_job(out["job"])
    want = expected(version)
    assert set(rows) == set(want)
    for job, row in want.items():
        got = rows[job]
        assert got["cpu_seconds"] == pytest.approx(row.pop("cpu_seconds"), rel=1e-15, abs=1e-9)
        got.pop("cpu_seconds")
        assert got == row, job
    shares = {(r["gpu_uuid"], r["job_id"]): r["share"] for r in out["gpu_job"]}
    assert shares == EXPECTED_SHARES
    claims = {r["gpu_uuid"]: r["job_id"] for r in out["_gpu_job"]}
    assert claims == {
        GPU_A: "ml-team/trainer-0",
        GPU_B: "ml-team/trainer-0",
        MIG_1: "research/mig-eval",
    }
    assert kubelet.calls == ["List", "GetAllocatableResources"]


def test_both_drivers_name_the_same_pods() -> None:
    v2 = find_pod_cgroups(SYSTEMD_V2 / "sys" / "fs" / "cgroup")
    v1 = find_pod_cgroups(CGROUPFS_V1 / "sys" / "fs" / "cgroup")
    assert set(v2) == set(v1)
    assert len(v2) == 6
    # the systemd driver writes the UID with _ for -; the API's form comes back
    assert "3f1b6c2e-94a7-4d2b-8e15-7c0a9d4e2b61" in v2
    assert {c.version for c in v2.values()} == {2} and {c.version for c in v1.values()} == {1}


def test_a_log_dir_without_a_cgroup_is_no_pod(tmp_path: Path, kubelet: FakeKubelet) -> None:
    logs = pod_log_dirs(SYSTEMD_V2)
    # trainer-0 has two incarnations on disk; the older one has no cgroup
    assert len(logs[("ml-team", "trainer-0")]) == 2
    assert ("default", "batch-done-28519440-abcde") in logs
    tree = tmp_path / "node"
    shutil.copytree(SYSTEMD_V2, tree, symlinks=True)
    live = "kubepods-pod3f1b6c2e_94a7_4d2b_8e15_7c0a9d4e2b61.slice"
    shutil.rmtree(tree / "sys" / "fs" / "cgroup" / "kubepods.slice" / live)
    out = collect(tree, kubelet.socket)
    rows = by_job(out["job"])
    assert "ml-team/trainer-0" not in rows, "the old UID's log dir must not stand in for it"
    assert len(rows) == 5
    assert GPU_A not in {r["gpu_uuid"] for r in out["_gpu_job"]}


# ---------------------------------------------------------------- GPUs, replicas, MIG


@pytest.mark.parametrize(
    ("resource", "device", "want"),
    [
        ("nvidia.com/gpu", GPU_A, (GPU_A, None)),
        ("nvidia.com/gpu", f"{GPU_A}::7", (GPU_A, 7)),
        ("nvidia.com/mig-3g.40gb", MIG_1, (MIG_1, None)),
        ("nvidia.com/gpu.shared", f"{MIG_1}::2", (MIG_1, 2)),
        (RDMA, "0000:3b:00.2", None),
        ("nvidia.com/rdma_shared_device_a", "1", None),
        ("nvidia.com/gpu", "0", None),  # device-id-strategy=index: not a UUID
        ("amd.com/gpu", GPU_A, None),
        ("rdma/hca", GPU_A, None),
        ("nvidia.com/gpu", f"{GPU_A}::", None),
        ("nvidia.com/gpu", f"{GPU_A} ", None),
    ],
)
def test_which_devices_are_gpus(resource: str, device: str, want: Any) -> None:
    assert gpu_device(resource, device) == want


def test_mig_and_whole_gpus_are_claimed_by_uuid(kubelet: FakeKubelet) -> None:
    out = collect(SYSTEMD_V2, kubelet.socket)
    gpu_rows = [
        {"gpu_uuid": uuid, "gpu_index": index, "job_id": None}
        for uuid, index in ((GPU_A, 0), (GPU_B, 1), (GPU_C, 2), (MIG_1, 3), (MIG_2, 3))
    ]
    partial: dict[str, list[dict[str, Any]]] = {"gpu": gpu_rows, "_gpu_job": out["_gpu_job"]}
    attribute_gpus(partial, SYSTEMD_V2 / "proc")
    holders = {r["gpu_uuid"]: r["job_id"] for r in partial["gpu"]}
    assert holders == {
        GPU_A: "ml-team/trainer-0",
        GPU_B: "ml-team/trainer-0",
        GPU_C: None,  # shared through replicas: the gpu_job rows say who holds it
        MIG_1: "research/mig-eval",
        MIG_2: None,
    }
    assert "_gpu_job" not in partial


def test_replicas_share_equally_when_the_kubelet_cannot_count_them(
    kubelet: FakeKubelet, caplog: pytest.LogCaptureFixture
) -> None:
    import grpc

    kubelet.allocatable_code = grpc.StatusCode.UNIMPLEMENTED
    collector = PodCollector(context(SYSTEMD_V2, kubelet.socket))
    with caplog.at_level(logging.INFO, logger="tally"):
        for _ in range(3):
            out = collector.collect()
    collector.close()
    shares = {(r["gpu_uuid"], r["job_id"]): r["share"] for r in out["gpu_job"]}
    # two pods hold replicas of GPU_C: half each (SPEC §2's 1 / number of jobs holding it)
    assert shares == dict.fromkeys(EXPECTED_SHARES, 0.5)
    assert by_job(out["job"])["ml-team/notebook-alice"]["gpus_allocated"] == 0.5
    said = [r for r in caplog.records if "GetAllocatableResources" in r.getMessage()]
    assert len(said) == 1 and "UNIMPLEMENTED" in said[0].getMessage()


def test_replicas_keep_their_count_when_the_kubelet_stops_listing_the_gpu(
    kubelet: FakeKubelet,
) -> None:
    """The kubelet lists only healthy devices as allocatable: a time-sliced GPU in trouble
    (an XID) drops out while its pods hold their replicas; and a failed call tells nothing.
    Either way the shares stay replicas held / replicas of the GPU as last counted."""
    import grpc

    collector = PodCollector(context(SYSTEMD_V2, kubelet.socket))
    try:
        rounds = [collector.collect()]
        kubelet.allocatable = [(r, ids) for r, ids in ALLOCATABLE if r != SHARED]
        rounds.append(collector.collect())
        kubelet.allocatable_code = grpc.StatusCode.UNAVAILABLE
        rounds.append(collector.collect())
    finally:
        collector.close()
    for out in rounds:
        assert {(r["gpu_uuid"], r["job_id"]): r["share"] for r in out["gpu_job"]} == EXPECTED_SHARES
        assert by_job(out["job"])["ml-team/notebook-alice"]["gpus_allocated"] == 0.25


def test_a_replica_past_the_count_raises_it(kubelet: FakeKubelet) -> None:
    """A count the kubelet gave before a GPU was split further (4, now ::5 is held) is raised
    to the highest replica held, so the shares of one GPU never sum past 1."""
    kubelet.allocatable = [(SHARED, [f"{GPU_C}::{n}" for n in range(2)])]
    kubelet.pods = [
        FakePod("ml-team", "notebook-alice", [("notebook", [(SHARED, [f"{GPU_C}::5"])], [])]),
        FakePod("research", "infer-7d9f8b6c5-x2x4q",
                [("server", [(SHARED, [f"{GPU_C}::0", f"{GPU_C}::1"])], [])]),
    ]  # fmt: skip
    out = collect(SYSTEMD_V2, kubelet.socket)
    shares = {r["job_id"]: r["share"] for r in out["gpu_job"]}
    assert shares == {"ml-team/notebook-alice": 1 / 6, "research/infer-7d9f8b6c5-x2x4q": 2 / 6}


def test_time_sliced_mig_instances_count_at_their_share_of_the_slices(
    kubelet: FakeKubelet,
) -> None:
    """A replica of a MIG instance is a share of the instance, which is a fraction of a GPU:
    1 of 2 replicas of a 1g instance of 7 slices is 1/14 of a GPU allocated, not 1/2."""
    kubelet.allocatable = [("nvidia.com/mig-1g.18gb", [MIG_1, f"{MIG_2}::0", f"{MIG_2}::1"])]
    kubelet.pods = [
        FakePod("research", "mig-eval", [("eval", [("nvidia.com/mig-1g.18gb", [MIG_1])], [])]),
        FakePod("ml-team", "notebook-alice",
                [("notebook", [("nvidia.com/mig-1g.18gb", [f"{MIG_2}::1"])], [])]),
    ]  # fmt: skip
    out = collect(SYSTEMD_V2, kubelet.socket)
    parent = "GPU-4a5b6c7d-8e9f-4a0b-9c1d-2e3f4a5b6c7d"
    gpu_rows = [
        {"gpu_uuid": parent, "gpu_index": 3, "job_id": None, "mig_profile": None,
         "capacity_units": 5 / 7},
        {"gpu_uuid": MIG_1, "gpu_index": 3, "job_id": None, "mig_profile": "1g.18gb",
         "capacity_units": 1 / 7},
        {"gpu_uuid": MIG_2, "gpu_index": 3, "job_id": None, "mig_profile": "1g.18gb",
         "capacity_units": 1 / 7},
    ]  # fmt: skip
    partial: dict[str, list[dict[str, Any]]] = {
        "gpu": gpu_rows,
        "job": out["job"],
        "gpu_job": out["gpu_job"],
        "_gpu_job": out["_gpu_job"],
        "_gpu_pids": [{"gpu_uuid": parent, "gpu_index": 3, "pids": [], "memory": {},
                       "sm": None, "mig_parent": True}],
    }  # fmt: skip
    attribute_gpus(partial, SYSTEMD_V2 / "proc")
    allocated = {r["job_id"]: r["gpus_allocated"] for r in partial["job"]}
    assert allocated["research/mig-eval"] == pytest.approx(1 / 7, rel=1e-12)
    assert allocated["ml-team/notebook-alice"] == pytest.approx(1 / 14, rel=1e-12)


def test_time_sliced_pods_get_their_processes_sm_utilisation_and_memory(
    tmp_path: Path, kubelet: FakeKubelet
) -> None:
    """SPEC §3 splits a shared GPU's busy time by each holder's SM utilisation where every
    holder has one: the pods holding replicas get theirs from the processes NVML lists on the
    GPU, each process's pod found by its kubepods cgroup (systemd v2 and cgroupfs v1 lines);
    a process of no pod, or of a pod not running this round, belongs to no holder."""
    alice, infer = "b7e2d9a0-5c14-4f3e-a6d8-0e9c1b2a3f45", "0c9d8e7f-6a5b-4c3d-2e1f-0a9b8c7d6e5f"
    lines = {
        100: "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod"
        f"{alice.replace('-', '_')}.slice/cri-containerd-{'a' * 64}.scope\n",
        200: f"12:cpuacct,cpu:/kubepods/burstable/pod{infer}/{'b' * 64}\n"
        f"11:memory:/kubepods/burstable/pod{infer}/{'b' * 64}\n",
        201: "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod"
        f"{infer.replace('-', '_')}.slice/cri-containerd-{'c' * 64}.scope\n",
        300: "0::/system.slice/nvidia-persistenced.service\n",
        400: "0::/kubepods.slice/kubepods-pod11111111_2222_3333_4444_555555555555.slice/x\n",
    }
    for pid, text in lines.items():
        (tmp_path / "proc" / str(pid)).mkdir(parents=True)
        (tmp_path / "proc" / str(pid) / "cgroup").write_text(text)
    out = collect(SYSTEMD_V2, kubelet.socket)
    assert pod_uid_from_cgroup(lines[200]) == infer and pod_uid_from_cgroup(lines[300]) is None
    partial: dict[str, list[dict[str, Any]]] = {
        **out,
        "gpu": [{"gpu_uuid": GPU_C, "gpu_index": 2, "job_id": None, "mig_profile": None,
                 "capacity_units": 1.0}],
        "_gpu_pids": [{"gpu_uuid": GPU_C, "gpu_index": 2, "pids": list(lines),
                       "sm": {100: 0.5, 200: 0.125, 201: 0.25, 300: 0.0625, 400: 0.0625},
                       "memory": {100: 1 << 30, 200: 2 << 30, 201: None, 300: 1 << 20,
                                  400: 1 << 20}}],
    }  # fmt: skip
    attribute_gpus(partial, tmp_path / "proc")
    rows = {r["job_id"]: r for r in partial["gpu_job"]}
    assert {job: r["share"] for job, r in rows.items()} == {
        "ml-team/notebook-alice": 0.25,
        "research/infer-7d9f8b6c5-x2x4q": 0.5,
    }
    assert rows["ml-team/notebook-alice"]["sm_utilization_ratio"] == 0.5
    assert rows["ml-team/notebook-alice"]["memory_used_bytes"] == 1 << 30
    assert rows["research/infer-7d9f8b6c5-x2x4q"]["sm_utilization_ratio"] == 0.375
    assert rows["research/infer-7d9f8b6c5-x2x4q"]["memory_used_bytes"] == 2 << 30
    assert partial["gpu"][0]["job_id"] is None  # the gpu_job rows say who holds it


def test_one_pod_listed_twice_is_one_job_holding_what_both_hold(kubelet: FakeKubelet) -> None:
    """A static pod being updated: the kubelet lists the old incarnation, still terminating,
    beside the new one under one namespace/name; that is one job row, not two of one key."""
    kubelet.pods = [
        FakePod("ml-team", "trainer-0", [("trainer", [("nvidia.com/gpu", [GPU_A, GPU_B])], [])]),
        FakePod("ml-team", "trainer-0", [("trainer", [("nvidia.com/gpu", [GPU_B])], [])]),
    ]
    out = collect(SYSTEMD_V2, kubelet.socket)
    assert [r["job_id"] for r in out["job"]] == ["ml-team/trainer-0"]
    assert out["job"][0]["gpus_allocated"] == 2.0
    assert sorted(r["gpu_uuid"] for r in out["_gpu_job"]) == [GPU_B, GPU_A]


@pytest.mark.parametrize("hidden", ["logs", "cgroups"])
def test_pods_the_node_paths_do_not_show_are_said_not_dropped_silently(
    tmp_path: Path, kubelet: FakeKubelet, caplog: pytest.LogCaptureFixture, hidden: str
) -> None:
    """A daemon in a container without /var/log/pods (or the host's cgroups) mounted sees
    none of the pods the kubelet lists: one line says so, instead of a node without pods."""
    tree = tmp_path / "node"
    shutil.copytree(SYSTEMD_V2, tree, symlinks=True)
    if hidden == "logs":
        shutil.rmtree(tree / "var" / "log" / "pods")
    else:
        shutil.rmtree(tree / "sys" / "fs" / "cgroup" / "kubepods.slice")
    collector = PodCollector(context(tree, kubelet.socket))
    try:
        with caplog.at_level(logging.WARNING, logger="tally"):
            for _ in range(3):
                assert collector.collect()["job"] == []
    finally:
        collector.close()
    said = [r.getMessage() for r in caplog.records if "no pod rows" in r.getMessage()]
    assert len(said) == 1, said
    assert ("--path.rootfs" if hidden == "logs" else "--path.sysfs") in said[0]
    assert "\n" not in said[0]


# ---------------------------------------------------------------- the wire format


_names = st.text(alphabet=st.characters(codec="utf-8"), max_size=20)
_ids = st.lists(st.one_of(st.just(GPU_A), st.just(f"{MIG_1}::3"), st.text(max_size=12)), max_size=3)
_pods = st.lists(
    st.builds(
        FakePod,
        _names,
        _names,
        st.lists(
            st.tuples(
                _names,
                st.lists(st.tuples(_names, _ids), max_size=3),
                st.lists(st.integers(0, 4095), max_size=6),
            ),
            max_size=3,
        ),
    ),
    max_size=4,
)


@settings(max_examples=60, deadline=None)
@given(_pods)
def test_decoder_reads_what_protobuf_writes(pods: list[FakePod]) -> None:
    decoded = decode_list_response(list_response(pods))
    assert [(p.namespace, p.name) for p in decoded] == [(p.namespace, p.name) for p in pods]
    for got, sent in zip(decoded, pods, strict=True):
        assert [
            (c.name, [(d.resource_name, list(d.device_ids)) for d in c.devices], list(c.cpu_ids))
            for c in got.containers
        ] == [(name, devices, cpus) for name, devices, cpus in sent.containers]


def test_allocatable_devices_decode() -> None:
    devices = decode_allocatable_response(allocatable_response(ALLOCATABLE, [0, 1, 2]))
    assert [(d.resource_name, list(d.device_ids)) for d in devices] == ALLOCATABLE


@pytest.mark.parametrize(
    "data",
    [
        list_response(PODS)[:-3],  # cut short
        b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",  # varint of 11 bytes
        b"\x0b",  # a group (wire type 3)
        b"\x08\x05",  # pod_resources as a varint
    ],
)
def test_malformed_messages_raise_parse_error(data: bytes) -> None:
    with pytest.raises(ParseError):
        decode_list_response(data)


@pytest.mark.parametrize(
    ("texts", "want"),
    [
        (("max 100000\n",), None),
        (("250000 100000\n",), 2.5),
        (("-1\n", "100000\n"), None),
        (("50000\n", "100000\n"), 0.5),
    ],
)
def test_cpu_limits(texts: tuple[str, ...], want: float | None) -> None:
    assert parse_cpu_limit(texts, "cpu.max") == want


@pytest.mark.parametrize("texts", [("max",), ("1 0",), ("x 100000",), ("5", "0")])
def test_bad_cpu_limits(texts: tuple[str, ...]) -> None:
    with pytest.raises(ParseError):
        parse_cpu_limit(texts, "cpu.max")


# ---------------------------------------------------------------- faults


def _run(runner: Runner, rounds: int) -> list[bool]:
    return [runner.run().status["pod"].success for _ in range(rounds)]


def _pod_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "collector pod" in r.getMessage()]


def test_no_socket_fails_the_collector_with_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    runner = Runner([PodCollector(context(SYSTEMD_V2, tmp_path / "kubelet.sock"))])
    with caplog.at_level(logging.WARNING, logger="tally"):
        assert _run(runner, 4) == [False] * 4
    lines = _pod_lines(caplog)
    assert len(lines) == 1
    assert "no kubelet pod-resources socket" in lines[0] and "\n" not in lines[0]
    runner.close()


def test_kubelet_restart_reconnects(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    sock = tmp_path / "kubelet.sock"
    server = FakeKubelet(sock, list(PODS), list(ALLOCATABLE)).start()
    runner = Runner([PodCollector(context(SYSTEMD_V2, sock))])
    with caplog.at_level(logging.WARNING, logger="tally"):
        assert _run(runner, 2) == [True, True]
        server.stop()  # the kubelet exits and takes its socket along
        assert _run(runner, 3) == [False] * 3
        server = FakeKubelet(sock, list(PODS), list(ALLOCATABLE)).start()
        try:
            # a fresh channel each round after a failure: no gRPC reconnect backoff to wait out
            assert _run(runner, 2) == [True, True]
            result = runner.run()
        finally:
            runner.close()
            server.stop()
    assert len(_pod_lines(caplog)) == 1
    assert set(result.tables["job"].to_arrow().column("job_id").to_pylist()) == set(expected(2))


def test_a_dead_kubelet_socket_fails_with_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sock = tmp_path / "kubelet.sock"
    # A socket file nobody listens on: what a kubelet killed with SIGKILL leaves behind.
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock))
    listener.close()
    runner = Runner([PodCollector(context(SYSTEMD_V2, sock))])
    with caplog.at_level(logging.WARNING, logger="tally"):
        assert _run(runner, 3) == [False] * 3
        # The kubelet comes back (it replaces the stale file): the very next round reads it,
        # where a channel kept from the failures would still wait out gRPC's reconnect backoff.
        sock.unlink()
        with FakeKubelet(sock, list(PODS), list(ALLOCATABLE)):
            assert _run(runner, 1) == [True]
    runner.close()
    lines = _pod_lines(caplog)
    assert len(lines) == 1 and "UNAVAILABLE" in lines[0]


def test_no_permission_on_the_socket_is_one_clear_line(
    kubelet: FakeKubelet, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The tests may run as root, whom no mode bit stops: deny as the kernel would a non-root user.
    monkeypatch.setattr("telemetry.collectors.pod.os.access", lambda *_: False)
    runner = Runner([PodCollector(context(SYSTEMD_V2, kubelet.socket))])
    status = runner.run().status["pod"]
    runner.close()
    assert not status.success and status.error is not None
    assert "permission denied" in status.error and kubelet.calls == []


def test_without_grpcio_one_clear_line(
    kubelet: FakeKubelet, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "grpc", None)  # import grpc now raises ImportError
    runner = Runner([PodCollector(context(SYSTEMD_V2, kubelet.socket))])
    status = runner.run().status["pod"]
    assert not status.success
    assert status.error == "grpcio is not installed: pip install 'tally[k8s]' to read pods"


def test_importing_telemetry_does_not_load_grpc() -> None:
    code = (
        "import sys, telemetry.cli, telemetry.daemon, telemetry.collectors.pod\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('grpc', 'google')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_a_malformed_cgroup_file_fails_that_pod_only(
    tmp_path: Path, kubelet: FakeKubelet, caplog: pytest.LogCaptureFixture
) -> None:
    tree = tmp_path / "node"
    shutil.copytree(SYSTEMD_V2, tree, symlinks=True)
    burstable = tree / "sys" / "fs" / "cgroup" / "kubepods.slice" / "kubepods-burstable.slice"
    notebook = burstable / "kubepods-burstable-podb7e2d9a0_5c14_4f3e_a6d8_0e9c1b2a3f45.slice"
    (notebook / "memory.current").write_text("12x34\n")
    with caplog.at_level(logging.WARNING, logger="tally"):
        out = collect(tree, kubelet.socket)
    rows = by_job(out["job"])
    assert "ml-team/notebook-alice" not in rows and len(rows) == 5
    assert [(r["gpu_uuid"], r["job_id"]) for r in out["gpu_job"]] == [
        (GPU_C, "research/infer-7d9f8b6c5-x2x4q")
    ]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "ml-team/notebook-alice" in lines[0]


def test_a_pod_without_cpus_is_logged_once(
    kubelet: FakeKubelet, caplog: pytest.LogCaptureFixture
) -> None:
    collector = PodCollector(context(SYSTEMD_V2, kubelet.socket))
    with caplog.at_level(logging.INFO, logger="tally"):
        for _ in range(3):
            collector.collect()
    collector.close()
    lines = [r.getMessage() for r in caplog.records if "0 CPUs" in r.getMessage()]
    assert len(lines) == 1


def test_tenant_label_without_api_server_uses_the_namespace(
    kubelet: FakeKubelet, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="tally"):
        out = collect(SYSTEMD_V2, kubelet.socket, k8s_tenant_label="billing.example.com/team")
    lines = [r.getMessage() for r in caplog.records if "tenant-label" in r.getMessage()]
    assert len(lines) == 1 and "namespace" in lines[0]
    assert by_job(out["job"])["research/mig-eval"]["account"] == "research"


# ---------------------------------------------------------------- hostile names


def test_hostile_pod_names_are_escaped_in_the_exposition(tmp_path: Path, promtool: str) -> None:
    namespace = 'ns"{evil="1"}\nx\\'
    name = 'pod"} 1\n# HELP tally_job_info x\n{'
    tree = tmp_path / "node"
    shutil.copytree(SYSTEMD_V2, tree, symlinks=True)
    pods_dir = tree / "var" / "log" / "pods"
    sleeper_uid = "e1f2a3b4-c5d6-4e7f-8a9b-0c1d2e3f4a5b"
    (pods_dir / f"default_sleeper_{sleeper_uid}").rename(
        pods_dir / f"{namespace}_{name}_{sleeper_uid}"
    )
    pods = [*PODS[:5], FakePod(namespace, name, [("sleep", [], [])])]
    state = State()
    with FakeKubelet(tmp_path / "kubelet.sock", pods, list(ALLOCATABLE)) as server:
        runner = Runner(
            [PodCollector(context(tree, server.socket))],
            clock_ns=iter(
                [1_788_220_800_000_000_000 + i * 5_000_000_000 for i in range(3)]
            ).__next__,
        )
        for _ in range(3):
            result = runner.run()
            state.ingest("job", result.tables["job"])
        runner.close()
    registry = CollectorRegistry()
    registry.register(TallyCollector(lambda: state.snapshot(result.status)))
    text = generate_latest(registry)
    assert promtool_check(promtool, text).returncode == 0, text.decode(errors="replace")
    jobs = [
        s.labels
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
        if s.name == "tally_job_info"
    ]
    assert len(jobs) == 6
    hostile = [labels for labels in jobs if labels["job"] == f"{namespace}/{name}"]
    assert hostile == [
        {
            "node": "gpu-node-1",
            "job": f"{namespace}/{name}",
            "user": "unknown",
            "account": namespace,
        }
    ]


# ---------------------------------------------------------------- the daemon


def _wait_for(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


@pytest.mark.e2e
def test_daemon_exports_pods_and_survives_a_kubelet_restart(tmp_path: Path) -> None:
    sock = tmp_path / "kubelet.sock"
    server = FakeKubelet(sock, list(PODS), list(ALLOCATABLE)).start()
    flags = (
        "--collector.pod",
        "--no-collector.gpu",
        "--no-collector.rapl",
        "--path.rootfs",
        str(SYSTEMD_V2),
        "--path.sysfs",
        str(SYSTEMD_V2 / "sys"),
        "--path.podresources",
        str(sock),
    )
    daemon = DaemonProcess(tmp_path / "data", tmp_path / "logs", node="k8s", flags=flags)
    try:

        def success() -> float:
            return daemon.value("tally_collector_success", collector="pod")

        _wait_for(lambda: success() == 1.0)
        labels = {"node": "k8s", "job": "research/infer-7d9f8b6c5-x2x4q"}
        assert daemon.value("tally_job_gpus_allocated", **labels) == 0.5
        assert daemon.value("tally_job_cpus_allocated", **labels) == 2.0
        info = {**labels, "user": "unknown", "account": "research"}
        assert daemon.value("tally_job_info", **info) == 1.0
        server.stop()
        _wait_for(lambda: success() == 0.0)
        time.sleep(1.0)  # five more failing rounds at 0.2 s
        server = FakeKubelet(sock, list(PODS), list(ALLOCATABLE)).start()
        _wait_for(lambda: success() == 1.0, timeout=2.0)  # within a few 0.2 s intervals
    finally:
        server.stop()
        daemon.stop()
    failures = [line for line in daemon.stderr().splitlines() if "collector pod" in line]
    assert len(failures) == 1 and "no kubelet pod-resources socket" in failures[0], failures
    assert "chttp2" not in daemon.stderr(), "gRPC core logs stay quiet"


# ---------------------------------------------------------------- flags


def test_flags_reach_the_collector_context(tmp_path: Path) -> None:
    args = build_parser().parse_args(
        [
            "daemon",
            "--collector.pod",
            "--path.rootfs",
            str(tmp_path),
            "--path.podresources",
            str(tmp_path / "k.sock"),
            "--k8s.tenant-label",
            "team",
        ]
    )
    config = daemon_config(args)
    assert config.collectors["pod"] is True
    assert (config.rootfs, config.podresources) == (tmp_path, tmp_path / "k.sock")
    assert config.k8s_tenant_label == "team"
    assert REGISTRY["pod"] is PodCollector and not PodCollector.default_enabled
    off = daemon_config(build_parser().parse_args(["daemon"]))
    assert off.collectors["pod"] is False and off.podresources is None


def test_flags_from_the_config_file(tmp_path: Path) -> None:
    toml = tmp_path / "tally.toml"
    toml.write_text(
        '[path]\nrootfs = "/host"\npodresources = "/run/k.sock"\n'
        '[k8s]\ntenant-label = "team"\n[collector]\npod = true\n'
    )
    config = daemon_config(build_parser().parse_args(["daemon", "--config", str(toml)]))
    assert (config.rootfs, config.podresources) == (Path("/host"), Path("/run/k.sock"))
    assert config.k8s_tenant_label == "team" and config.collectors["pod"] is True


def test_default_socket_is_under_rootfs(tmp_path: Path) -> None:
    ctx = CollectorContext(procfs=tmp_path, sysfs=tmp_path, node="n", rootfs=Path("/host"))
    collector = PodCollector(ctx)
    assert collector.socket == Path("/host/var/lib/kubelet/pod-resources/kubelet.sock")


def test_doctor_asks_the_kubelet_as_the_collector_does(
    kubelet: FakeKubelet, tmp_path: Path
) -> None:
    """With the pod collector on, the doctor reads one round through the collector itself:
    the same socket, the same cgroup driver detection; without a socket it fails with the fix;
    with the collector off it says so and asks nothing."""
    from telemetry.config import DaemonConfig
    from telemetry.doctor import check_pods, run_doctor

    def config(sock: Path, on: bool = True) -> DaemonConfig:
        tree = SYSTEMD_V2
        return DaemonConfig(procfs=tree / "proc", sysfs=tree / "sys", rootfs=tree,
                            podresources=sock, collectors={"pod": on})  # fmt: skip

    (found,) = check_pods(config(kubelet.socket))
    running = len(collect(SYSTEMD_V2, kubelet.socket)["job"])
    assert found.status == "ok" and f"{running} pod(s) running" in found.line()
    assert "List" in kubelet.calls
    (missing,) = check_pods(config(tmp_path / "gone.sock"))
    assert missing.status == "FAIL" and "--path.podresources" in missing.line()
    lines: list[str] = []
    calls = len(kubelet.calls)
    run_doctor(config(kubelet.socket, on=False), out=lines.append)
    assert any("pods: not checked: the pod collector is off" in line for line in lines)
    assert len(kubelet.calls) == calls
