"""The one place that picks an array backend: NumPy everywhere, CuPy on a GPU when asked.

``cupy`` is imported only inside :func:`get_namespace` when a caller asks for it, so importing
``kernels`` never touches a GPU. Kernels derive their namespace from their inputs with
:func:`array_namespace`, which refuses to mix NumPy and CuPy arrays: host/device copies happen
once, at the boundary, never silently inside a kernel.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

BACKENDS = ("auto", "numpy", "cupy")


class BackendError(RuntimeError):
    """The requested backend cannot be used here (for example cupy without a GPU)."""


def get_namespace(name: str = "numpy") -> ModuleType:
    """Return the array module for ``name`` (``auto``, ``numpy`` or ``cupy``).

    ``auto`` gives CuPy only when it imports and a CUDA device is available. Raises
    ``BackendError`` when ``cupy`` is asked for and cannot be used, ``ValueError`` for an
    unknown name.
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    if name == "numpy":
        return np
    try:
        import cupy
    except ImportError as exc:
        if name == "auto":
            return np
        raise BackendError(f"backend cupy: cannot import cupy ({exc})") from None
    try:
        available = bool(cupy.is_available())
    except Exception:
        available = False
    if not available:
        if name == "auto":
            return np
        raise BackendError("backend cupy: no usable CUDA device")
    module: ModuleType = cupy
    return module


def _is_cupy(array: Any) -> bool:
    return type(array).__module__.split(".")[0] == "cupy"


def array_namespace(*arrays: Any) -> ModuleType:
    """The array module of ``arrays``; raises ``TypeError`` if NumPy and CuPy arrays are mixed.

    Python scalars and ``None`` are ignored.
    """
    host = device = False
    for array in arrays:
        if type(array) is np.ndarray:  # the usual case, asked first: kernels call this a lot
            host = True
        elif array is None or isinstance(array, (int, float, bool, np.generic)):
            continue
        elif _is_cupy(array):
            device = True
        else:
            host = True
    if host and device:
        raise TypeError("kernel inputs mix NumPy and CuPy arrays; copy at the boundary first")
    if device:
        import sys

        return sys.modules["cupy"]
    return np


def to_backend(xp: ModuleType, array: np.ndarray) -> Any:
    """``array`` (a host array) on backend ``xp``: a host→device copy for CuPy, itself for NumPy."""
    return array if xp is np else xp.asarray(array)


def to_host(array: Any) -> np.ndarray:
    """A NumPy copy of ``array`` (no copy for NumPy input)."""
    if _is_cupy(array):
        return array.get()  # type: ignore[no-any-return]
    return np.asarray(array)


def release(xp: ModuleType) -> None:
    """Hand a finished run's GPU memory back to the device (no-op for NumPy)."""
    if xp is not np:
        xp.get_default_memory_pool().free_all_blocks()
        xp.get_default_pinned_memory_pool().free_all_blocks()
