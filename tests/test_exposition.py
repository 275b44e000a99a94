"""The column renderer writes byte for byte what prometheus-client's ``generate_latest`` writes.

prometheus-client is the oracle: the same families go through its per-sample objects and text
encoder, and the bytes must be equal — hostile label values, NaN/±Inf, values that switch to an
exponent, empty families, pools, dcgm names, every collector state.
"""

from __future__ import annotations

import math
import urllib.request
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.utils import floatToGoString

from exporters import exposition
from exporters.exposition import (
    ColumnFamily,
    PrefixCache,
    go_float,
    render_text,
    strings,
    to_client_metric,
)
from exporters.http import MetricsServer
from exporters.prometheus import TallyCollector
from telemetry.billing.inventory import parse_inventory
from telemetry.collectors.base import CollectorStatus
from telemetry.state import Snapshot, State
from tests.support.tables import HOSTILE, cpu_table, gpu_table, job_table

ARROW_FROM_ROWS = exposition._ARROW_FROM_ROWS

INVENTORY = """
currency = "EUR"
[[pool]]
name = "gpu-a"
kind = "gpu"
ownership = "own"
nodes = ["n*"]
cost_per_unit_hour = 1.5
price_per_unit_hour = 2.75
[[pool]]
name = "cpu-a"
kind = "cpu"
ownership = "leased"
nodes = ["*"]
cost_per_unit_hour = 0.01
price_per_unit_hour = 0.02
"""


def _client_text(collector: TallyCollector) -> bytes:
    registry = CollectorRegistry()
    registry.register(collector)
    return generate_latest(registry)


def _rich_snapshot(label: str) -> Snapshot:
    state = State(inventory=parse_inventory(INVENTORY, "t.toml"))
    times = [float(t) for t in range(0, 900, 5)]
    state.ingest("cpu", cpu_table("n1", times))
    state.ingest("cpu", cpu_table(label, times, cpus=2048))
    for i in range(8):
        state.ingest("gpu", gpu_table("n1", f"GPU-{i}", i, times, util=i / 7, job_id=str(i % 3)))
    state.ingest("gpu", gpu_table(label, "GPU-" + label, 3, times, util=None, model=label))
    state.ingest("job", job_table("n1", "0", times, user=label, account=label))
    state.ingest("job", job_table(label, label, times, gpus=0.25))
    status = {
        "cpu": CollectorStatus(True, 0.0021),
        "gpu": CollectorStatus(False, 1.5e-5, "x"),
        "job": CollectorStatus(True, 12345678.9),
    }
    snapshot = state.snapshot(status)
    snapshot.store = {"rows_written": 10_000_000, "errors": 3}
    return snapshot


@pytest.mark.parametrize("label", ["plain", *HOSTILE])
@pytest.mark.parametrize("dcgm", [False, True])
def test_whole_exposition_is_byte_identical(label: str, dcgm: bool) -> None:
    snapshot = _rich_snapshot(label)
    collector = TallyCollector(lambda: snapshot, dcgm_compat=dcgm)
    fast = collector.render_text()
    # dcgm-exporter's energy counter has no _total: prometheus-client can only write it untyped.
    bare = b"# TYPE DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION "
    assert fast == _client_text(collector).replace(bare + b"untyped", bare + b"counter")
    assert (bare + b"counter\n" in fast) == dcgm
    exposition._ARROW_FROM_ROWS = 0  # every block through Arrow, however small
    try:
        assert collector.render_text() == fast
    finally:
        exposition._ARROW_FROM_ROWS = ARROW_FROM_ROWS
    assert b"tally_pool_capacity_unit_seconds_total{" in fast
    assert b"e+" in fast  # some values are written with an exponent


def test_empty_snapshot_is_byte_identical() -> None:
    collector = TallyCollector(Snapshot)
    assert collector.render_text() == _client_text(collector)


class _One:
    def __init__(self, family: ColumnFamily) -> None:
        self.family = family

    def collect(self) -> Iterator[Metric]:
        yield to_client_metric(self.family)


label_text = st.text(alphabet=st.characters(codec="utf-8"), max_size=20)
values = st.floats(allow_nan=True, allow_infinity=True) | st.integers(-(2**60), 2**60).map(float)


@settings(max_examples=200, deadline=None)
@given(
    rows=st.lists(st.tuples(label_text, label_text, values), max_size=30),
    constant=label_text,
    kind=st.sampled_from(["counter", "gauge"]),
    doc=st.text(max_size=30),
)
def test_any_family_renders_as_the_client_does(
    rows: list[tuple[str, str, float]], constant: str, kind: str, doc: str
) -> None:
    family = ColumnFamily("tally_x", kind, doc, ("zeta", "alpha", "mid"))
    family.add(
        [strings([r[0] for r in rows]), strings([r[1] for r in rows]), constant],
        np.array([r[2] for r in rows], dtype=np.float64),
    )
    registry = CollectorRegistry()
    registry.register(_One(family))
    expected = generate_latest(registry)
    for arrow_from in (0, 10**9):  # the Arrow path for every block, then the Python path
        exposition._ARROW_FROM_ROWS = arrow_from
        try:
            assert render_text([family]) == expected
        finally:
            exposition._ARROW_FROM_ROWS = ARROW_FROM_ROWS


