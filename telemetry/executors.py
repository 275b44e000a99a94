"""Where the partitions of a long command run (SPEC §9): this process, a pool of processes on
this machine's cores, or Dask distributed (``--cluster``).

``run_tasks`` maps one picklable top-level function over picklable items and returns the results
in the items' order, whatever order they finish in. The first task that fails cancels the rest
and its exception is raised here: a caller never sees a partial result. Tasks lost with a worker
process that died run again (on Dask by Dask; from a pool on a fresh pool, a few times). Nothing
here imports Dask unless a cluster is asked for (the ``cluster`` extra).
"""

from __future__ import annotations

import importlib
import logging
import multiprocessing
import os
import re
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from telemetry.errors import RunFailed, TallyError

log = logging.getLogger("tally.executors")

T = TypeVar("T")
R = TypeVar("R")

_LOCAL = re.compile(r"local(?::([0-9]+))?")
_TCP = re.compile(r"tcp://[^\s:/]+:[0-9]{1,5}")
# Modules a pool's fork server imports once, so each worker starts without importing them again.
_PRELOAD = ["telemetry.billing.partitioned"]
# Fresh pools started for the tasks lost with a worker process that died.
POOL_RETRIES = 2


class WorkerLost(RunFailed):
    """Worker processes died (killed, out of memory) running the same tasks on every pool tried:
    a failure of the run, exit 1, never a partial result."""


