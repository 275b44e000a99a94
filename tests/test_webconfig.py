"""--web.config.file: TLS and basic auth with a real TLS client, as Prometheus exporters do it."""

from __future__ import annotations

import base64
import http.client
import logging
import shutil
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import bcrypt
import pytest
from prometheus_client import CollectorRegistry

from exporters.http import MetricsServer
from exporters.webconfig import WebConfig, load_web_config
from telemetry.errors import TallyError
from tests.support.daemon import DaemonProcess
from tests.support.net import free_port

TLS = Path(__file__).parent / "fixtures" / "tls"
# bcrypt at cost 4 keeps the tests fast; the format is the same as htpasswd -B.
TLS_KEYS = "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
HASH = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=4)).decode()


def _config(tmp_path: Path, body: str) -> Path:
    for name in ("server.crt", "server.key", "ca.crt"):
        shutil.copy(TLS / name, tmp_path / name)
    path = tmp_path / "web.yml"
    path.write_text(body)
    return path


def _client_context(cert: bool = False) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(TLS / "ca.crt"))
    if cert:
        context.load_cert_chain(TLS / "client.crt", TLS / "client.key")
    return context


def _auth(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


@pytest.fixture
def server(tmp_path: Path) -> Iterator[MetricsServer]:
    web = load_web_config(
        _config(
            tmp_path,
            f"tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
            f"basic_auth_users:\n  prometheus: '{HASH}'\n",
        )
    )
    srv = MetricsServer(CollectorRegistry(), "127.0.0.1", 0, web=web)
    srv.start()
    yield srv
    srv.stop()


def _get(port: int, headers: dict[str, str], context: ssl.SSLContext | None) -> tuple[int, bytes]:
    conn = http.client.HTTPSConnection("localhost", port, context=context, timeout=5)
    conn.request("GET", "/metrics", headers=headers)
    resp = conn.getresponse()
    return resp.status, resp.read()


def test_tls_and_right_password(server: MetricsServer) -> None:
    status, body = _get(server.port, _auth("prometheus", "s3cret"), _client_context())
    assert status == 200 and b"tally_build_info" not in body  # an empty registry, served


def test_wrong_password_unknown_user_and_no_header_get_401(server: MetricsServer) -> None:
    for headers in (_auth("prometheus", "wrong"), _auth("mallory", "s3cret"), {}):
        status, _ = _get(server.port, headers, _client_context())
        assert status == 401
    conn = http.client.HTTPSConnection(
        "localhost", server.port, context=_client_context(), timeout=5
    )
    conn.request("GET", "/metrics", headers={"Authorization": "Basic !!!not-base64"})
    resp = conn.getresponse()
    assert resp.status == 401 and resp.getheader("WWW-Authenticate") == 'Basic realm="tally"'


def test_plain_http_to_a_tls_port_gets_no_metrics(server: MetricsServer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
        conn.request("GET", "/metrics")
        conn.getresponse().read()


def test_untrusted_certificate_is_refused_by_the_client(server: MetricsServer) -> None:
    with pytest.raises(ssl.SSLError):
        _get(server.port, _auth("prometheus", "s3cret"), ssl.create_default_context())


def test_client_certificates_when_required(tmp_path: Path) -> None:
    web = load_web_config(
        _config(
            tmp_path,
            "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
            "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.crt\n",
        )
    )
    srv = MetricsServer(CollectorRegistry(), "127.0.0.1", 0, web=web)
    srv.start()
    try:
        assert _get(srv.port, {}, _client_context(cert=True))[0] == 200
        with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException)):
            _get(srv.port, {}, _client_context(cert=False))
    finally:
        srv.stop()


