"""The hardening tests' fixtures: the driver tests' (a short socket directory, both
event loops) and QEMU tls-creds-x509 credential directories made with openssl."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from colo_proxy.disk.address import Address
from colo_proxy.disk.agent import AgentConfig, DiskAgent
from colo_proxy.disk.engine import DiskEngine
from colo_proxy.disk.tls import server_context
from tests.fakes import free_port, short_tmpdir

__all__ = ["creds", "free_port", "tls_agent"]


def sh(*cmd: str, cwd: Path) -> None:
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca(d: Path, name: str) -> None:
    sh("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}-key.pem",
       "-out", f"{name}-cert.pem", "-days", "2", "-subj", f"/CN={name}",
       "-addext", "basicConstraints=critical,CA:TRUE",
       "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)


def make_leaf(d: Path, ca: str, name: str, purpose: str) -> None:
    (d / f"{name}.ext").write_text(
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        f"extendedKeyUsage={purpose}\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n")
    sh("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}-key.pem",
       "-out", f"{name}.csr", "-subj", "/CN=localhost", cwd=d)
    sh("openssl", "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}-cert.pem", "-CAkey",
       f"{ca}-key.pem", "-CAcreateserial", "-out", f"{name}-cert.pem", "-days", "2",
       "-extfile", f"{name}.ext", cwd=d)


@pytest.fixture(scope="module")
def creds() -> Iterator[dict[str, Path]]:
    """QEMU tls-creds-x509 directories (ca-cert.pem, ROLE-cert.pem, ROLE-key.pem).

    ``server`` and ``client`` share a CA; ``rogue`` trusts the server's CA but its
    own certificate is signed by another CA (the server must refuse it); ``wrongca``
    holds the good client certificate but trusts only the other CA (it must refuse
    the server).
    """
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    root = short_tmpdir()
    work = root / "work"
    work.mkdir()
    make_ca(work, "ca")
    make_ca(work, "rogue-ca")
    make_leaf(work, "ca", "server", "serverAuth")
    make_leaf(work, "ca", "client", "clientAuth")
    make_leaf(work, "rogue-ca", "rogue", "clientAuth")
    layout = {  # directory: (its CA, whose certificate, as which role)
        "server": ("ca", "server", "server"),
        "client": ("ca", "client", "client"),
        "rogue": ("ca", "rogue", "client"),
        "wrongca": ("rogue-ca", "client", "client"),
    }
    dirs = {}
    for name, (ca, leaf, role) in layout.items():
        d = dirs[name] = root / name
        d.mkdir()
        shutil.copy(work / f"{ca}-cert.pem", d / "ca-cert.pem")
        shutil.copy(work / f"{leaf}-cert.pem", d / f"{role}-cert.pem")
        shutil.copy(work / f"{leaf}-key.pem", d / f"{role}-key.pem")
    yield dirs
    shutil.rmtree(root, ignore_errors=True)



@contextlib.asynccontextmanager
async def tls_agent(server_creds: Path) -> AsyncIterator[int]:
    """An in-process disk agent (1 MiB image) with QMP over TLS on 127.0.0.1: its port."""
    work = short_tmpdir()
    img = work / "img"
    img.write_bytes(bytes(1 << 20))
    port = free_port()
    agent = DiskAgent(DiskEngine(img, work / "state"), AgentConfig(
        nbd=(Address(path=str(work / "nbd")),),
        qmp=(Address(host="127.0.0.1", port=port),), tls=server_context(server_creds)))
    try:
        await agent.start()
        yield port
    finally:
        await agent.close()
        shutil.rmtree(work, ignore_errors=True)
