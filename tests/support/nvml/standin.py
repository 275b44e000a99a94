"""A pynvml stand-in for daemon subprocess tests, named on their command line as
``--nvml.module tests.support.nvml.standin:NVML``: an H100 under load and an H100 in MIG mode,
from real captures (``profiles``)."""

from __future__ import annotations

from tests.support.nvml.library import FakeNVML
from tests.support.nvml.profiles import H100_LOADED, H100_MIG

NVML = FakeNVML([H100_LOADED, H100_MIG])
