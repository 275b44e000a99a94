"""The column renderer writes byte for byte what prometheus-client's ``generate_latest`` writes.

prometheus-client is the oracle: the same families go through its per-sample objects and text
encoder, and the bytes must be equal — hostile label values, NaN/±Inf, values that switch to an
exponent, empty families, pools, dcgm names, every collector state.
"""

from __future__ import annotations

import math
import os
import platform
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.utils import floatToGoString

from exporters import exposition
from exporters.exposition import (
    Block,
    ColumnFamily,
    PrefixCache,
    go_float,
    render_text,
    strings,
    to_client_metric,
)
from exporters.http import OPENMETRICS_1_0_0, TEXT_0_0_4, MetricsServer, negotiate
from exporters.process import ProcessFamilies, fd_dir_sized, open_fds
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


def _client_openmetrics(collector: TallyCollector) -> bytes:
    registry = CollectorRegistry()
    registry.register(collector)
    return generate_openmetrics(registry)


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
    openmetrics = collector.render_openmetrics()
    assert openmetrics == _client_openmetrics(collector)
    exposition._ARROW_FROM_ROWS = 0  # every block through Arrow, however small
    try:
        assert collector.render_text() == fast
        assert collector.render_openmetrics() == openmetrics
    finally:
        exposition._ARROW_FROM_ROWS = ARROW_FROM_ROWS
    assert b"tally_pool_capacity_unit_seconds_total{" in fast
    assert b"e+" in fast  # some values are written with an exponent


def test_empty_snapshot_is_byte_identical() -> None:
    collector = TallyCollector(Snapshot)
    assert collector.render_text() == _client_text(collector)
    assert collector.render_openmetrics() == _client_openmetrics(collector)


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
    doc=st.text(max_size=30) | st.sampled_from(['say "no"', "back\\slash", "two\nlines"]),
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
    expected, openmetrics = generate_latest(registry), generate_openmetrics(registry)
    for arrow_from in (0, 10**9):  # the Arrow path for every block, then the Python path
        exposition._ARROW_FROM_ROWS = arrow_from
        try:
            assert render_text([family]) == expected
            assert render_text([family], openmetrics=True) == openmetrics
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


def test_http_serves_both_formats_from_the_column_renderer_and_others_from_the_client() -> None:
    snapshot = _rich_snapshot(HOSTILE[0])
    collector = TallyCollector(lambda: snapshot)
    registry = CollectorRegistry()
    registry.register(collector)
    calls: list[str] = []

    def text() -> bytes:
        calls.append("text")
        return collector.render_text()

    def openmetrics() -> bytes:
        calls.append("openmetrics")
        return collector.render_openmetrics()

    built: list[CollectorRegistry] = []

    def factory() -> CollectorRegistry:
        built.append(registry)
        return registry

    server = MetricsServer(factory, "127.0.0.1", 0, text=text, openmetrics=openmetrics)
    server.start()
    url = f"http://127.0.0.1:{server.port}/metrics"

    def get(accept: str | None) -> tuple[str, bytes]:
        request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.headers["Content-Type"], response.read()

    try:
        kind, body = get(None)
        assert kind.startswith("text/plain; version=0.0.4") and body == generate_latest(registry)
        # what Prometheus sends by default
        prometheus = (
            "application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
            "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
        )
        kind, body = get(prometheus)
        assert kind == f"{OPENMETRICS_1_0_0}; escaping=underscores"
        assert body == generate_openmetrics(registry) and body.endswith(b"# EOF\n")
        assert calls == ["text", "openmetrics"] and not built
        # a format only the client writes: the registry is built now, once
        kind, body = get("application/openmetrics-text;version=1.0.0;escaping=dots")
        assert kind.endswith("escaping=dots") and built == [registry]
        assert body == generate_openmetrics(registry, escaping="dots")
        get("text/plain;version=1.0.0")
        assert built == [registry] and calls == ["text", "openmetrics"]
    finally:
        server.stop()


accept_media = st.sampled_from(
    ["application/openmetrics-text", "text/plain", "*/*", "application/json", ""]
)
accept_params = st.lists(
    st.sampled_from(
        ["version=1.0.0", "version=0.0.1", "version=0.0.4", "version=2.0.0", "version=1.x",
         "escaping=underscores", "escaping=allow-utf-8", "escaping=dots", "escaping=values",
         "escaping=bogus", "q=0.5", "charset=utf-8"]
    ),
    max_size=3,
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(accept_media, accept_params), max_size=4))
def test_negotiation_chooses_as_the_client_does(offers: list[tuple[str, list[str]]]) -> None:
    accept = ",".join(";".join([media, *params]) for media, params in offers)
    kind, content_type = negotiate(accept)
    try:
        client_type = choose_encoder(accept)[1]
    except TypeError:  # the client cannot compare "1.x" with a number; we take it as too low
        return
    if kind == "client":  # only what the column renderer does not write is left to the client
        assert client_type != TEXT_0_0_4
        ours = client_type.startswith(OPENMETRICS_1_0_0) and client_type.endswith(
            ("=underscores", "=allow-utf-8")
        )
        assert not ours, accept
    else:
        assert content_type == client_type, accept
        assert (kind == "openmetrics") == client_type.startswith("application/openmetrics-text")


