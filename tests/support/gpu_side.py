"""The gpu collector's side output as attribution reads it."""

from __future__ import annotations

from typing import Any


def asked(out: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    """``out`` with each GPU's per-process SM utilisation (``sm``) asked of NVML now, as
    attribution asks it of a GPU several jobs hold (the collector leaves it to be asked)."""
    for side in out.get("_gpu_pids", []):
        sm = side.get("sm")
        if callable(sm):
            side["sm"] = sm()
    return out
