"""``--web.config.file``: TLS and basic auth in the shape Prometheus exporters use.

    tls_server_config:
      cert_file: server.crt          # relative paths are relative to this file
      key_file: server.key
      min_version: TLS12             # optional: TLS12 | TLS13; max_version likewise
      client_auth_type: NoClientCert # optional: RequireAndVerifyClientCert or
      client_ca_file: ca.crt         #   VerifyClientCertIfGiven, each with client_ca_file
      cipher_suites: [TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256]   # optional, Go's names
      curve_preferences: [X25519]    # optional: one of CurveP256, CurveP384, CurveP521, X25519
      prefer_server_cipher_suites: true
    http_server_config:
      headers:                       # the exporter toolkit's five security headers
        Strict-Transport-Security: max-age=31536000
    basic_auth_users:
      alice: $2b$10$…                # bcrypt hashes (htpasswd -B)

Every problem is a ``TallyError`` naming the file and the key. What Python's TLS cannot do (ask
for a client certificate without verifying it, TLS 1.0/1.1, several curves in an order) is
refused with a line saying so, never ignored. The server reloads the file, and the
certificates and keys it names, when any of them changes (certificate rotation).
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from telemetry.errors import TallyError

if TYPE_CHECKING:  # ssl (OpenSSL: 5 MiB resident) is loaded where TLS is configured
    import ssl

_TOP = {"tls_server_config", "basic_auth_users", "http_server_config"}
_TLS = {
    "cert_file",
    "key_file",
    "min_version",
    "max_version",
    "client_auth_type",
    "client_ca_file",
    "cipher_suites",
    "curve_preferences",
    "prefer_server_cipher_suites",
}
# the exporter toolkit's keys Python's ssl cannot honour: refused with this reason, not ignored
_UNSUPPORTED_TLS = {
    "cert": "inline certificates are not supported by tally; use cert_file",
    "key": "inline keys are not supported by tally; use key_file",
    "client_ca": "inline CAs are not supported by tally; use client_ca_file",
    "client_allowed_sans": "not supported by tally",
}
_VERSIONS = ("TLS12", "TLS13")
_OLD_VERSIONS = ("TLS10", "TLS11")
_CLIENT_AUTH = {"NoClientCert", "RequireAndVerifyClientCert", "VerifyClientCertIfGiven"}
_UNVERIFIED_CLIENT_AUTH = {"RequestClientCert", "RequireAnyClientCert", "RequireClientCert"}
# Go's names of the cipher suites crypto/tls counts secure → OpenSSL's; TLS 1.3 suites (which
# Go does not let a configuration choose either) are accepted and change nothing
_CIPHERS = {
    "TLS_RSA_WITH_AES_128_CBC_SHA": "AES128-SHA",
    "TLS_RSA_WITH_AES_256_CBC_SHA": "AES256-SHA",
    "TLS_RSA_WITH_AES_128_GCM_SHA256": "AES128-GCM-SHA256",
    "TLS_RSA_WITH_AES_256_GCM_SHA384": "AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
}
_TLS13_CIPHERS = {
    "TLS_AES_128_GCM_SHA256",
    "TLS_AES_256_GCM_SHA384",
    "TLS_CHACHA20_POLY1305_SHA256",
}
_CURVES = {"CurveP256": "prime256v1", "CurveP384": "secp384r1", "CurveP521": "secp521r1",
           "X25519": "X25519"}  # fmt: skip
# The headers the exporter toolkit lets a file set, with the values it allows (None: any).
HEADERS: dict[str, tuple[str, ...] | None] = {
    "Strict-Transport-Security": None,
    "X-Content-Type-Options": ("nosniff",),
    "X-Frame-Options": ("deny", "sameorigin"),
    "X-XSS-Protection": None,
    "Content-Security-Policy": None,
}
_HTTP = {"headers", "http2"}
# a bcrypt hash: $2a$/$2b$/$2y$, cost 04-31, 22 characters of salt and 31 of hash
_BCRYPT = re.compile(r"\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}")
_CACHE_LIMIT = 1024
# Failed logins a client may make within the window before it is refused without a check.
FAILURES_ALLOWED = 10
FAILURE_WINDOW_S = 60.0


@dataclass
class WebConfig:
    """Resolved web configuration: an SSL context (or None) and the basic-auth users."""

    source: str
    tls: ssl.SSLContext | None = None
    users: dict[str, bytes] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)  # sent with every answer
    # the file and the files it names, with the modification each had when read
    read: dict[str, int | None] = field(default_factory=dict, repr=False)
    _verified: dict[bytes, bool] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _failures: dict[str, list[float]] = field(default_factory=dict, repr=False)
    _decoy: bytes | None = field(default=None, repr=False)

    def throttled(self, client: str) -> bool:
        """Whether ``client`` failed authentication ``FAILURES_ALLOWED`` times within the last
        ``FAILURE_WINDOW_S``: it is refused (429) without a bcrypt check, so wrong passwords
        cannot keep the cores busy."""
        now = time.monotonic()
        with self._lock:
            recent = [t for t in self._failures.get(client, ()) if now - t < FAILURE_WINDOW_S]
            if recent:
                self._failures[client] = recent
            else:
                self._failures.pop(client, None)
            return len(recent) >= FAILURES_ALLOWED

    def failed(self, client: str) -> None:
        """Note a failed authentication of ``client``."""
        with self._lock:
            if len(self._failures) >= _CACHE_LIMIT and client not in self._failures:
                self._failures.pop(next(iter(self._failures)))
            self._failures.setdefault(client, []).append(time.monotonic())

    def _decoy_hash(self) -> bytes:
        """A hash of the users' cost, checked for unknown users so that a user name does not
        show in the time an answer takes."""
        import bcrypt  # loaded where users are configured: a node without basic auth never does

        if self._decoy is None:
            some = next(iter(self.users.values()))
            try:
                rounds = int(some.split(b"$")[2])
            except (IndexError, ValueError):
                rounds = 12
            self._decoy = bcrypt.hashpw(b"decoy", bcrypt.gensalt(rounds=rounds))
        return self._decoy

    def authorized(self, header: str | None) -> bool:
        """Whether an ``Authorization`` header passes basic auth (always True without users).

        bcrypt is slow on purpose, so verified credentials are remembered by a keyed digest;
        a wrong password is checked in full every time.
        """
        if not self.users:
            return True
        import bcrypt

        if not header or header[:6].lower() != "basic ":  # the scheme is case-insensitive
            return False
        try:
            user, sep, password = (
                base64.b64decode(header[6:].strip(), validate=True).decode().partition(":")
            )
        except (ValueError, UnicodeDecodeError):
            return False
        # bcrypt reads the first 72 bytes of a password (as Go's does); the Python binding
        # refuses longer ones instead of reading them so
        secret = password.encode()[:72]
        stored = self.users.get(user)
        if not sep or stored is None:
            with contextlib.suppress(ValueError):  # the same work and answer as a known user
                bcrypt.checkpw(secret, self._decoy_hash())
            return False
        import hashlib
        import hmac

        key = hmac.new(stored, f"{user}:{password}".encode(), hashlib.sha256).digest()
        with self._lock:
            if self._verified.get(key):
                return True
        try:
            ok = bcrypt.checkpw(secret, stored)
        except ValueError:
            return False
        if ok:
            with self._lock:
                if len(self._verified) >= _CACHE_LIMIT:
                    self._verified.clear()
                self._verified[key] = True
        return ok

    def changed(self) -> bool:
        """Whether the file, or a certificate, key or CA file it names, changed since it was
        read (a ``stat`` of each)."""
        return any(_modified(path) != seen for path, seen in self.read.items())


def _modified(path: str) -> int | None:
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_mtime_ns ^ status.st_ino ^ status.st_size


def _fail(source: str, key: str, why: str) -> TallyError:
    return TallyError(f"web config {source}: {key}: {why}")


def load_web_config(path: Path) -> WebConfig:
    """Read and validate a web config file; raises ``TallyError``."""
    import yaml  # here, not at the top: only a daemon given a web config needs it

    source = str(path)
    modified = _modified(source)
    try:
        data: Any = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise TallyError(f"web config {source}: {exc.strerror or exc}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise TallyError(
            f"web config {source}: not valid YAML: {str(exc).splitlines()[0]}"
        ) from None
    data = data or {}
    if not isinstance(data, dict):
        raise TallyError(f"web config {source}: expected a mapping at the top")
    for key in data:
        if key not in _TOP:
            raise _fail(source, str(key), "unknown key")
    config = WebConfig(source=source, read={source: modified})
    tls = data.get("tls_server_config")
    if tls is not None:
        config.tls = _ssl_context(tls, path.parent, source, config.read)
    config.headers = _headers(data.get("http_server_config"), source)
    users = data.get("basic_auth_users") or {}
    if not isinstance(users, dict):
        raise _fail(source, "basic_auth_users", "expected a mapping of user: bcrypt-hash")
    for user, hashed in users.items():
        where = f"basic_auth_users.{user}"
        if not isinstance(hashed, str) or not hashed.startswith(("$2a$", "$2b$", "$2y$")):
            raise _fail(source, where, "not a bcrypt hash ($2a$, $2b$ or $2y$)")
        # its shape only: checking a password against it would take as long as its cost says
        # (2^18 rounds: 20 s) at every start
        if not _BCRYPT.fullmatch(hashed):
            raise _fail(source, where, "malformed bcrypt hash (cost 04-31, 53 characters after)")
        config.users[str(user)] = hashed.encode()
    return config


def _headers(http: Any, source: str) -> dict[str, str]:
    """``http_server_config``: the headers to send, as the exporter toolkit allows them."""
    if http is None:
        return {}
    if not isinstance(http, dict):
        raise _fail(source, "http_server_config", "expected a mapping")
    for key in http:
        if key not in _HTTP:
            raise _fail(source, f"http_server_config.{key}", "unknown key")
    if not isinstance(http.get("http2", True), bool):
        raise _fail(source, "http_server_config.http2", "expected true or false")
    headers = http.get("headers") or {}
    if not isinstance(headers, dict):
        raise _fail(source, "http_server_config.headers", "expected a mapping of name: value")
    out: dict[str, str] = {}
    for name, value in headers.items():
        where = f"http_server_config.headers.{name}"
        if name not in HEADERS:
            raise _fail(source, where, f"cannot be configured (only {', '.join(HEADERS)})")
        allowed = HEADERS[name]
        text = str(value)
        if not isinstance(value, str | int) or any(c in text for c in "\r\n\0"):
            raise _fail(source, where, "expected one line of text")
        if allowed is not None and text not in allowed:
            raise _fail(source, where, f"expected one of {', '.join(allowed)}")
        out[str(name)] = text
    return out


def _ssl_context(tls: Any, base: Path, source: str, read: dict[str, int | None]) -> ssl.SSLContext:
    """The server's TLS context from ``tls_server_config``; each file it reads goes into
    ``read`` with its modification."""
    import ssl

    if not isinstance(tls, dict):
        raise _fail(source, "tls_server_config", "expected a mapping")
    for key in tls:
        if key in _UNSUPPORTED_TLS:
            raise _fail(source, f"tls_server_config.{key}", _UNSUPPORTED_TLS[key])
        if key not in _TLS:
            raise _fail(source, f"tls_server_config.{key}", "unknown key")
    for key in ("cert_file", "key_file"):
        if not tls.get(key):
            raise _fail(source, f"tls_server_config.{key}", "required")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    versions = {"TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}
    for key, default in (("min_version", "TLS12"), ("max_version", "TLS13")):
        version = tls.get(key, default)
        if version in _OLD_VERSIONS:
            raise _fail(source, f"tls_server_config.{key}", f"{version} is not supported by tally")
        if version not in _VERSIONS:
            raise _fail(
                source, f"tls_server_config.{key}", f"must be one of {', '.join(_VERSIONS)}"
            )
    low, high = tls.get("min_version", "TLS12"), tls.get("max_version", "TLS13")
    if versions[low] > versions[high]:
        raise _fail(source, "tls_server_config.max_version", f"{high} is below min_version {low}")
    context.minimum_version, context.maximum_version = versions[low], versions[high]
    prefer = tls.get("prefer_server_cipher_suites", True)
    if not isinstance(prefer, bool):
        raise _fail(
            source, "tls_server_config.prefer_server_cipher_suites", "expected true or false"
        )
    if prefer:
        context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    else:
        context.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    _ciphers(context, tls.get("cipher_suites"), source)
    _curves(context, tls.get("curve_preferences"), source)
    cert, key = base / str(tls["cert_file"]), base / str(tls["key_file"])

    def encrypted() -> str:
        raise TallyError(
            f"web config {source}: tls_server_config.key_file: {key} is encrypted; "
            "give an unencrypted key (as the exporter toolkit needs)"
        )

    for path in (cert, key):
        read[str(path)] = _modified(str(path))
    try:
        context.load_cert_chain(cert, key, password=encrypted)
    except (OSError, ssl.SSLError) as exc:
        raise _fail(
            source, "tls_server_config.cert_file/key_file", f"cannot load {cert} / {key}: {exc}"
        ) from None
    auth = tls.get("client_auth_type", "NoClientCert")
    if auth in _UNVERIFIED_CLIENT_AUTH:
        raise _fail(
            source,
            "tls_server_config.client_auth_type",
            f"{auth} (a client certificate asked for but not verified) is not supported by "
            "tally; use RequireAndVerifyClientCert or VerifyClientCertIfGiven",
        )
    if auth not in _CLIENT_AUTH:
        raise _fail(
            source,
            "tls_server_config.client_auth_type",
            f"must be one of {', '.join(sorted(_CLIENT_AUTH))}",
        )
    ca = tls.get("client_ca_file")
    if auth == "NoClientCert":
        if ca:  # as the exporter toolkit: a CA that nothing checks against is a mistake
            raise _fail(
                source,
                "tls_server_config.client_ca_file",
                "given without a client_auth_type that checks client certificates "
                "(RequireAndVerifyClientCert or VerifyClientCertIfGiven)",
            )
        return context
    if not ca:
        raise _fail(source, "tls_server_config.client_ca_file", f"required with {auth}")
    read[str(base / str(ca))] = _modified(str(base / str(ca)))
    try:
        context.load_verify_locations(base / str(ca))
    except (OSError, ssl.SSLError) as exc:
        raise _fail(source, "tls_server_config.client_ca_file", str(exc)) from None
    required = auth == "RequireAndVerifyClientCert"
    context.verify_mode = ssl.CERT_REQUIRED if required else ssl.CERT_OPTIONAL
    return context


def _ciphers(context: ssl.SSLContext, suites: Any, source: str) -> None:
    """``cipher_suites``: Go's names of the TLS 1.2 suites to allow (TLS 1.3's stay as they
    are, as in Go)."""
    if suites is None:
        return
    where = "tls_server_config.cipher_suites"
    if not isinstance(suites, list) or not all(isinstance(s, str) for s in suites):
        raise _fail(source, where, "expected a list of cipher suite names")
    chosen = []
    for name in suites:
        if name in _TLS13_CIPHERS:
            continue
        if name not in _CIPHERS:
            raise _fail(source, where, f"unknown cipher: {name}")
        chosen.append(_CIPHERS[name])
    if not chosen:
        return
    import ssl

    try:
        context.set_ciphers(":".join(chosen))
    except ssl.SSLError:
        raise _fail(source, where, "none of them is offered by this OpenSSL") from None


def _curves(context: ssl.SSLContext, curves: Any, source: str) -> None:
    """``curve_preferences``: Python's ssl can limit the key exchange to one curve."""
    if curves is None:
        return
    where = "tls_server_config.curve_preferences"
    if not isinstance(curves, list) or not all(isinstance(c, str) for c in curves):
        raise _fail(source, where, "expected a list of curve names")
    for name in curves:
        if name not in _CURVES:
            raise _fail(source, where, f"unknown curve: {name}")
    if len(curves) > 1:
        raise _fail(
            source,
            where,
            "tally can limit TLS to one curve only (Python's ssl): give one, or none for "
            "the library's own order (X25519, P-256, P-384, P-521)",
        )
    if curves:
        import ssl

        try:
            context.set_ecdh_curve(_CURVES[curves[0]])
        except (ValueError, ssl.SSLError):
            raise _fail(source, where, f"{curves[0]} is not offered by this OpenSSL") from None
