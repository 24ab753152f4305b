"""TLS with client certificates on the disk agent's TCP listeners: NBD by STARTTLS (a
real QEMU client with tls-creds-x509 connects), QMP from connect."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import ssl
import struct
import subprocess
from pathlib import Path

import pytest

from colo_proxy.disk import nbd_proto as p
from colo_proxy.disk.tls import server_context
from colo_proxy.errors import ConfigError
from tests.disk.agent_helpers import AgentProcess, start_agent
from tests.disk.nbdwire import go_payload, option, parse_option_replies
from tests.fakes import free_port, short_tmpdir
from tests.hardening.conftest import tls_agent

# -- sans-IO ---------------------------------------------------------------------------


def greeted(tls: bool) -> p.NbdServerConnection:
    conn = p.NbdServerConnection({"replication": p.ExportInfo("replication", 1 << 20)},
                                 "replication", tls=tls)
    conn.data_to_send()
    assert conn.receive_data(struct.pack(">I", 3)) == []
    return conn


def test_options_before_starttls_are_refused() -> None:
    conn = greeted(tls=True)
    assert conn.receive_data(option(p.OPT_GO, go_payload("replication"))) == []
    ((opt, rtype, _),) = parse_option_replies(conn.data_to_send())
    assert (opt, rtype) == (p.OPT_GO, p.REP_ERR_TLS_REQD)
    assert conn.receive_data(option(p.OPT_STARTTLS)) == [p.StartTls()]
    ((opt, rtype, _),) = parse_option_replies(conn.data_to_send())
    assert (opt, rtype) == (p.OPT_STARTTLS, p.REP_ACK)
    conn.tls_started()
    events = conn.receive_data(option(p.OPT_GO, go_payload("replication")))
    assert isinstance(events[-1], p.ExportChosen)


def test_export_name_without_tls_closes_and_data_during_handshake_closes() -> None:
    conn = greeted(tls=True)
    (ev,) = conn.receive_data(option(p.OPT_EXPORT_NAME, b"replication"))
    assert isinstance(ev, p.Closed) and "TLS" in ev.error
    conn = greeted(tls=True)
    events = conn.receive_data(option(p.OPT_STARTTLS) + b"\x16\x03\x01")
    assert events[0] == p.StartTls() and isinstance(events[1], p.Closed)


def test_without_tls_starttls_is_still_refused_politely() -> None:
    conn = greeted(tls=False)
    assert conn.receive_data(option(p.OPT_STARTTLS)) == []
    ((_, rtype, _),) = parse_option_replies(conn.data_to_send())
    assert rtype == p.REP_ERR_POLICY


# -- certificates (the creds fixture is in conftest.py) ------------------------------


def test_missing_credentials_are_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"server-cert\.pem"):
        server_context(tmp_path)


def client_context(d: Path, with_cert: bool = True) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(d / "ca-cert.pem"))
    if with_cert:
        ctx.load_cert_chain(d / "client-cert.pem", d / "client-key.pem")
    return ctx


def qmp_query(port: int, ctx: ssl.SSLContext | None) -> dict[str, object]:
    """qmp_capabilities then query-colo-disk over a blocking (TLS) socket, independent of
    the QMP driver (test_disk_tls.py drives that one over TLS)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        sock = ctx.wrap_socket(raw, server_hostname="127.0.0.1") if ctx else raw
        with sock, sock.makefile("rwb") as f:
            json.loads(f.readline())  # the greeting
            f.write(b'{"execute": "qmp_capabilities"}\n{"execute": "query-colo-disk"}\n')
            f.flush()
            f.readline()
            reply: dict[str, object] = json.loads(f.readline())["return"]
            return reply


def test_qmp_over_tls_needs_a_client_certificate(creds: dict[str, Path]) -> None:
    async def main() -> None:
        async with tls_agent(creds["server"]) as port:
            status = await asyncio.to_thread(qmp_query, port, client_context(creds["client"]))
            assert status["phase"] == "replicating"
            for ctx in (client_context(creds["client"], with_cert=False),
                        client_context(creds["rogue"]), None):
                with pytest.raises((OSError, ValueError)):  # TLS alert, EOF or garbage
                    await asyncio.to_thread(qmp_query, port, ctx)

    asyncio.run(main())


# -- a real QEMU client ------------------------------------------------------------------


def qemu_io(port: int, creds_dir: Path | None, *cmds: str) -> subprocess.CompletedProcess[str]:
    opts = (f"driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},"
            "export=replication")
    args = ["qemu-io"]
    if creds_dir is not None:
        args += ["--object", f"tls-creds-x509,id=tls0,dir={creds_dir},endpoint=client"]
        opts += ",tls-creds=tls0"
    for c in cmds:
        args += ["-c", c]
    return subprocess.run([*args, "--image-opts", opts], capture_output=True, text=True,
                          timeout=60, check=False)


def nbd_starttls(port: int, ctx: ssl.SSLContext) -> int:
    """Greeting, STARTTLS, the TLS handshake, then NBD_OPT_GO inside: the export size."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        assert len(raw.recv(18)) == 18
        raw.sendall(struct.pack(">I", 3) + option(p.OPT_STARTTLS))
        ack = raw.recv(20)
        assert struct.unpack(">QIII", ack)[2] == p.REP_ACK
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(option(p.OPT_GO, go_payload("replication")))
            head = tls.recv(20)
            if len(head) < 20:
                raise ConnectionError("closed inside TLS")
            body = tls.recv(struct.unpack(">QIII", head)[3])
            return int(struct.unpack_from(">Q", body, 2)[0])


@pytest.mark.integration
def test_qemu_nbd_client_with_tls_creds(creds: dict[str, Path]) -> None:
    if shutil.which("qemu-io") is None:
        pytest.skip("qemu-io not installed")
    work = short_tmpdir()
    img = work / "img"
    img.write_bytes(bytes(1 << 20))
    port = free_port()
    agent: AgentProcess | None = None
    try:
        agent = start_agent(work, img, "--nbd", f"tcp:127.0.0.1:{port}",
                            "--tls-creds", str(creds["server"]), main_cli=True)
        ok = qemu_io(port, creds["client"], "write -P 0x5a 4096 4k", "read -P 0x5a 4096 4k")
        assert ok.returncode == 0 and "failed" not in ok.stdout.lower(), ok.stdout + ok.stderr
        plain = qemu_io(port, None, "read 0 4k")
        assert plain.returncode != 0 or "failed" in plain.stdout.lower()
        # QEMU will not even load a client certificate its CA did not sign: a Python
        # client presents one, and the server must refuse it in the handshake
        with pytest.raises((OSError, ValueError)):
            nbd_starttls(port, client_context(creds["rogue"]))
        assert nbd_starttls(port, client_context(creds["client"])) > 0
        mon = agent.monitor()
        try:
            status = mon.cmd("query-colo-disk")
        finally:
            mon.close()
        assert status["nbd-tls-failures"] >= 1, agent.stderr()
        assert status["speculation-bytes"] >= 4096
    finally:
        if agent is not None:
            agent.stop()
        shutil.rmtree(work, ignore_errors=True)
