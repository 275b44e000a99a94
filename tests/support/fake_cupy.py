"""A stand-in for CuPy where there is no GPU: NumPy computes, but its arrays are a type of their
own (module ``cupy``), so the backend code takes its device path on any machine.

It checks what a GPU run would: arrays stay "on the device" (``kernels.array_namespace`` refuses
to mix the two kinds, and so do this module's ufuncs, as CuPy's do), results come back only
through ``.get()`` (counted in ``transfers``), and the memory pool is released after a run. It
cannot check CuPy's own numerics or API coverage: ``pytest -m gpu`` on a GPU does that.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np


class ndarray(np.lib.mixins.NDArrayOperatorsMixin):
    """A "device" array: NumPy memory behind it, CuPy's rules in front: no implicit conversion to
    a host array (``np.asarray``, host indexing with it, Arrow), ufuncs refuse host operands."""

    def __init__(self, data: np.ndarray) -> None:
        self._data = data

    # --- what CuPy arrays offer -------------------------------------------------------------
    def get(self) -> np.ndarray:
        """Copy to the host (as CuPy's ``ndarray.get``)."""
        state.transfers += 1
        return np.array(self._data, copy=True)

    def __array__(self, *args: Any, **kwargs: Any) -> np.ndarray:
        raise TypeError("fake cupy: implicit conversion to a NumPy array is not allowed")

    def __array_ufunc__(self, ufunc: np.ufunc, method: str, *inputs: Any, **kwargs: Any) -> Any:
        if _host_arrays(inputs) or _host_arrays(kwargs.get("out", ())):
            raise TypeError(f"fake cupy: {ufunc.__name__} mixes a host array with device ones")
        if "out" in kwargs:
            kwargs["out"] = tuple(_plain(o) for o in kwargs["out"])
        result = getattr(ufunc, method)(*[_plain(v) for v in inputs], **kwargs)
        return _device(result)

    @property
    def shape(self) -> tuple[int, ...]:
        return self._data.shape  # type: ignore[no-any-return]

    @property
    def size(self) -> int:
        return int(self._data.size)

    @property
    def ndim(self) -> int:
        return int(self._data.ndim)

    @property
    def dtype(self) -> np.dtype[Any]:
        return self._data.dtype

    def __len__(self) -> int:
        return len(self._data)

    def __getitem__(self, index: Any) -> Any:
        if _host_arrays(index):
            index = _plain(asarray(index))  # CuPy accepts host index arrays (copies them)
        return _device(self._data[_plain(index)])

    def __setitem__(self, index: Any, value: Any) -> None:
        if _host_arrays(value):
            raise TypeError("fake cupy: assigning a host array into a device array")
        self._data[_plain(index)] = _plain(value)

    def __bool__(self) -> bool:
        return bool(self._data)

    def __int__(self) -> int:
        return int(self._data)

    def __float__(self) -> float:
        return float(self._data)

    def __repr__(self) -> str:
        return f"fake_cupy.ndarray({self._data!r})"

    def astype(self, dtype: Any, copy: bool = True) -> ndarray:
        return ndarray(self._data.astype(dtype, copy=copy))

    def copy(self) -> ndarray:
        return ndarray(self._data.copy())

    def tolist(self) -> Any:
        state.transfers += 1
        return self._data.tolist()

    def __getattr__(self, name: str) -> Any:
        if name in ("min", "max", "sum", "all", "any", "argsort", "nonzero", "cumsum"):
            method = getattr(self._data, name)
            return lambda *a, **k: _device(method(*a, **k))
        raise AttributeError(name)


ndarray.__module__ = "cupy"  # what kernels.backend looks at to tell the two kinds apart


def _plain(value: Any) -> Any:
    if isinstance(value, ndarray):
        return value._data
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


class _State:
    transfers = 0
    released = 0


state = _State()


def _device(value: Any) -> Any:
    if isinstance(value, np.ndarray) and value.ndim:
        return ndarray(value)
    if isinstance(value, np.ndarray):  # a 0-d result: CuPy gives a 0-d array, NumPy a scalar
        return value[()]
    if isinstance(value, tuple):
        return tuple(_device(v) for v in value)
    if isinstance(value, list):
        return [_device(v) for v in value]
    return value


def asarray(values: Any, dtype: Any = None) -> ndarray:
    """Host → device copy (a device array is returned as is)."""
    if isinstance(values, ndarray):
        return values if dtype is None else values.astype(dtype)
    return ndarray(np.array(values, dtype=dtype, copy=True))


def _host_arrays(values: Any) -> bool:
    if isinstance(values, (list, tuple)):
        return any(_host_arrays(v) for v in values)
    return isinstance(values, np.ndarray) and values.ndim > 0


def _wrapped(function: Callable[..., Any]) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        if _host_arrays(args) or _host_arrays(tuple(kwargs.values())):
            raise TypeError(f"fake cupy: {function.__name__} got a host array")
        return _device(function(*_plain(args), **{k: _plain(v) for k, v in kwargs.items()}))

    return call


class _Pool:
    def free_all_blocks(self) -> None:
        state.released += 1


def _module() -> types.ModuleType:
    module = types.ModuleType("cupy")
    module.ndarray = ndarray  # type: ignore[attr-defined]
    module.asarray = asarray  # type: ignore[attr-defined]
    module.is_available = lambda: True  # type: ignore[attr-defined]
    module.get_default_memory_pool = _Pool  # type: ignore[attr-defined]
    module.get_default_pinned_memory_pool = _Pool  # type: ignore[attr-defined]

    def attribute(name: str) -> Any:
        value = getattr(np, name)
        if isinstance(value, (types.FunctionType, types.BuiltinFunctionType)) or (
            callable(value) and type(value).__name__ == "_ArrayFunctionDispatcher"
        ):
            return _wrapped(value)
        return value  # dtypes, constants and ufuncs (ufuncs keep the mixing check above)

    module.__getattr__ = attribute  # type: ignore[attr-defined]
    return module


@contextmanager
def installed() -> Iterator[types.ModuleType]:
    """``import cupy`` gives the stand-in inside the block."""
    saved = sys.modules.get("cupy")
    module = _module()
    sys.modules["cupy"] = module
    state.transfers = state.released = 0
    try:
        yield module
    finally:
        if saved is None:
            sys.modules.pop("cupy", None)
        else:
            sys.modules["cupy"] = saved
