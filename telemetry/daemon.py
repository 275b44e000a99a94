"""``tally daemon``: collect every interval, journal to Parquet, aggregate, serve /metrics.

The collection loop runs in the main thread on a fixed schedule (a late round is not made up
for) and writes each round to the journal at once; the HTTP server answers scrapes from its own
threads. The live aggregation is done when a scrape asks for it (every round still counts: the
rounds collected since the last scrape are ingested together, which costs about what one round
costs), and at least every ``AGGREGATE_EVERY_SECONDS`` so that rounds nobody scrapes do not pile
up: at a 1 s interval and a 15 s scrape, one aggregation in fifteen rounds, the scrape's (an
aggregation of its own every 15 s as well cost a second one, its fixed part, per scrape).
SIGTERM and SIGINT end the loop; the store then compacts its journals and the daemon exits 0.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import sys
import threading
import time
from functools import cached_property
from types import FrameType
from typing import TYPE_CHECKING

from exporters.http import MetricsServer, serve
from exporters.process import ProcessFamilies
from exporters.prometheus import TallyCollector
from telemetry import heap
from telemetry.clock import SteadyClock
from telemetry.collectors import REGISTRY, CollectorContext, Runner
from telemetry.collectors.base import CollectorStatus
from telemetry.config import DaemonConfig, load_object
from telemetry.frame import RoundBatch
from telemetry.logs import OnceLogger, say
from telemetry.state import Snapshot, State
from telemetry.store.writer import Store
from telemetry.wake import WakePipe

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

log = logging.getLogger("tally.daemon")

# Rows held in memory while the data dir cannot be written (disk full, read-only): about an
# hour of a busy GPU node at 5 s; beyond that the oldest batches are given up.
MAX_PENDING_ROWS = 200_000
# Rounds not yet aggregated are ingested by the next scrape, or once they span this long.
AGGREGATE_EVERY_SECONDS = 60.0
# How often the heap's free pages go back to the system (0.6 ms).
TRIM_EVERY_SECONDS = 15.0


class Daemon:
    """One node daemon; :meth:`run` blocks until :meth:`stop` or a signal."""

    def __init__(self, config: DaemonConfig) -> None:
        config.check()
        self.config = config
        self.node = config.node or socket.gethostname()
        self.stop_event = threading.Event()
        self._waker: WakePipe | None = None  # what the loop sleeps on while it runs
        inventory = None
        if config.inventory is not None:  # the billing modules load only when asked for
            from telemetry.billing.inventory import load_inventory

            inventory = load_inventory(config.inventory)
        # a node's pool counters count its own capacity, so that they sum across nodes
        # (SPEC §6); the pool's declared units are the whole pool's, which no node has alone.
        # Its rows come in time order (a clock step back drops them) and its job tables are
        # shown only as they are now: kept as their newest rows.
        self.state = State(
            config.max_gap_seconds,
            inventory,
            declared_capacity=False,
            latest_only=frozenset({"job", "gpu_job"}),
        )
        self.store = Store(config.data_dir, self.node, config.rotate_seconds)
        self.store_errors = 0
        self._pending: list[tuple[str, RoundBatch]] = []
        self.pending_dropped = 0
        self._last_time_ns = 0
        self.clock_dropped: dict[str, int] = {}
        # Rounds collected but not yet ingested into the live state, the last round's collector
        # status, and the snapshot of everything ingested (None: rounds came in since it was made).
        self._lock = threading.Lock()
        self._unaggregated: list[tuple[str, RoundBatch]] = []
        self._rounds_unaggregated = 0
        self._aggregate_every = max(1, int(AGGREGATE_EVERY_SECONDS / config.interval_seconds))
        self._trim_every = max(1, int(TRIM_EVERY_SECONDS / config.interval_seconds))
        self._rounds = 0
        self._status: dict[str, CollectorStatus] = {}
        self._lost_gpus: list[tuple[int, str | None]] = []
        self._published: Snapshot | None = Snapshot()
        self.compact_requested = False
        self._once = OnceLogger(log)
        ctx = CollectorContext(
            procfs=config.procfs,
            sysfs=config.sysfs,
            node=self.node,
            user_hz=os.sysconf("SC_CLK_TCK"),
            nvml_module=load_object(config.nvml_module) if config.nvml_module else None,
            rootfs=config.rootfs,
            podresources=config.podresources,
            k8s_tenant_label=config.k8s_tenant_label,
            slurm_job_info_dir=config.slurm_job_info_dir,
            gpu_energy_counter=config.gpu_energy == "counter",
        )
        enabled = [
            name
            for name, cls in REGISTRY.items()
            if config.collectors.get(name, cls.default_enabled)
        ]
        self.clock = SteadyClock()
        self.runner = Runner([REGISTRY[name](ctx) for name in enabled], clock_ns=self.clock)
        # tally's families, then the process_* ones, rendered from columns for the text format
        # and OpenMetrics 1.0; prometheus-client is loaded only for a format only it writes.
        self.tally = TallyCollector(
            self.snapshot, config.dcgm_compat, ProcessFamilies(), arrow=False
        )
        self.server: MetricsServer | None = None

    @cached_property
    def registry(self) -> CollectorRegistry:
        """The same families as a prometheus-client registry (built on first use)."""
        from prometheus_client import CollectorRegistry

        registry = CollectorRegistry()
        registry.register(self.tally)
        return registry

    def render_text(self) -> bytes:
        """/metrics in the text format: tally's families, then the process_* families."""
        return self.tally.render_text()

    def render_openmetrics(self) -> bytes:
        """/metrics in OpenMetrics 1.0.0, the same families."""
        return self.tally.render_openmetrics()

    def stop(self, *_: object) -> None:
        """End the loop after the round in progress (from a signal handler or any thread)."""
        self.stop_event.set()
        waker = self._waker
        if waker is not None:
            waker.wake()

    def round(self) -> None:
        """Collect once and persist; the rows wait for the next aggregation (:meth:`snapshot`)."""
        result = self.runner.run()
        dropped: dict[str, int] = {}
        if result.time_ns <= self._last_time_ns:
            # The system clock stepped back: these samples would sit before ones already
            # stored and turn counter deltas into false restarts. Drop and count them.
            dropped = {table: batch.num_rows for table, batch in result.batches.items()}
            self._once.warning(
                "clock", "system clock stepped backwards; samples dropped until it catches up"
            )
            result.batches = {}
        else:
            self._last_time_ns = result.time_ns
            self._once.clear("clock")
        self._pending.extend(result.batches.items())
        self._flush_pending()
        with self._lock:  # scrapes read these from their own threads
            for table, rows in dropped.items():
                self.clock_dropped[table] = self.clock_dropped.get(table, 0) + rows
            self._unaggregated.extend(result.batches.items())
            self._rounds_unaggregated += 1
            self._status = result.status
            self._lost_gpus = result.lost_gpus
            self._published = None
            if self._rounds_unaggregated >= self._aggregate_every:
                self._aggregate()
        self._rounds += 1
        if self._rounds % self._trim_every == 0:
            heap.trim()

    def _aggregate(self) -> None:
        """Ingest the rounds collected since the last aggregation, one batch per table (the
        state's sums do not depend on how the rows are split). Called with the lock held."""
        by_table: dict[str, list[RoundBatch]] = {}
        for table, batch in self._unaggregated:
            by_table.setdefault(table, []).append(batch)
        self._unaggregated, self._rounds_unaggregated = [], 0
        for table, batches in by_table.items():
            try:
                self.state.ingest(table, RoundBatch.frame_of(batches))
            except ValueError as exc:  # never expected of our own rows: the journal has them
                self._once.warning(f"ingest:{table}", f"live {table} rows left out: {exc}")

    def snapshot(self) -> Snapshot:
        """What a scrape renders: every round collected so far, aggregated; made once per round
        at most, whatever the number of scrapes."""
        with self._lock:
            if self._published is not None:
                return self._published
            self._aggregate()
            snapshot = self.state.snapshot(self._status)
            snapshot.lost_gpus = [(self.node, index, uuid) for index, uuid in self._lost_gpus]
            snapshot.hide_lost_gpus()
            for table, rows in self.clock_dropped.items():
                snapshot.ingest[table].late += rows
            snapshot.store = {
                "rows_written": self.store.rows_written,
                "errors": self.store_errors + self.store.lost_journals,
                "clock_steps": self.clock.steps,
            }
            self._published = snapshot
            return snapshot

    def _collector_summary(self) -> str:
        """``collectors: cpu, job; failed: gpu`` after the first round (the log says why)."""
        status = self._status
        working = [
            c.name for c in self.runner.collectors if c.name in status and status[c.name].success
        ]
        failed = [c.name for c in self.runner.collectors if c.name not in working]
        summary = f"collectors: {', '.join(working) or 'none'}"
        return summary + (f"; failed: {', '.join(failed)}" if failed else "")

    def _flush_pending(self) -> None:
        """Write held batches oldest first; on a write error keep them (bounded) for next round."""
        while self._pending:
            table, batch = self._pending[0]
            try:
                self.store.append(table, batch)
            except OSError as exc:
                self.store_errors += 1
                self._once.warning(
                    "store",
                    f"cannot write samples to {self.config.data_dir} ({exc}); retrying each round",
                )
                held = sum(b.num_rows for _, b in self._pending)
                while held > MAX_PENDING_ROWS and len(self._pending) > 1:
                    held -= self._pending.pop(0)[1].num_rows
                    self.pending_dropped += 1
                return
            self._pending.pop(0)
            self._once.clear("store")

    def run(self) -> int:
        heap.one_arena()  # before the server's threads exist
        # Bound before the store is opened and the first round runs (a bad address or web config
        # fails fast), started after it, so the first scrape already sees data.
        self.server = serve(
            lambda: self.registry,
            self.config.listen,
            self.config.web_config,
            self.render_text,
            start=False,
            openmetrics=self.render_openmetrics,
        )
        try:
            self.store.open()
        except BaseException:
            self.server.stop()
            raise
        try:
            self.round()
            self.server.start()
            names = self._collector_summary()
            banner = (
                f"tally daemon: node {self.node}, serving {self.server.url}, "
                f"writing {self.config.data_dir} every {self.config.interval_seconds:g}s "
                f"({names})"
            )
            say(banner, stream=sys.stdout)
            self._loop()
        finally:
            self._shutdown()
        return 0

    def _loop(self) -> None:
        interval = self.config.interval_seconds
        start = time.monotonic()
        tick = 0
        # Between rounds the loop sleeps in poll() on a pipe that stop() writes to: an Event's
        # timed wait cost twice the CPU of a plain sleep, every second of the daemon's life.
        waker = self._waker = WakePipe()
        poller = select.poll()
        poller.register(waker.fd, select.POLLIN)
        try:
            while not self.stop_event.is_set():
                tick += 1
                now = time.monotonic()
                # Keep the schedule; a round that overran skips the slots it missed.
                next_at = start + tick * interval
                if next_at < now:
                    tick = int((now - start) / interval) + 1
                    next_at = start + tick * interval
                poller.poll((next_at - now) * 1000)
                if self.stop_event.is_set():
                    break
                if self.compact_requested:
                    self.compact_requested = False
                    self._compact_now()
                self.round()
        finally:
            self._waker = None
            waker.close()

    def _compact_now(self) -> None:
        """SIGHUP: compact every open journal to Parquet now and go on (log rotation, backups)."""
        try:
            self.store.rotate()
        except OSError as exc:
            self.store_errors += 1
            log.warning("SIGHUP: compaction failed (%s); the journals stay and are retried", exc)
            return
        log.info("SIGHUP: journals compacted to Parquet; collecting on")

    def status_line(self) -> str:
        """What SIGUSR1 logs: rows written, store errors and each collector's last result."""
        collectors = ", ".join(
            f"{name} {'ok' if s.success else 'failed'}" for name, s in self._status.items()
        )
        return (
            f"status: {self.store.rows_written} rows written, {self.store_errors} store errors; "
            f"collectors: {collectors or 'none yet'}"
        )

    def _shutdown(self) -> None:
        if self.server is not None:
            self.server.stop()
        self.runner.close()
        self._flush_pending()  # a last try for what a full disk held back
        held = sum(batch.num_rows for _, batch in self._pending)
        if held:
            log.warning(
                "stopping with %d collected rows that could not be written to %s: lost",
                held,
                self.config.data_dir,
            )
        self.store.close()
        log.info("stopped; %d rows written", self.store.rows_written)


def run_daemon(config: DaemonConfig) -> int:
    """Run a daemon until SIGTERM/SIGINT; returns the exit code. SIGHUP compacts the journals
    and goes on; SIGUSR1 logs a status line."""
    daemon = Daemon(config)

    def handle(signum: int, frame: FrameType | None) -> None:
        daemon.stop()

    def compact(signum: int, frame: FrameType | None) -> None:
        daemon.compact_requested = True  # done by the loop, between rounds

    def status(signum: int, frame: FrameType | None) -> None:
        log.info("SIGUSR1: %s", daemon.status_line())

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    # Their default action kills the process without compacting (exit 129, 138).
    signal.signal(signal.SIGHUP, compact)
    signal.signal(signal.SIGUSR1, status)
    return daemon.run()