def test_verified_passwords_are_cached_wrong_ones_are_not() -> None:
    web = WebConfig(source="x", users={"u": bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=4))})
    assert web.authorized(_auth("u", "pw")["Authorization"])
    assert len(web._verified) == 1
    assert not web.authorized(_auth("u", "px")["Authorization"])
    assert len(web._verified) == 1
    assert WebConfig(source="x").authorized(None), "no users: open"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("tls_server_config: [\n", "not valid YAML"),
        ("- a\n", "expected a mapping"),
        ("colour: blue\n", "colour: unknown key"),
        ("tls_server_config:\n  cert_file: server.crt\n", "tls_server_config.key_file: required"),
        (
            "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n  ciphers: x\n",
            "tls_server_config.ciphers: unknown key",
        ),
        ("tls_server_config:\n  cert_file: nope.crt\n  key_file: server.key\n", "cannot load"),
        (TLS_KEYS + "  min_version: TLS10\n", "min_version: TLS10 is not supported by tally"),
        (TLS_KEYS + "  min_version: SSL3\n", "min_version: must be one of"),
        (
            TLS_KEYS + "  min_version: TLS13\n  max_version: TLS12\n",
            "max_version: TLS12 is below min_version TLS13",
        ),
        # the exporter toolkit refuses a CA nothing checks against; serving without client
        # certificates while the file names a CA would be a hole
        (TLS_KEYS + "  client_ca_file: ca.crt\n", "client_ca_file: given without a client_auth"),
        (
            TLS_KEYS + "  client_auth_type: NoClientCert\n  client_ca_file: ca.crt\n",
            "client_ca_file: given without a client_auth",
        ),
        (
            TLS_KEYS + "  client_auth_type: RequireAnyClientCert\n  client_ca_file: ca.crt\n",
            "RequireAnyClientCert (a client certificate asked for but not verified) is not",
        ),
        (TLS_KEYS + "  client_auth_type: Sometimes\n", "client_auth_type: must be one of"),
        (TLS_KEYS + "  cipher_suites: [TLS_RSA_WITH_RC4_128_SHA]\n", "unknown cipher: TLS_RSA"),
        (
            TLS_KEYS + "  curve_preferences: [CurveP256, X25519]\n",
            "curve_preferences: tally can limit TLS to one curve only",
        ),
        (TLS_KEYS + "  curve_preferences: [P256]\n", "unknown curve: P256"),
        (TLS_KEYS + "  client_allowed_sans: [a]\n", "client_allowed_sans: not supported"),
        (TLS_KEYS + "  prefer_server_cipher_suites: maybe\n", "expected true or false"),
        ("http_server_config:\n  headers:\n    Foo: bar\n", "headers.Foo: cannot be configured"),
        (
            "http_server_config:\n  headers:\n    X-Frame-Options: allow\n",
            "headers.X-Frame-Options: expected one of deny, sameorigin",
        ),
        ("http_server_config:\n  junk: 1\n", "http_server_config.junk: unknown key"),
        (
            TLS_KEYS + "  client_auth_type: RequireAndVerifyClientCert\n",
            "client_ca_file: required",
        ),
        ("basic_auth_users:\n  alice: plaintext\n", "basic_auth_users.alice: not a bcrypt hash"),
        (
            "basic_auth_users:\n  alice: $2b$10$short\n",
            "basic_auth_users.alice: malformed bcrypt hash",
        ),
        ("basic_auth_users: [alice]\n", "expected a mapping of user"),
    ],
)
def test_bad_web_configs_name_the_file_and_key(tmp_path: Path, body: str, message: str) -> None:
    path = _config(tmp_path, body)
    with pytest.raises(TallyError) as info:
        load_web_config(path)
    assert str(info.value).startswith(f"web config {path}") and message in str(info.value)


def test_an_encrypted_key_is_one_line_not_a_passphrase_prompt(tmp_path: Path) -> None:
    """OpenSSL would ask for the passphrase on the terminal (a daemon under systemd hangs)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl not installed")
    path = _config(tmp_path, TLS_KEYS)
    subprocess.run(
        [openssl, "rsa", "-aes256", "-passout", "pass:secret", "-in", str(TLS / "server.key"),
         "-out", str(tmp_path / "server.key")],
        check=True, capture_output=True, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    with pytest.raises(TallyError) as info:
        load_web_config(path)
    assert "server.key is encrypted" in str(info.value) and "\n" not in str(info.value)


def test_hashes_are_checked_for_shape_not_run_at_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cost-18 hash (the exporter toolkit's own fixture has one) would take 20 s to run at
    every start and every doctor; its shape is what loading checks, as the toolkit does."""
    costly = "$2y$18$" + HASH[7:]

    def refuse(*_: object) -> bool:
        raise AssertionError("bcrypt ran while loading the web config")

    monkeypatch.setattr(bcrypt, "checkpw", refuse)
    web = load_web_config(_config(tmp_path, f"basic_auth_users:\n  bob: '{costly}'\n"))
    assert web.users == {"bob": costly.encode()}


