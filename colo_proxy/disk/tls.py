"""TLS credentials in QEMU's ``tls-creds-x509`` layout, for the agent's TCP listeners.

A directory holding ``ca-cert.pem``, ``server-cert.pem`` and ``server-key.pem``
(what QEMU's ``-object tls-creds-x509,dir=DIR,endpoint=server`` reads), so the
same directory serves a QEMU NBD server and this agent.  With ``verify_peer``
(QEMU's default) a client must present a certificate signed by that CA, as a
QEMU client does from ``client-cert.pem``/``client-key.pem`` in its own directory.
:func:`client_context` reads that client directory, for ``colo-proxy run
--disk-tls-creds`` connecting to the agent's QMP.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from colo_proxy.errors import ConfigError

CA, CERT, KEY = "ca-cert.pem", "server-cert.pem", "server-key.pem"
CLIENT_CERT, CLIENT_KEY = "client-cert.pem", "client-key.pem"


def server_context(directory: Path, verify_peer: bool = True) -> ssl.SSLContext:
    """A TLS 1.2+ server context from a QEMU-style credentials directory."""
    missing = [n for n in (CA, CERT, KEY) if not (directory / n).is_file()]
    if missing:
        raise ConfigError(f"--tls-creds {directory}: missing {', '.join(missing)} "
                          "(QEMU tls-creds-x509 layout)")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(directory / CERT, directory / KEY)
        ctx.load_verify_locations(directory / CA)
    except (ssl.SSLError, OSError) as err:
        raise ConfigError(f"--tls-creds {directory}: {err}") from err
    ctx.verify_mode = ssl.CERT_REQUIRED if verify_peer else ssl.CERT_NONE
    return ctx


def client_context(directory: Path, flag: str = "--disk-tls-creds") -> ssl.SSLContext:
    """A TLS 1.2+ client context from a QEMU ``endpoint=client`` credentials directory.

    ``ca-cert.pem`` is required (the server is always verified, hostname included);
    ``client-cert.pem``/``client-key.pem`` are presented when present, as QEMU does,
    and an agent with ``--tls-verify-peer on`` (its default) requires them.
    """
    if not (directory / CA).is_file():
        raise ConfigError(f"{flag} {directory}: missing {CA} (QEMU tls-creds-x509 layout)")
    have = [(directory / n).is_file() for n in (CLIENT_CERT, CLIENT_KEY)]
    if any(have) and not all(have):
        missing = CLIENT_KEY if have[0] else CLIENT_CERT
        raise ConfigError(f"{flag} {directory}: missing {missing} (a client certificate "
                          "needs both client-cert.pem and client-key.pem)")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_verify_locations(directory / CA)
        if all(have):
            ctx.load_cert_chain(directory / CLIENT_CERT, directory / CLIENT_KEY)
    except (ssl.SSLError, OSError) as err:
        raise ConfigError(f"{flag} {directory}: {err}") from err
    return ctx
