"""TLS credentials in QEMU's ``tls-creds-x509`` layout, for the agent's TCP listeners.

A directory holding ``ca-cert.pem``, ``server-cert.pem`` and ``server-key.pem``
(what QEMU's ``-object tls-creds-x509,dir=DIR,endpoint=server`` reads), so the
same directory serves a QEMU NBD server and this agent.  With ``verify_peer``
(QEMU's default) a client must present a certificate signed by that CA, as a
QEMU client does from ``client-cert.pem``/``client-key.pem`` in its own directory.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from colo_proxy.errors import ConfigError

CA, CERT, KEY = "ca-cert.pem", "server-cert.pem", "server-key.pem"


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