def test_toolkit_tls_settings_are_honoured(tmp_path: Path) -> None:
    """The exporter toolkit's someCiphers shape: TLS 1.2 only, two suites, server order; a
    TLS 1.3-only client is refused, a TLS 1.2 client gets one of the two suites."""
    web = load_web_config(
        _config(
            tmp_path,
            TLS_KEYS + "  min_version: TLS12\n  max_version: TLS12\n"
            "  prefer_server_cipher_suites: true\n  curve_preferences: [CurveP256]\n"
            "  cipher_suites:\n    - TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256\n"
            "    - TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384\n",
        )
    )
    srv = MetricsServer(CollectorRegistry(), "127.0.0.1", 0, web=web)
    srv.start()
    try:
        assert _get(srv.port, {}, _client_context())[0] == 200
        raw = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
        with _client_context().wrap_socket(raw, server_hostname="localhost") as tls:
            assert tls.version() == "TLSv1.2"
            cipher = tls.cipher()
            assert cipher is not None
            assert cipher[0] in {"ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-RSA-AES256-GCM-SHA384"}
        modern = _client_context()
        modern.minimum_version = ssl.TLSVersion.TLSv1_3
        with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException)):
            _get(srv.port, {}, modern)
    finally:
        srv.stop()


def test_client_certificate_verified_if_given(tmp_path: Path) -> None:
    web = load_web_config(
        _config(
            tmp_path,
            TLS_KEYS + "  client_auth_type: VerifyClientCertIfGiven\n  client_ca_file: ca.crt\n",
        )
    )
    srv = MetricsServer(CollectorRegistry(), "127.0.0.1", 0, web=web)
    srv.start()
    try:
        assert _get(srv.port, {}, _client_context(cert=False))[0] == 200
        assert _get(srv.port, {}, _client_context(cert=True))[0] == 200
        openssl = shutil.which("openssl")
        if openssl is None:
            pytest.skip("openssl not installed")
        subprocess.run(
            [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
             "-subj", "/CN=stranger", "-keyout", str(tmp_path / "self.key"),
             "-out", str(tmp_path / "self.crt")],
            check=True, capture_output=True, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        stranger = _client_context()  # a certificate no client CA signed
        stranger.load_cert_chain(tmp_path / "self.crt", tmp_path / "self.key")
        with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException)):
            _get(srv.port, {}, stranger)
    finally:
        srv.stop()


def test_headers_lowercase_scheme_and_long_passwords(tmp_path: Path) -> None:
    """http_server_config headers go with every answer (401 too); the Basic scheme is
    case-insensitive; a password past bcrypt's 72 bytes is read to 72, as Go's bcrypt does."""
    long_password = "p" * 80
    hashed = bcrypt.hashpw(long_password.encode()[:72], bcrypt.gensalt(rounds=4)).decode()
    web = load_web_config(
        _config(
            tmp_path,
            "http_server_config:\n  headers:\n    X-Frame-Options: deny\n"
            "    Strict-Transport-Security: max-age=31536000\n"
            f"basic_auth_users:\n  prometheus: '{hashed}'\n",
        )
    )
    srv = MetricsServer(CollectorRegistry(), "127.0.0.1", 0, web=web)
    srv.start()
    try:
        for headers, status in (
            ({}, 401),
            (_auth("prometheus", long_password), 200),
            ({"Authorization": _auth("prometheus", long_password)["Authorization"].lower()[:6]
              + _auth("prometheus", long_password)["Authorization"][6:]}, 200),
        ):  # fmt: skip
            conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
            conn.request("GET", "/metrics", headers=headers)
            response = conn.getresponse()
            assert response.status == status
            assert response.getheader("X-Frame-Options") == "deny"
            assert response.getheader("Strict-Transport-Security") == "max-age=31536000"
            conn.close()
    finally:
        srv.stop()