def cores() -> int:
    """CPU cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def check_cluster(spec: str) -> str:
    """``spec`` when it is ``local``, ``local:N`` (N ≥ 1) or ``tcp://HOST:PORT``; else
    ``TallyError`` (exit 2)."""
    local = _LOCAL.fullmatch(spec)
    if local is not None and (local.group(1) is None or int(local.group(1)) >= 1):
        return spec
    if _TCP.fullmatch(spec) and 0 < int(spec.rsplit(":", 1)[1]) < 65536:
        return spec
    raise TallyError(
        f"--cluster {spec!r}: expected local, local:N (N workers) or tcp://HOST:PORT "
        "(a Dask scheduler)"
    )


def run_tasks(
    function: Callable[[T], R],
    items: Sequence[T],
    workers: int = 1,
    cluster: Any = None,
    on_done: Callable[[int, R], None] | None = None,
) -> list[R]:
    """``[function(item) for item in items]``, run where told.

    ``cluster`` None: ``workers`` 1 runs in this process, more in a pool of that many
    processes. ``cluster`` ``local``/``local:N``/``tcp://HOST:PORT`` runs on Dask distributed
    (a ``LocalCluster`` of this machine's cores or N single-threaded workers, or an existing
    scheduler); an existing ``distributed.Client`` is used as it is. ``on_done(index, result)``
    is called in this process as each task finishes. Raises the first failed task's exception.
    """
    if not items:
        return []
    if cluster is not None:
        return _run_on_dask(function, items, cluster, on_done)
    if workers <= 1 or len(items) == 1:
        results = []
        for i, item in enumerate(items):
            results.append(function(item))
            if on_done is not None:
                on_done(i, results[-1])
        return results
    return _run_in_pool(function, items, min(workers, len(items)), on_done)


def _pool_context() -> multiprocessing.context.BaseContext:
    # fork where this process runs no other thread (a command: workers start in milliseconds
    # with everything imported; forking beside running threads could copy a held lock);
    # else forkserver: workers start from a clean server process that has imported the engine
    # once (half a second, the first time); spawn where the platform has neither.
    # A CUDA context (CuPy) never survives a fork: then forkserver too.
    methods = multiprocessing.get_all_start_methods()
    if "fork" in methods and threading.active_count() == 1 and "cupy" not in sys.modules:
        return multiprocessing.get_context("fork")
    if "forkserver" in methods:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(_PRELOAD)
        return context
    return multiprocessing.get_context("spawn")


def _run_in_pool(
    function: Callable[[T], R],
    items: Sequence[T],
    workers: int,
    on_done: Callable[[int, R], None] | None,
) -> list[R]:
    """The tasks on a pool; those lost with a worker process that died (killed, out of memory:
    the pool is broken then) run again on a fresh pool, ``POOL_RETRIES`` times at most, as Dask
    retries the tasks of a lost worker. Raises ``WorkerLost`` naming them after that."""
    results: dict[int, R] = {}
    todo = list(range(len(items)))
    for attempt in range(POOL_RETRIES + 1):
        lost = _pool_round(function, items, todo, workers, on_done, results)
        if not lost:
            return [results[i] for i in range(len(items))]
        if attempt < POOL_RETRIES:
            log.warning(
                "a worker process died (killed or out of memory): %d of %d tasks again on a "
                "fresh pool",
                len(lost),
                len(items),
            )
        todo = lost
    first = items[todo[0]]
    describe = getattr(first, "describe", None)
    named = describe() if callable(describe) else f"task {todo[0]}"
    more = f" and {len(todo) - 1} more" if len(todo) > 1 else ""
    raise WorkerLost(
        f"a worker process died (killed or out of memory) {POOL_RETRIES + 1} times running "
        f"{named}{more}; nothing was billed"
    )


def _pool_round(
    function: Callable[[T], R],
    items: Sequence[T],
    todo: list[int],
    workers: int,
    on_done: Callable[[int, R], None] | None,
    results: dict[int, R],
) -> list[int]:
    """Run the ``todo`` items on one fresh pool into ``results``; the indexes lost with a dead
    worker. The first task that fails otherwise cancels the rest and raises."""
    lost: list[int] = []
    pool = ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=_pool_context())
    try:
        pending: dict[Future[R], int] = {}
        for i in todo:
            try:
                pending[pool.submit(function, items[i])] = i
            except BrokenProcessPool:  # a worker died while the tasks were handed out
                lost.append(i)
        while pending:
            done, _ = wait(pending, return_when=FIRST_EXCEPTION)
            for future in done:
                index = pending.pop(future)
                try:
                    results[index] = future.result()
                except BrokenProcessPool:
                    lost.append(index)
                    continue
                if on_done is not None:
                    on_done(index, results[index])
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return sorted(lost)


def _run_on_dask(
    function: Callable[[T], R],
    items: Sequence[T],
    cluster: Any,
    on_done: Callable[[int, R], None] | None,
) -> list[R]:
    try:
        # typed Any: Dask's own annotations are partial, and it is an optional extra
        distributed: Any = importlib.import_module("distributed")
    except ImportError:
        raise TallyError("--cluster needs Dask distributed: pip install 'tally[cluster]'") from None
    owned: list[Any] = []
    try:
        if isinstance(cluster, distributed.Client):
            client = cluster
        else:
            client = _connect(distributed, check_cluster(cluster), owned)
        # pure=False: the same partition billed twice is two tasks (never a cached result)
        futures = client.map(function, list(items), pure=False)
        index = {future.key: i for i, future in enumerate(futures)}
        results: dict[int, R] = {}
        try:
            for future in distributed.as_completed(futures):
                i = index[future.key]
                results[i] = future.result()  # a failed task's exception is raised here
                if on_done is not None:
                    on_done(i, results[i])
        finally:
            client.cancel([f for f in futures if not f.done()])
        return [results[i] for i in range(len(items))]
    finally:
        for thing in reversed(owned):
            thing.close()


def _connect(distributed: Any, spec: str, owned: list[Any]) -> Any:
    local = _LOCAL.fullmatch(spec)
    if local is not None:
        n = int(local.group(1)) if local.group(1) else cores()
        made = distributed.LocalCluster(
            n_workers=n,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.ERROR,
        )
        owned.append(made)
        client = distributed.Client(made)
    else:
        try:
            client = distributed.Client(spec, timeout="10s")
        except OSError as exc:
            raise TallyError(f"--cluster {spec}: cannot reach the scheduler: {exc}") from None
    owned.append(client)
    return client