@settings(max_examples=500, deadline=None)
@given(st.floats(allow_nan=True, allow_infinity=True))
def test_go_float_is_the_clients_float_format(value: float) -> None:
    assert go_float(value) == floatToGoString(value)


@pytest.mark.parametrize("value", [1e6, 999999.0, 1234567.0, 1e15, 9.999e15, 1e16, 1e21, -1e7])
def test_exponent_boundaries(value: float) -> None:
    assert go_float(value) == floatToGoString(value)
    family = ColumnFamily("tally_y", "gauge", "h", ())
    family.add([], np.array([value, math.nan]))
    registry = CollectorRegistry()
    registry.register(_One(family))
    assert render_text([family]) == generate_latest(registry)


def test_http_serves_the_column_renderer_for_text_and_the_client_for_openmetrics() -> None:
    snapshot = _rich_snapshot(HOSTILE[0])
    collector = TallyCollector(lambda: snapshot)
    registry = CollectorRegistry()
    registry.register(collector)
    calls = []

    def text() -> bytes:
        calls.append(1)
        return collector.render_text()

    server = MetricsServer(registry, "127.0.0.1", 0, text=text)
    server.start()
    try:
        url = f"http://127.0.0.1:{server.port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            body = response.read()
        assert calls and body == generate_latest(registry)
        request = urllib.request.Request(
            url, headers={"Accept": "application/openmetrics-text; version=1.0.0"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.headers["Content-Type"].startswith("application/openmetrics-text")
            assert response.read().endswith(b"# EOF\n")
        assert len(calls) == 1
    finally:
        server.stop()


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.floats(1e6, 1e16, exclude_max=True)
        | st.integers(10**6, 10**16 - 1).map(float)
        | st.floats(allow_nan=True, allow_infinity=True),
        min_size=1,
        max_size=600,
    )
)
def test_many_large_values_render_as_the_client_does(values: list[float]) -> None:
    """Bytes and joules (7 to 16 integer digits) take the vectorised exponent form on large
    blocks; each must read as the client's float format."""
    family = ColumnFamily("tally_z", "gauge", "h", ("i",))
    family.add([strings([str(i) for i in range(len(values))])], np.array(values))
    registry = CollectorRegistry()
    registry.register(_One(family))
    exposition._ARROW_FROM_ROWS = 0
    try:
        assert render_text([family]) == generate_latest(registry)
    finally:
        exposition._ARROW_FROM_ROWS = ARROW_FROM_ROWS


def _magnitudes() -> np.ndarray:
    """Values over the whole float range: every decade, integral or not, either sign, float32
    readings, and the edges where a format changes."""
    rng = np.random.default_rng(7)
    parts = []
    for low, high in [(1e-9, 1e-3), (1e-3, 1.0), (1.0, 1e6), (1e6, 1e14), (1e14, 1e16),
                      (1e16, 1e300)]:  # fmt: skip
        v = np.exp(rng.uniform(np.log(low), np.log(high), 400))
        readings = v[v < 3e38].astype(np.float32).astype(np.float64)  # a float32 gauge
        parts += [v, np.round(v), -v, -np.round(v), readings]
    edges = [0.0, -0.0, 1e-4, -1e-4, 9.999e-5, 5e-324, 1e6, 999999.0, 999999.5, 1e16, 2.0**53,
             2.0**53 + 2, -1e6, -999999.0, 1.7976931348623157e308, math.nan, math.inf]  # fmt: skip
    return np.concatenate([*parts, np.array(edges)])


def test_values_of_every_magnitude_render_as_the_client_does() -> None:
    """Large blocks format values with Arrow's cast and mend where its form differs from the
    client's (".0" after integers, the exponent from 1e6, tiny and large negative values): the
    client itself is the oracle for every one of them."""
    values = _magnitudes()
    family = ColumnFamily("tally_v", "gauge", "h", ("i",))
    family.add([strings([str(i) for i in range(values.size)])], values)
    registry = CollectorRegistry()
    registry.register(_One(family))
    assert values.size >= ARROW_FROM_ROWS  # the vectorised path
    assert render_text([family]) == generate_latest(registry)


def test_prefixes_kept_across_scrapes_follow_changed_labels() -> None:
    """The second scrape reuses the first's series prefixes; a label that changed, a series
    that is new and one whose value became NaN render as the client renders them."""
    prefixes = PrefixCache()

    def scrape(jobs: list[str], users: list[str], values: list[float]) -> None:
        family = ColumnFamily("tally_job_info", "gauge", "h", ("node", "job", "user"))
        family.add(["n1", strings(jobs), strings(users)], np.array(values))
        counter = ColumnFamily("tally_job_cpu_seconds", "counter", "h", ("job",))
        counter.add([strings(jobs)], np.array(values) * 1e7)
        registry = CollectorRegistry()
        registry.register(_One(family))
        registry.register(_One(counter))
        assert render_text([family, counter], prefixes) == generate_latest(registry)

    scrape(["1", "2"], ["alice", 'b"ob'], [1.0, 1.0])
    assert len(prefixes) == 4
    scrape(["1", "2", "3"], ["alice", "carol\\", "dave\n"], [math.nan, 3.0, 2.5])
    assert len(prefixes) == 7  # job 2 changed user, job 3 is new; job 1 has no reading
