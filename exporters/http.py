"""A small threaded HTTP server for ``/metrics``: content negotiation and gzip as Prometheus asks.

One thread per connection, each with a socket timeout, so a slow or stalled client holds only its
own thread and never the collection loop or other scrapers. HTTP/1.0 answers to GET and HEAD, on
``socketserver`` with a request parser of its own: the standard library's ``http.server`` loads
``http.client``, e-mail parsing and OpenSSL, 7.5 MiB resident in a node daemon that otherwise
needs none of them (OpenSSL is loaded where TLS is configured).
"""

from __future__ import annotations

import gzip
import logging
import selectors
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias, overload

from exporters.webconfig import FAILURE_WINDOW_S, WebConfig, load_web_config
from telemetry.config import parse_listen
from telemetry.errors import TallyError
from telemetry.wake import WakePipe

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

log = logging.getLogger("tally.http")

# A registry, or what builds one on the first request only prometheus-client can answer.
Registry: TypeAlias = "CollectorRegistry | Callable[[], CollectorRegistry]"
TEXT_0_0_4 = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS_1_0_0 = "application/openmetrics-text; version=1.0.0; charset=utf-8"


def _param(tokens: list[str], key: str, default: str = "") -> str:
    for token in tokens[1:]:
        name, sep, value = token.strip().partition("=")
        if sep and name == key:
            return value
    return default


def _at_least_1(version: str) -> bool:
    """``version`` ≥ 1.0.0 (a part that is not a number compares as prometheus-client's does
    not: as too low)."""
    parts = version.split(".")
    if not all(p.isdigit() for p in parts):
        return False
    return tuple(int(p) for p in parts) >= (1, 0, 0)


def negotiate(accept: str) -> tuple[str, str]:
    """What to answer an ``Accept`` header with, as prometheus-client's ``choose_encoder``
    decides it: ``("text", type)`` for the 0.0.4 text format, ``("openmetrics", type)`` for
    OpenMetrics 1.0.0 (both rendered from columns), ``("client", "")`` for the formats and
    escapings only the client writes (OpenMetrics 2.0, text 1.0, dots or values escaping)."""
    for accepted in (accept or "").split(","):
        tokens = accepted.split(";")
        media = tokens[0].strip()
        if media not in ("application/openmetrics-text", "text/plain"):
            continue
        version = _param(tokens, "version")
        escaping = _param(tokens, "escaping", "underscores")
        if escaping not in ("allow-utf-8", "underscores", "dots", "values"):
            escaping = "underscores"
        if media == "application/openmetrics-text" and not version:
            return "openmetrics", OPENMETRICS_1_0_0
        if not version or not _at_least_1(version):
            continue
        native = escaping in ("allow-utf-8", "underscores")  # the same bytes for legacy names
        if media == "application/openmetrics-text" and version == "1.0.0" and native:
            return "openmetrics", f"{OPENMETRICS_1_0_0}; escaping={escaping}"
        return "client", ""
    return "text", TEXT_0_0_4


_LANDING = b"""<!doctype html>
<html><head><title>tally</title></head>
<body><h1>tally</h1>
<p>Utilisation telemetry. Metrics: <a href="/metrics">/metrics</a></p></body></html>
"""

