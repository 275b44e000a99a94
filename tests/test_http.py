from __future__ import annotations

import email.utils
import gzip
import http.client
import socket
import time
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry

from exporters.http import MetricsServer, http_date
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


def _switches(thread_id: int | None) -> int:
    """Context switches of one of this process's threads: it ran, woken or preempted."""
    with open(f"/proc/self/task/{thread_id}/status") as status:
        return sum(int(line.split()[1]) for line in status if "ctxt_switches:" in line)


def test_an_idle_server_sleeps_until_a_scrape_and_stops_at_once(server: MetricsServer) -> None:
    """Between scrapes the serving and deadline threads sleep in the kernel: socketserver's
    loop woke twice a second to look for a shutdown, and the deadline watchdog once, which
    cost a node daemon more CPU than its scrapes. Neither waits for a tick to stop either."""
    threads = [server._thread.native_id, server._watchdog.native_id]
    assert _get(server.port, "/metrics").status == 200
    time.sleep(0.3)  # the connection's deadline is far off: nothing to do until it
    before = [_switches(t) for t in threads]
    time.sleep(1.6)
    assert [_switches(t) for t in threads] == before
    assert _get(server.port, "/metrics").status == 200  # and it still serves
    began = time.monotonic()
    server.stop()
    assert time.monotonic() - began < 0.2
    assert not server._thread.is_alive() and not server._watchdog.is_alive()


def test_a_connection_that_cannot_be_cut_yet_is_tried_again_a_second_later(
    server: MetricsServer,
) -> None:
    """A TLS connection's raw socket is detached while it is wrapped, so cutting it at the
    deadline may fail once: the watchdog tries again a second later (neither gives up on it
    nor spins on it holding the lock the wrapping needs)."""

    class Wrapping:
        def __init__(self) -> None:
            self.calls = 0

        def shutdown(self, how: int) -> None:
            self.calls += 1
            if self.calls == 1:
                raise OSError(9, "Bad file descriptor")

    httpd = server._httpd
    httpd.connection_deadline_s = 0.2
    sock = Wrapping()
    with httpd.open_changed:
        httpd.open[sock] = [sock, time.monotonic(), False]
        httpd.open_changed.notify()
    time.sleep(0.6)
    assert sock.calls == 1, "tried at the deadline, and not again at once"
    time.sleep(1.0)
    assert sock.calls == 2
    with httpd.open_lock:
        assert httpd.open[sock][2], "cut the second time"
        del httpd.open[sock]


def test_socketservers_own_shutdown_ends_the_serving_loop(server: MetricsServer) -> None:
    """socketserver's shutdown() waits for a flag its own loop sets; the server's loop is its
    own, so shutdown() wakes it instead of waiting for ever."""
    server._httpd.shutdown()
    server._thread.join(timeout=2)
    assert not server._thread.is_alive()


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


def _raw(port: int, request: bytes) -> bytes:
    """Send ``request`` as it is and read the whole answer (the server closes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(request)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", b"200 OK"),
        (b"\r\nGET / HTTP/1.0\n\n", b"200 OK"),  # a leading empty line, bare LF line ends
        (b"GET /metrics\r\n\r\n", b"400 Bad Request"),  # HTTP/0.9
        (b"GET  /metrics HTTP/1.1\r\n\r\n", b"400 Bad Request"),
        (b"GET /metrics HTTP/2.0\r\n\r\n", b"505 HTTP Version Not Supported"),
        (b"GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n", b"400 Bad Request"),
        (b"GET /metrics HTTP/1.1\r\n folded: x\r\n\r\n", b"400 Bad Request"),
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", b"414 URI Too Long"),
        (b"GET / HTTP/1.1\r\nX: " + b"a" * 9000 + b"\r\n\r\n", b"431 Request Header Fields"),
        (b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 101 + b"\r\n", b"431 Request Header Fields"),
        (b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n", b"501 Not Implemented"),
    ],
)
def test_requests_good_and_bad_get_one_plain_answer(
    server: MetricsServer, request_bytes: bytes, status: bytes
) -> None:
    answer = _raw(server.port, request_bytes)
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0].startswith(b"HTTP/1.0 " + status), answer[:200]
    headers = dict(line.split(b": ", 1) for line in lines[1:])
    assert headers[b"Server"] == b"tally"
    assert int(headers[b"Content-Length"]) == len(body)
    date = email.utils.parsedate_to_datetime(headers[b"Date"].decode())
    assert abs(date.timestamp() - time.time()) < 60


def test_header_names_are_case_insensitive_and_the_first_of_a_repeat_wins(
    server: MetricsServer,
) -> None:
    plain = _raw(server.port, b"GET /metrics HTTP/1.1\r\n\r\n").partition(b"\r\n\r\n")[2]
    answer = _raw(
        server.port,
        b"GET /metrics HTTP/1.1\r\naccept-ENCODING: gzip\r\nAccept-Encoding: identity\r\n\r\n",
    )
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"Content-Encoding: gzip" in head and gzip.decompress(body) == plain


def test_head_answers_what_get_would_without_the_body(server: MetricsServer) -> None:
    get = _raw(server.port, b"GET /metrics HTTP/1.1\r\n\r\n")
    head = _raw(server.port, b"HEAD /metrics HTTP/1.1\r\n\r\n")
    get_head, _, body = get.partition(b"\r\n\r\n")
    assert body and head.endswith(b"\r\n\r\n") and head.count(b"\r\n\r\n") == 1
    strip = [line for line in get_head.split(b"\r\n") if not line.startswith(b"Date:")]
    assert [line for line in head.split(b"\r\n") if not line.startswith(b"Date:")][:-2] == strip


@pytest.mark.parametrize("seconds", [0, 951782400, 1_788_220_800.5, 4_102_444_799])
def test_http_dates_are_what_the_standard_library_writes(seconds: float) -> None:
    assert http_date(seconds) == email.utils.formatdate(seconds, usegmt=True)
