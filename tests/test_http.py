from __future__ import annotations

import gzip
import http.client
import socket
import time
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry

from exporters.http import MetricsServer
from exporters.prometheus import TallyCollector
from telemetry.state import State
from tests.support.tables import cpu_table


@pytest.fixture
def server() -> Iterator[MetricsServer]:
    state = State()
    state.ingest("cpu", cpu_table("n1", [0, 5, 10]))
    snapshot = state.snapshot()
    registry = CollectorRegistry()
    registry.register(TallyCollector(lambda: snapshot))
    srv = MetricsServer(registry, "127.0.0.1", 0)
    srv.start()
    yield srv
    srv.stop()


def _get(port: int, path: str, headers: dict[str, str] | None = None) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("GET", path, headers=headers or {})
    return conn.getresponse()


def test_metrics_plain_text(server: MetricsServer) -> None:
    resp = _get(server.port, "/metrics")
    body = resp.read()
    assert resp.status == 200
    assert resp.getheader("Content-Type", "").startswith("text/plain; version=0.0.4")
    assert resp.getheader("Content-Encoding") is None
    assert b'tally_cpus{node="n1"} 8.0' in body
    assert resp.getheader("Server") == "tally", "no version, no trailing space"


def test_gzip_only_when_asked(server: MetricsServer) -> None:
    plain = _get(server.port, "/metrics").read()
    resp = _get(server.port, "/metrics", {"Accept-Encoding": "gzip, deflate"})
    assert resp.getheader("Content-Encoding") == "gzip"
    assert gzip.decompress(resp.read()) == plain


def test_openmetrics_negotiated(server: MetricsServer) -> None:
    accept = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
    resp = _get(server.port, "/metrics", {"Accept": accept})
    body = resp.read()
    assert resp.getheader("Content-Type", "").startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")


def test_other_paths(server: MetricsServer) -> None:
    assert _get(server.port, "/").status == 200
    assert _get(server.port, "/-/healthy").read() == b"OK\n"
    assert _get(server.port, "/nope").status == 404


def test_stalled_client_does_not_block_others(server: MetricsServer) -> None:
    stalled = socket.create_connection(("127.0.0.1", server.port))
    stalled.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # never finishes its headers
    try:
        start = time.monotonic()
        for _ in range(5):
            assert _get(server.port, "/metrics").status == 200
        assert time.monotonic() - start < 2.0
    finally:
        stalled.close()


def test_ipv6_loopback_when_available() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        srv = MetricsServer(CollectorRegistry(), "::1", 0)
    except OSError:
        pytest.skip("IPv6 loopback not configured")
    srv.start()
    try:
        conn = http.client.HTTPConnection("::1", srv.port, timeout=5)
        conn.request("GET", "/-/healthy")
        assert conn.getresponse().status == 200
    finally:
        srv.stop()


def test_a_server_never_started_stops_at_once() -> None:
    """A daemon whose first round fails stops a bound but never started server: that must not
    wait for a serve loop that never ran (it hung for good before)."""
    srv = MetricsServer(CollectorRegistry(), "127.0.0.1", 0)
    began = time.monotonic()
    srv.stop()
    assert time.monotonic() - began < 1.0
    with socket.socket() as again:  # the port is released
        again.bind(("127.0.0.1", srv.port))


def test_slow_clients_are_bounded_and_cut(server: MetricsServer) -> None:
    """Slowloris: at systemd's 1024 descriptors, 906 held threads took the descriptors the
    collectors needed. Connections past the limit are closed at once, and none lives past
    the deadline, however slowly it sends its headers."""
    import threading

    httpd = server._httpd
    httpd.max_connections, httpd.connection_deadline_s = 4, 1.0
    threads_before = threading.active_count()
    slow = []
    for _ in range(10):
        s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        s.sendall(b"GET /metrics HTTP/1.1\r\nX-a: ")  # and never the rest
        slow.append(s)
    time.sleep(0.3)
    assert threading.active_count() <= threads_before + 4
    refused = 0
    for s in slow:
        s.settimeout(5)
        try:
            closed = s.recv(1) == b""
        except OSError:
            closed = True
        refused += closed
        s.close()
    assert refused == 10, "6 refused at once, 4 cut at the deadline"
    assert httpd.refused >= 6
    # The cut connections' threads end just after their sockets close; a scrape is served as
    # soon as they have (until then it would be one past the limit).
    deadline = time.monotonic() + 5
    while httpd.open and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not httpd.open, "the cut connections' threads ended"
    resp = _get(server.port, "/metrics")
    assert resp.status == 200 and b"tally_cpus" in resp.read()