CLIENT_TIMEOUT_SECONDS = 10.0


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    # socketserver's default backlog of 5 drops connections when a few dozen scrapers (or
    # federation and dashboards at once) connect together; the kernel caps it at somaxconn.
    request_queue_size = 128
    # Slowloris: connections beyond this many are closed at once (a thread and a descriptor
    # each: 906 held threads took the last file descriptors the collectors needed), and no
    # connection lives longer than the deadline, however slowly it sends its headers.
    max_connections = 128
    connection_deadline_s = 3 * CLIENT_TIMEOUT_SECONDS
    registry: Registry
    web: WebConfig | None = None
    web_problem: str | None = None  # why the changed web config did not load, said once
    web_lock: threading.Lock  # one reload of the web config at a time
    waker: WakePipe

    def __init__(self, address: tuple[str, int], handler: type[Any]) -> None:
        # Made before binding: a bind that fails closes the server, the pipe with it.
        self.waker = WakePipe()
        self.web_lock = threading.Lock()
        super().__init__(address, handler)

    text: Callable[[], bytes] | None = None
    openmetrics: Callable[[], bytes] | None = None

    def client_registry(self) -> CollectorRegistry:
        """The registry, built on first use where it was given as a factory."""
        if callable(self.registry) and not hasattr(self.registry, "collect"):
            self.registry = self.registry()
        return self.registry  # type: ignore[return-value]

    def server_activate(self) -> None:
        super().server_activate()
        # each open connection's accepted socket → [the socket it is served on now, since,
        # cut at the deadline]
        self.open: dict[Any, list[Any]] = {}
        self.open_lock = threading.Lock()
        self.open_changed = threading.Condition(self.open_lock)
        self.refused = 0

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Accept connections until :meth:`shutdown`. Between connections the thread sleeps in
        the kernel: socketserver's own loop wakes every ``poll_interval`` to look for a
        shutdown request, which in a node daemon cost more CPU than its scrapes."""
        with selectors.PollSelector() as selector:
            selector.register(self, selectors.EVENT_READ)
            selector.register(self.waker.fd, selectors.EVENT_READ)
            while True:
                ready = selector.select()
                if any(key.fd == self.waker.fd for key, _ in ready):
                    return
                if ready:
                    self._handle_request_noblock()  # type: ignore[attr-defined]

    def shutdown(self) -> None:
        """End :meth:`serve_forever` from any thread (socketserver's own waits for a flag this
        loop never sets); the caller joins the serving thread."""
        self.waker.wake()

    def server_close(self) -> None:
        super().server_close()
        self.waker.close()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.open_lock:
            if len(self.open) >= self.max_connections:
                self.refused += 1
                full = True
            else:
                self.open[request] = [request, time.monotonic(), False]
                self.open_changed.notify()
                full = False
        if full:
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self.open_lock:
                self.open.pop(request, None)

    def cut_overdue(self, stopping: threading.Event) -> None:
        """Until ``stopping`` is set (then notify :attr:`open_changed`), cut each connection
        that reaches the deadline (its thread then ends). Sleeps while none is open."""
        with self.open_changed:
            while not stopping.is_set():
                now = time.monotonic()
                waiting = [since for _, since, cut in self.open.values() if not cut]
                if not waiting:
                    self.open_changed.wait()
                    continue
                due = min(waiting) + self.connection_deadline_s
                if due > now:
                    self.open_changed.wait(due - now)
                    continue
                for entry in self.open.values():
                    if not entry[2] and entry[1] + self.connection_deadline_s <= now:
                        try:
                            entry[0].shutdown(socket.SHUT_RDWR)
                            entry[2] = True
                        except OSError:
                            # Its socket is being wrapped for TLS (the raw one is detached
                            # until finish_request swaps the new one in): again in a second.
                            entry[1] = now - self.connection_deadline_s + 1.0

    def handle_error(self, request: Any, client_address: Any) -> None:
        # one line in the log, never a traceback on stderr (a misbehaving client is not news)
        log.debug("connection from %s ended: %s", client_address, sys.exc_info()[1])

    def current_web(self) -> WebConfig | None:
        """The web config, read again where its file or a certificate, key or CA file it
        names changed (rotated certificates are served without a restart); a changed file
        that does not load keeps the one before (logged once per change): never less
        protection than configured."""
        web = self.web
        if web is None or not web.changed():
            return web
        with self.web_lock:  # one reload; never under open_lock, which accept and the watchdog need
            web = self.web
            if web is None or not web.changed():
                return web
            try:
                fresh = load_web_config(Path(web.source))
            except TallyError as exc:
                if self.web_problem != str(exc):
                    self.web_problem = str(exc)
                    log.warning("%s; serving with the web config read before", exc)
                return web
            self.web_problem = None
            if (fresh.tls is None) != (web.tls is None):
                log.warning(
                    "web config %s: TLS turned %s; takes effect at the next start",
                    web.source,
                    "on" if fresh.tls is not None else "off",
                )
                fresh.tls = web.tls
            log.info("web config %s read again", web.source)
            self.web = fresh
            return fresh

    def finish_request(self, request: Any, client_address: Any) -> None:
        # The TLS handshake runs here, in the connection's own thread, so a client that stalls
        # it holds only that thread (wrapping the listening socket would stall accept()).
        web = self.current_web()
        if web is not None and web.tls is not None:
            accepted = request
            request.settimeout(CLIENT_TIMEOUT_SECONDS)
            try:
                request = web.tls.wrap_socket(
                    request, server_side=True, do_handshake_on_connect=False
                )
                with self.open_lock:  # the watchdog must cut the TLS socket: it owns the fd now
                    if accepted in self.open:
                        self.open[accepted][0] = request
                request.do_handshake()
            except OSError as exc:  # ssl.SSLError is one
                log.debug("TLS handshake with %s failed: %s", client_address, exc)
                return
        super().finish_request(request, client_address)


# Limits of a request: a scrape's request line and headers are a few hundred bytes.
MAX_LINE_BYTES = 8192
MAX_HEADERS = 100
_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    414: "URI Too Long",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    505: "HTTP Version Not Supported",
}
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def http_date(seconds: float) -> str:
    """An HTTP ``Date`` (RFC 9110 IMF-fixdate), independent of the locale."""
    t = time.gmtime(seconds)
    return (
        f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year} "
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT"
    )


class Headers(dict[str, str]):
    """Request headers by lower-cased name (the first of repeated ones)."""

    @overload  # type: ignore[override]
    def get(self, name: str) -> str | None: ...

    @overload
    def get(self, name: str, default: str) -> str: ...

    def get(self, name: str, default: str | None = None) -> str | None:
        return super().get(name.lower(), default)


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def parse_request_head(lines: list[bytes]) -> tuple[str, str, Headers]:
    """Method, target and headers of a request's head (its lines without the empty one).

    Raises ``_BadRequest`` with the status to answer: 400 for a malformed line, 505 for an HTTP
    version other than 1.x, 431 for too many headers."""
    try:
        method, target, version = lines[0].decode("latin-1").rstrip("\r\n").split(" ")
    except ValueError:
        raise _BadRequest(400, "malformed request line") from None
    if not version.startswith("HTTP/") or not target:
        raise _BadRequest(400, "malformed request line")
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise _BadRequest(505, f"unsupported version {version[:20]}")
    if len(lines) - 1 > MAX_HEADERS:
        raise _BadRequest(431, "too many headers")
    headers = Headers()
    for raw in lines[1:]:
        line = raw.decode("latin-1").rstrip("\r\n")
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip() or line[0] in " \t":
            raise _BadRequest(400, "malformed header")
        headers.setdefault(name.lower(), value.strip())
    return method, target, headers


class _Handler(socketserver.StreamRequestHandler):
    """One request per connection (HTTP/1.0): GET and HEAD."""

    server: _Server
    timeout = CLIENT_TIMEOUT_SECONDS
    server_version = "tally"
    _head = False  # answering HEAD: headers only

    def handle(self) -> None:
        self._reply: list[str] = []
        lines: list[bytes] = []
        try:
            while True:
                line = self.rfile.readline(MAX_LINE_BYTES + 1)
                if not line:
                    return  # the client went away before its request was whole
                if len(line) > MAX_LINE_BYTES:
                    status = 414 if not lines else 431
                    raise _BadRequest(status, "line too long")
                if line in (b"\r\n", b"\n"):
                    if lines:
                        break
                    continue  # empty lines before the request line are allowed
                lines.append(line)
                if len(lines) > MAX_HEADERS + 1:
                    raise _BadRequest(431, "too many headers")
            method, self.path, self.headers = parse_request_head(lines)
        except _BadRequest as bad:
            self.headers = Headers()
            self._send(bad.status, "text/plain; charset=utf-8", f"{bad}\n".encode())
            return
        if method == "GET":
            self.do_GET()
        elif method == "HEAD":
            self.do_HEAD()
        else:
            self._send(501, "text/plain; charset=utf-8", b"only GET and HEAD\n")
        log.debug("%s %s %s", self.client_address[0], method, self.path[:200])

    def send_response(self, status: int) -> None:
        self._reply = [
            f"HTTP/1.0 {status} {_REASONS.get(status, '')}",
            f"Server: {self.server_version}",
            f"Date: {http_date(time.time())}",
        ]
        web = self.server.web
        if web is not None:  # the web config's headers go with every answer, as the toolkit's
            self._reply.extend(f"{name}: {value}" for name, value in web.headers.items())

    def send_header(self, name: str, value: str) -> None:
        self._reply.append(f"{name}: {value}")

    def end_headers(self) -> None:
        self.wfile.write(("\r\n".join(self._reply) + "\r\n\r\n").encode("latin-1"))
        self._reply = []

    def do_HEAD(self) -> None:
        """What GET would answer, headers only (uptime checkers and load balancers ask so)."""
        self._head = True
        try:
            self.do_GET()
        finally:
            self._head = False

    def do_GET(self) -> None:
        web = self.server.web
        client = str(self.client_address[0])
        if web is not None and web.users and web.throttled(client):
            self.send_response(429)
            self.send_header("Retry-After", str(int(FAILURE_WINDOW_S)))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if web is not None and not web.authorized(self.headers.get("Authorization")):
            web.failed(client)
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="tally"')
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", "13")
            self.end_headers()
            if not self._head:
                self.wfile.write(b"unauthorized\n")
            return
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._metrics()
        elif path == "/":
            self._send(200, "text/html; charset=utf-8", _LANDING)
        elif path in ("/-/healthy", "/-/ready"):
            self._send(200, "text/plain; charset=utf-8", b"OK\n")
        else:
            self._send(404, "text/plain; charset=utf-8", b"not found\n")

    def _metrics(self) -> None:
        accept = self.headers.get("Accept", "")
        kind, content_type = negotiate(accept)
        try:
            render = {"text": self.server.text, "openmetrics": self.server.openmetrics}.get(kind)
            if render is not None:
                body = render()
            else:
                from prometheus_client.exposition import choose_encoder

                encoder, content_type = choose_encoder(accept)
                body = encoder(self.server.client_registry())
        except Exception:
            log.exception("rendering /metrics failed")
            self._send(500, "text/plain; charset=utf-8", b"internal error rendering metrics\n")
            return
        self._send(200, content_type, body, compress=True)

    def _send(self, status: int, content_type: str, body: bytes, compress: bool = False) -> None:
        accept = self.headers.get("Accept-Encoding", "")
        gzipped = compress and "gzip" in [p.split(";")[0].strip() for p in accept.split(",")]
        if gzipped:
            # Level 1: a node's 40 KB scrape compresses in 0.1 ms instead of level 6's 0.43 ms,
            # 12 % larger; the bytes cross a data centre's network, the CPU is the node's.
            body = gzip.compress(body, compresslevel=1)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if gzipped:
            self.send_header("Content-Encoding", "gzip")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not self._head:
            self.wfile.write(body)


class MetricsServer:
    """Serves ``registry`` on ``host:port`` from a background thread (port 0 picks a free one).

    ``text`` and ``openmetrics``, when given, render the text format and OpenMetrics 1.0.0 of the
    same registry faster (the column renderer); other formats are rendered by prometheus-client
    from ``registry``, which may be a factory called on the first such request. Raises
    ``TallyError`` when the address cannot be bound (in use, not local, no permission).
    """

    def __init__(
        self,
        registry: Registry,
        host: str,
        port: int,
        web: WebConfig | None = None,
        text: Callable[[], bytes] | None = None,
        openmetrics: Callable[[], bytes] | None = None,
    ) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET

        class Server(_Server):
            address_family = family

        try:
            self._httpd = Server((host, port), _Handler)
        except OSError as exc:
            shown = f"[{host}]" if ":" in host else host
            raise TallyError(f"cannot listen on {shown}:{port}: {exc.strerror or exc}") from None
        self._host = host
        self._httpd.registry = registry
        self._httpd.text = text
        self._httpd.openmetrics = openmetrics
        self._httpd.web = web
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="tally-http", daemon=True
        )
        self._stopping = threading.Event()
        self._watchdog = threading.Thread(target=self._watch, name="tally-http-watch", daemon=True)

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        """Where /metrics is served, for banners (``https`` with TLS, ``[v6]`` hosts)."""
        host = self._host
        shown = f"[{host}]" if ":" in host else host
        web = self._httpd.web
        scheme = "https" if web is not None and web.tls is not None else "http"
        return f"{scheme}://{shown}:{self.port}/metrics"

    def start(self) -> None:
        self._thread.start()
        self._watchdog.start()

    def _watch(self) -> None:
        self._httpd.cut_overdue(self._stopping)

    def stop(self) -> None:
        """Stop serving and close the socket (also of a server never started)."""
        with self._httpd.open_changed:
            self._stopping.set()
            self._httpd.open_changed.notify_all()
        if self._thread.is_alive():
            self._httpd.shutdown()
            self._thread.join(timeout=5)
        if self._watchdog.is_alive():
            self._watchdog.join(timeout=5)
        self._httpd.server_close()


def serve(
    registry: Registry,
    listen: str,
    web_config: Path | None = None,
    text: Callable[[], bytes] | None = None,
    start: bool = True,
    openmetrics: Callable[[], bytes] | None = None,
) -> MetricsServer:
    """Serve ``registry`` on ``listen`` (``ADDR:PORT``) with the TLS and basic auth of the web
    config file ``web_config`` (exporter-toolkit YAML); started unless ``start`` is False.

    The one way daemon, replay and aggregate serve /metrics. Raises ``TallyError`` for a bad
    address or web config, or an address that cannot be bound.
    """
    host, port = parse_listen(listen)
    web = load_web_config(web_config) if web_config is not None else None
    server = MetricsServer(registry, host, port, web=web, text=text, openmetrics=openmetrics)
    if start:
        server.start()
    return server
