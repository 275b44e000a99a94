"""A pynvml stand-in for daemon subprocess tests (``--nvml.module tests.nvml_standin:NVML``):
an H100 under load and an H100 in MIG mode, from real captures (see tests/fake_nvml.py)."""

from __future__ import annotations

from tests.fake_nvml import H100_LOADED, H100_MIG, FakeNVML

NVML = FakeNVML([H100_LOADED, H100_MIG])