def test_a_changed_web_config_is_read_again_and_a_broken_one_keeps_the_last(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """As the exporter toolkit, the file (and the certificates it names) is read again when it
    changes: a new password works without a restart. A change that does not load keeps what
    was served before, with one log line: never less protection than configured."""
    other = bcrypt.hashpw(b"n3w", bcrypt.gensalt(rounds=4)).decode()
    path = _config(tmp_path, f"basic_auth_users:\n  prometheus: '{HASH}'\n")
    srv = MetricsServer(CollectorRegistry(), "127.0.0.1", 0, web=load_web_config(path))
    srv.start()

    def status(password: str) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
        conn.request("GET", "/metrics", headers=_auth("prometheus", password))
        answer = conn.getresponse().status
        conn.close()
        return answer

    try:
        assert (status("s3cret"), status("n3w")) == (200, 401)
        path.write_text(f"basic_auth_users:\n  prometheus: '{other}'\n")
        assert (status("s3cret"), status("n3w")) == (401, 200)
        path.write_text("basic_auth_users:\n  prometheus: plaintext\n")
        with caplog.at_level(logging.WARNING, logger="tally"):
            assert (status("s3cret"), status("n3w"), status("n3w")) == (401, 200, 200)
        said = [r.getMessage() for r in caplog.records if "read before" in r.getMessage()]
        assert len(said) == 1 and "not a bcrypt hash" in said[0]
    finally:
        srv.stop()


def test_daemon_with_web_config_end_to_end(tmp_path: Path) -> None:
    config = _config(
        tmp_path,
        f"tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
        f"basic_auth_users:\n  prometheus: '{HASH}'\n",
    )
    daemon = DaemonProcess(
        tmp_path / "data", tmp_path, node="tls", flags=("--web.config.file", str(config))
    )
    try:
        port = daemon.port
        assert f"serving https://127.0.0.1:{port}/metrics" in daemon.banner()
        status, body = _get(port, _auth("prometheus", "s3cret"), _client_context())
        assert status == 200 and b'tally_cpus{node="tls"}' in body
        assert _get(port, _auth("prometheus", "nope"), _client_context())[0] == 401
    finally:
        daemon.stop()
    bad = tmp_path / "bad.yml"
    bad.write_text("nonsense: 1\n")
    result = subprocess.run(
        [sys.executable, "-m", "telemetry.cli", "daemon", "--listen", f"127.0.0.1:{free_port()}",
         "--data-dir", str(tmp_path / "d2"), "--web.config.file", str(bad)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 2 and "nonsense: unknown key" in result.stderr


def test_unknown_users_cost_what_known_users_cost(tmp_path: Path) -> None:
    """An unknown user was rejected in 1.9 ms and a known one with a wrong password in 238 ms:
    the time told which user names exist."""
    import time

    slow = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=10)).decode()
    web = load_web_config(_config(tmp_path, f"basic_auth_users:\n  prometheus: '{slow}'\n"))

    def took(user: str) -> float:
        header = _auth(user, "wrong")["Authorization"]
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            assert not web.authorized(header)
            best = min(best, time.perf_counter() - started)
        return best

    known, unknown = took("prometheus"), took("mallory")
    assert unknown > 0.5 * known, (unknown, known)


def test_a_client_guessing_passwords_is_refused_without_a_check(server: MetricsServer) -> None:
    from exporters.webconfig import FAILURES_ALLOWED

    statuses = [
        _get(server.port, _auth("prometheus", f"guess{i}"), _client_context())[0]
        for i in range(FAILURES_ALLOWED + 3)
    ]
    assert statuses[:FAILURES_ALLOWED] == [401] * FAILURES_ALLOWED
    assert set(statuses[FAILURES_ALLOWED:]) == {429}, statuses
    # the right password waits too: the window has to pass (no oracle for the guesser)
    assert _get(server.port, _auth("prometheus", "s3cret"), _client_context())[0] == 429


def test_an_overlong_password_gets_the_same_answer_for_any_user(server: MetricsServer) -> None:
    """bcrypt refuses passwords over 72 bytes: an unknown user's connection was dropped where a
    known user got 401, which told the names apart (found in review)."""
    long = "x" * 80
    for user in ("prometheus", "mallory"):
        assert _get(server.port, _auth(user, long), _client_context())[0] == 401


def test_a_stalled_tls_handshake_is_cut_at_the_deadline(server: MetricsServer) -> None:
    import contextlib
    import socket
    import time

    server._httpd.connection_deadline_s = 1.0
    stalled = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    started = time.monotonic()
    with contextlib.suppress(OSError):
        assert stalled.recv(1) == b""  # no ClientHello: the server cuts it
    assert time.monotonic() - started < 6, "the watchdog cuts TLS connections too"
    stalled.close()
