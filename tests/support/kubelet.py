"""A stand-in kubelet: the PodResources API v1 served by a real gRPC server on a unix socket.

The messages are built with the protobuf library from descriptors written here from the
kubelet's ``api.proto`` (``staging/src/k8s.io/kubelet/pkg/apis/podresources/v1/api.proto``,
package ``v1``), independently of the collector's hand decoder, so a wrong field number on
either side fails the tests instead of cancelling out. The descriptors include the fields the
collector does not read (``memory``, ``topology``, ``dynamic_resources``) so that skipping them
is tested too.
"""

from __future__ import annotations

from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_F = descriptor_pb2.FieldDescriptorProto
_OPTIONAL, _REPEATED = _F.LABEL_OPTIONAL, _F.LABEL_REPEATED

# message → [(field name, number, label, type, type name of a message field)]
_MESSAGES: dict[str, list[tuple[str, int, int, int, str]]] = {
    "ListPodResourcesRequest": [],
    "AllocatableResourcesRequest": [],
    "ListPodResourcesResponse": [
        ("pod_resources", 1, _REPEATED, _F.TYPE_MESSAGE, ".v1.PodResources"),
    ],
    "PodResources": [
        ("name", 1, _OPTIONAL, _F.TYPE_STRING, ""),
        ("namespace", 2, _OPTIONAL, _F.TYPE_STRING, ""),
        ("containers", 3, _REPEATED, _F.TYPE_MESSAGE, ".v1.ContainerResources"),
    ],
    "ContainerResources": [
        ("name", 1, _OPTIONAL, _F.TYPE_STRING, ""),
        ("devices", 2, _REPEATED, _F.TYPE_MESSAGE, ".v1.ContainerDevices"),
        ("cpu_ids", 3, _REPEATED, _F.TYPE_INT64, ""),
        ("memory", 4, _REPEATED, _F.TYPE_MESSAGE, ".v1.ContainerMemory"),
        ("dynamic_resources", 5, _REPEATED, _F.TYPE_MESSAGE, ".v1.DynamicResource"),
    ],
    "ContainerMemory": [
        ("memory_type", 1, _OPTIONAL, _F.TYPE_STRING, ""),
        ("size", 2, _OPTIONAL, _F.TYPE_UINT64, ""),
        ("topology", 3, _OPTIONAL, _F.TYPE_MESSAGE, ".v1.TopologyInfo"),
    ],
    "ContainerDevices": [
        ("resource_name", 1, _OPTIONAL, _F.TYPE_STRING, ""),
        ("device_ids", 2, _REPEATED, _F.TYPE_STRING, ""),
        ("topology", 3, _OPTIONAL, _F.TYPE_MESSAGE, ".v1.TopologyInfo"),
    ],
    "TopologyInfo": [("nodes", 1, _REPEATED, _F.TYPE_MESSAGE, ".v1.NUMANode")],
    "NUMANode": [("ID", 1, _OPTIONAL, _F.TYPE_INT64, "")],
    "DynamicResource": [
        ("claim_name", 2, _OPTIONAL, _F.TYPE_STRING, ""),
        ("claim_namespace", 3, _OPTIONAL, _F.TYPE_STRING, ""),
    ],
    "AllocatableResourcesResponse": [
        ("devices", 1, _REPEATED, _F.TYPE_MESSAGE, ".v1.ContainerDevices"),
        ("cpu_ids", 2, _REPEATED, _F.TYPE_INT64, ""),
        ("memory", 3, _REPEATED, _F.TYPE_MESSAGE, ".v1.ContainerMemory"),
    ],
}


def _classes() -> dict[str, Any]:
    proto = descriptor_pb2.FileDescriptorProto(
        name="tally_test_podresources_v1.proto", package="v1", syntax="proto3"
    )
    for name, fields in _MESSAGES.items():
        message = proto.message_type.add(name=name)
        for field_name, number, label, kind, type_name in fields:
            entry = message.field.add(name=field_name, number=number, label=label, type=kind)
            if type_name:
                entry.type_name = type_name
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"v1.{name}"))
        for name in _MESSAGES
    }


MESSAGES = _classes()


@dataclass
class FakePod:
    """One pod as the kubelet reports it; containers are ``(name, devices, cpu_ids)`` with
    devices as ``[(resource_name, [device ids])]``."""

    namespace: str
    name: str
    containers: list[tuple[str, list[tuple[str, list[str]]], list[int]]] = field(
        default_factory=list
    )


def list_response(pods: list[FakePod]) -> bytes:
    """A serialised ``ListPodResourcesResponse``, with NUMA topology and memory filled in."""
    response = MESSAGES["ListPodResourcesResponse"]()
    for pod in pods:
        entry = response.pod_resources.add(name=pod.name, namespace=pod.namespace)
        for name, devices, cpus in pod.containers:
            container = entry.containers.add(name=name, cpu_ids=cpus)
            for resource, ids in devices:
                group = container.devices.add(resource_name=resource, device_ids=ids)
                group.topology.nodes.add(ID=0)
            container.memory.add(memory_type="memory", size=1 << 30).topology.nodes.add(ID=0)
            container.dynamic_resources.add(claim_name="c", claim_namespace=pod.namespace)
    return bytes(response.SerializeToString())


def allocatable_response(devices: list[tuple[str, list[str]]], cpus: list[int]) -> bytes:
    response = MESSAGES["AllocatableResourcesResponse"](cpu_ids=cpus)
    for resource, ids in devices:
        response.devices.add(resource_name=resource, device_ids=ids).topology.nodes.add(ID=1)
    return bytes(response.SerializeToString())


class FakeKubelet:
    """The PodResourcesLister service on ``socket``; ``pods`` and ``allocatable`` may be
    changed between calls. ``allocatable_code`` makes GetAllocatableResources fail."""

    def __init__(
        self,
        socket: Path,
        pods: list[FakePod] | None = None,
        allocatable: list[tuple[str, list[str]]] | None = None,
        cpus: list[int] | None = None,
    ) -> None:
        self.socket = socket
        self.pods = pods or []
        self.allocatable = allocatable or []
        self.cpus = cpus or []
        self.allocatable_code: grpc.StatusCode | None = None
        self.calls: list[str] = []
        self._server: Any = None

    def _list(self, request: bytes, context: Any) -> bytes:
        MESSAGES["ListPodResourcesRequest"].FromString(request)
        self.calls.append("List")
        return list_response(self.pods)

    def _allocatable(self, request: bytes, context: Any) -> bytes:
        MESSAGES["AllocatableResourcesRequest"].FromString(request)
        self.calls.append("GetAllocatableResources")
        if self.allocatable_code is not None:
            context.abort(self.allocatable_code, "not served by this kubelet")
        return allocatable_response(self.allocatable, self.cpus)

    def start(self) -> FakeKubelet:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        handlers = {
            "List": grpc.unary_unary_rpc_method_handler(self._list),
            "GetAllocatableResources": grpc.unary_unary_rpc_method_handler(self._allocatable),
        }
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("v1.PodResourcesLister", handlers),)
        )
        if server.add_insecure_port(f"unix:{self.socket}") == 0:
            raise RuntimeError(f"cannot listen on {self.socket}")
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        """Stop serving and remove the socket, as a kubelet that exits does."""
        if self._server is not None:
            self._server.stop(grace=None).wait()
            self._server = None
        self.socket.unlink(missing_ok=True)

    def __enter__(self) -> FakeKubelet:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()
