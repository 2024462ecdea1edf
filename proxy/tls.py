"""https on the client-facing listener: the server's ``ssl.SSLContext``, built before any model loads.

A certificate and key that cannot serve (not PEM, a passphrase-protected key, a key of another
certificate) are a configuration error naming the option and the file, found at start-up rather
than at the first client's handshake.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from .config import ConfigError, ServerConfig

__all__ = ["server_tls_context"]


def _no_passphrase() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal: a service would hang at start-up.
    raise ConfigError("server.tls_key_file: the key is encrypted; give an unencrypted PEM key")


def server_tls_context(server: ServerConfig) -> ssl.SSLContext | None:
    """The listener's TLS context (TLS 1.2 or later, Python's default ciphers), or ``None`` for plain
    http. Raises :class:`ConfigError` naming ``server.tls_cert_file`` or ``server.tls_key_file``."""
    if server.tls_cert_file is None or server.tls_key_file is None:
        return None
    cert, key = server.tls_cert_file, server.tls_key_file
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key, password=_no_passphrase)
    except ConfigError as exc:
        raise ConfigError(f"{exc} ({key!r})") from None
    except ssl.SSLError as exc:
        raise ConfigError(_explain(cert, key, exc)) from None
    except OSError as exc:
        raise ConfigError(f"server.tls_cert_file / server.tls_key_file: {exc.strerror or exc}") from None
    return context


def _explain(cert: str, key: str, exc: ssl.SSLError) -> str:
    """Which file is at fault: OpenSSL's reason alone (``PEM lib``) does not say."""
    reason = exc.reason or str(exc)
    if reason == "KEY_VALUES_MISMATCH":
        return f"server.tls_key_file: {key!r} is not the private key of server.tls_cert_file {cert!r}"
    if b"-----BEGIN CERTIFICATE-----" not in _head(cert):
        return f"server.tls_cert_file: {cert!r} holds no PEM certificate ({reason})"
    if b"PRIVATE KEY-----" not in _head(key):
        return f"server.tls_key_file: {key!r} holds no PEM private key ({reason})"
    return f"server.tls_key_file: {key!r} cannot be used with server.tls_cert_file {cert!r} ({reason})"


def _head(path: str) -> bytes:
    try:
        return Path(path).read_bytes()[: 1 << 20]
    except OSError:
        return b""
