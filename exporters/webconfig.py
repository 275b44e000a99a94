"""``--web.config.file``: TLS and basic auth in the shape Prometheus exporters use.

    tls_server_config:
      cert_file: server.crt          # relative paths are relative to this file
      key_file: server.key
      min_version: TLS12             # optional: TLS12 | TLS13
      client_auth_type: NoClientCert # optional: RequireAndVerifyClientCert (+ client_ca_file)
      client_ca_file: ca.crt
    basic_auth_users:
      alice: $2b$10$…                # bcrypt hashes (htpasswd -B)

Every problem is a ``TallyError`` naming the file and the key.
"""

from __future__ import annotations

import base64
import contextlib
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from telemetry.errors import TallyError

if TYPE_CHECKING:  # ssl (OpenSSL: 5 MiB resident) is loaded where TLS is configured
    import ssl

_TOP = {"tls_server_config", "basic_auth_users", "http_server_config"}
_TLS = {"cert_file", "key_file", "min_version", "client_auth_type", "client_ca_file"}
_VERSIONS = ("TLS12", "TLS13")
_CLIENT_AUTH = {"NoClientCert", "RequireAndVerifyClientCert"}
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

        if not header or not header.startswith("Basic "):
            return False
        try:
            user, sep, password = (
                base64.b64decode(header[6:], validate=True).decode().partition(":")
            )
        except (ValueError, UnicodeDecodeError):
            return False
        stored = self.users.get(user)
        if not sep or stored is None:
            with contextlib.suppress(ValueError):  # the same work and answer as a known user
                bcrypt.checkpw(password.encode(), self._decoy_hash())
            return False
        import hashlib
        import hmac

        key = hmac.new(stored, f"{user}:{password}".encode(), hashlib.sha256).digest()
        with self._lock:
            if self._verified.get(key):
                return True
        try:
            ok = bcrypt.checkpw(password.encode(), stored)
        except ValueError:
            return False
        if ok:
            with self._lock:
                if len(self._verified) >= _CACHE_LIMIT:
                    self._verified.clear()
                self._verified[key] = True
        return ok


def _fail(source: str, key: str, why: str) -> TallyError:
    return TallyError(f"web config {source}: {key}: {why}")


def load_web_config(path: Path) -> WebConfig:
    """Read and validate a web config file; raises ``TallyError``."""
    import yaml  # here, not at the top: only a daemon given a web config needs it

    source = str(path)
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
    config = WebConfig(source=source)
    tls = data.get("tls_server_config")
    if tls is not None:
        config.tls = _ssl_context(tls, path.parent, source)
    users = data.get("basic_auth_users") or {}
    if not isinstance(users, dict):
        raise _fail(source, "basic_auth_users", "expected a mapping of user: bcrypt-hash")
    for user, hashed in users.items():
        import bcrypt  # only where users are configured

        where = f"basic_auth_users.{user}"
        if not isinstance(hashed, str) or not hashed.startswith(("$2a$", "$2b$", "$2y$")):
            raise _fail(source, where, "not a bcrypt hash ($2a$, $2b$ or $2y$)")
        try:
            bcrypt.checkpw(b"", hashed.encode())
        except ValueError:
            raise _fail(source, where, "malformed bcrypt hash") from None
        config.users[str(user)] = hashed.encode()
    return config


def _ssl_context(tls: Any, base: Path, source: str) -> ssl.SSLContext:
    import ssl

    if not isinstance(tls, dict):
        raise _fail(source, "tls_server_config", "expected a mapping")
    for key in tls:
        if key not in _TLS:
            raise _fail(source, f"tls_server_config.{key}", "unknown key")
    for key in ("cert_file", "key_file"):
        if not tls.get(key):
            raise _fail(source, f"tls_server_config.{key}", "required")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    version = tls.get("min_version", "TLS12")
    if version not in _VERSIONS:
        raise _fail(
            source, "tls_server_config.min_version", f"must be one of {', '.join(_VERSIONS)}"
        )
    minimum = {"TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}
    context.minimum_version = minimum[version]
    cert, key = base / str(tls["cert_file"]), base / str(tls["key_file"])
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise _fail(
            source, "tls_server_config.cert_file/key_file", f"cannot load {cert} / {key}: {exc}"
        ) from None
    auth = tls.get("client_auth_type", "NoClientCert")
    if auth not in _CLIENT_AUTH:
        raise _fail(
            source,
            "tls_server_config.client_auth_type",
            f"must be one of {', '.join(sorted(_CLIENT_AUTH))}",
        )
    if auth == "RequireAndVerifyClientCert":
        ca = tls.get("client_ca_file")
        if not ca:
            raise _fail(
                source,
                "tls_server_config.client_ca_file",
                "required with RequireAndVerifyClientCert",
            )
        try:
            context.load_verify_locations(base / str(ca))
        except (OSError, ssl.SSLError) as exc:
            raise _fail(source, "tls_server_config.client_ca_file", str(exc)) from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context