def test_process_families_are_the_clients() -> None:
    ours = ProcessFamilies()()
    registry = CollectorRegistry()
    client = ProcessCollector(registry=registry)
    theirs = list(client.collect())
    ours_again = ProcessFamilies()()
    assert [(f.name, f.kind, f.documentation) for f in ours] == [
        (m.name, m.type, m.documentation) for m in theirs
    ]
    for before, metric, after in zip(ours, theirs, ours_again, strict=True):
        low, high = sorted([before.blocks[0].values[0], after.blocks[0].values[0]])
        value = metric.samples[0].value
        if metric.name == "process_resident_memory_bytes":
            low, high = low * 0.9, high * 1.1  # the page count moves between reads
        if metric.name == "process_open_fds":
            low, high = low - 2, high + 2
        assert low <= value <= high, metric.name


def test_a_block_with_more_label_values_than_samples_is_refused() -> None:
    """A label column longer or shorter than the block's values is a bug upstream: refused,
    never rendered as the lines that happen to pair up."""
    for labels in (["a", "b", "c"], ["a"]):
        with pytest.raises(ValueError, match="label values"):
            exposition._block_text_small("tally_x", ("i",), Block([labels], np.array([1.0, 2.0])))


def test_open_fds_by_the_directory_size_count_as_a_listing_does(tmp_path: Path) -> None:
    """Where /proc/self/fd tells its entries by its size, that size (one more for the
    listing's own descriptor) is the listing's count, descriptors opened meanwhile included;
    an ordinary directory's size tells nothing, and its entries are listed."""
    fd_dir = "/proc/self/fd"
    sized = fd_dir_sized(fd_dir)
    release = re.match(r"(\d+)\.(\d+)", platform.release())
    if release is not None and (int(release[1]), int(release[2])) >= (6, 2):
        assert sized  # the size is asked, not a listing made, where the kernel tells it
    opened = [os.open(tmp_path, os.O_RDONLY) for _ in range(5)]
    try:
        assert open_fds(fd_dir, sized) == len(os.listdir(fd_dir))
        assert open_fds(fd_dir, False) == len(os.listdir(fd_dir))
    finally:
        for fd in opened:
            os.close(fd)
    for name in "abc":
        (tmp_path / name).write_text("")
    assert not fd_dir_sized(str(tmp_path))
    assert open_fds(str(tmp_path), False) == 3


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


@pytest.mark.parametrize("hostile", ["", "a\\b", "two\nlines", 'say "no"'])
@pytest.mark.parametrize("sliced", [False, True])
def test_large_blocks_escape_label_columns_as_the_client_does(hostile: str, sliced: bool) -> None:
    """The Arrow path escapes a label column only when its bytes hold a backslash, newline or
    quote: one such value among thousands is still escaped, and a column sliced out of a larger
    one (whose other rows hold all three) renders its own rows as the client does."""
    import pyarrow as pa

    n = 2 * ARROW_FROM_ROWS
    names = [f"host-{i}" for i in range(n)]
    names[n // 2] += hostile
    column: pa.Array = pa.array(names, pa.string())
    if sliced:
        column = pa.array(['x\\y"\n', *names, 'q"'], pa.string()).slice(1, n)
    family = ColumnFamily("tally_y", "gauge", "h", ("node", "job"))
    family.add([column, strings([str(i) for i in range(n)])], np.arange(n, dtype=np.float64))
    registry = CollectorRegistry()
    registry.register(_One(family))
    rendered = render_text([family])
    assert rendered == generate_latest(registry)
    if hostile:  # the client's oracle saw the escaped value, not the raw one
        assert hostile.encode() not in rendered


def test_families_sharing_label_columns_render_as_the_client_does() -> None:
    """Families of one entity share their label columns, whose joined labels the Arrow path
    makes once a scrape: each family still gets its own name, constants and values, and one
    with missing readings only its own rows."""
    n = 2 * ARROW_FROM_ROWS
    node = strings([f"n{i // 8}" for i in range(n)])
    gpu = strings([str(i % 8) for i in range(n)])
    power = ColumnFamily("tally_gpu_power_watts", "gauge", "h", ("node", "gpu"))
    power.add([node, gpu], np.linspace(70.0, 700.0, n))
    avg = ColumnFamily("tally_gpu_avg_ratio", "gauge", "h", ("window", "node", "gpu"))
    sparse = np.where(np.arange(n) % 3 == 0, math.nan, np.linspace(0.0, 1.0, n))
    avg.add(["5m", node, gpu], sparse)
    avg.add(["1h", node, gpu], np.linspace(1.0, 0.0, n))
    registry = CollectorRegistry()
    registry.register(_One(power))
    registry.register(_One(avg))
    assert render_text([power, avg]) == generate_latest(registry)


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
