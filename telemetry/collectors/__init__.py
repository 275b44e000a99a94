"""Collectors, one per module, registered by name in :data:`REGISTRY`.

Importing this package registers the built-in collectors; the daemon derives its
``--collector.NAME`` / ``--no-collector.NAME`` flags from the registry.
"""

from __future__ import annotations

from telemetry.collectors import cpu, gpu, pod, rapl, slurm
from telemetry.collectors.base import (
    REGISTRY,
    Collector,
    CollectorContext,
    CollectorStatus,
    Round,
    Runner,
    assemble,
    register,
)

__all__ = [
    "REGISTRY",
    "Collector",
    "CollectorContext",
    "CollectorStatus",
    "Round",
    "Runner",
    "assemble",
    "cpu",
    "gpu",
    "pod",
    "rapl",
    "register",
    "slurm",
]
