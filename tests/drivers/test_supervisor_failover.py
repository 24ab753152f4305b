"""`run --failover` against scripted QEMUs: the data-path heartbeat and the new primary's path.

The test plays both QEMUs: two scripted QMP servers that always answer, the
``heartbeat_dev`` chardev (it reads colo-proxy's ARP probes and answers them
as each guest would, on ``primary_in`` and ``secondary_in``) and the
secondary's ``secondary_outdev`` chardev.  A guest that stops answering while
its QMP still does is what "QMP alive, network dead" looks like to colo-proxy.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from colo_proxy.core.config import Config
from colo_proxy.core.framing import Frame, FrameDecoder, encode_frames
from colo_proxy.core.heartbeat import probe_reply_seq
from colo_proxy.drivers.endpoints import parse_endpoint
from colo_proxy.runtime.failover import FailoverSettings, FailoverSupervisor
from colo_proxy.runtime.supervisor import RunSettings
from tests.drivers.test_supervisor import segments
from tests.fakes import FakeQmp, until

GUEST_IP = bytes([10, 215, 15, 2])
GUEST_MAC = bytes.fromhex("525400150002")
PERIOD, MISSES = 0.1, 3


def arp_reply(probe: bytes) -> bytes:
    """What Linux answers to an ARP probe for its address (unicast to the prober)."""
    prober = probe[6:12]
    return (prober + GUEST_MAC + bytes.fromhex("08060001080006040002") + GUEST_MAC + GUEST_IP
            + prober + b"\0" * 4)


class Guests:
    """Both guests' data path: answer every probe, each while it is alive."""

    def __init__(self, d: Path) -> None:
        self.d = d
        self.alive = {"primary": True, "secondary": True}
        self.probes = 0
        self.new_primary_out: list[Frame] = []

    async def start(self) -> None:
        self.hb_server = await asyncio.start_unix_server(self._probes, f"{self.d}/hb")
        self.out_server = await asyncio.start_unix_server(self._sout, f"{self.d}/sout")
        _, self.pin = await asyncio.open_unix_connection(f"{self.d}/pin")
        _, self.sin = await asyncio.open_unix_connection(f"{self.d}/sin")
        self.out_r, self.out_w = await asyncio.open_unix_connection(f"{self.d}/out")
        self.outdev: list[Frame] = []
        self.tasks = [asyncio.create_task(self._read(self.out_r, self.outdev))]

    async def _read(self, r: asyncio.StreamReader, into: list[Frame]) -> None:
        dec = FrameDecoder(False)
        while chunk := await r.read(65536):
            into += dec.feed(chunk)

    async def _probes(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        dec = FrameDecoder(False)
        while chunk := await r.read(65536):
            for data, _ in dec.feed(chunk):
                self.probes += 1
                reply = encode_frames([(arp_reply(data), 0)], False)
                if self.alive["primary"]:
                    self.pin.write(reply)
                    # the secondary gets the probe only through the primary's filter-mirror
                    if self.alive["secondary"]:
                        self.sin.write(reply)

    async def _sout(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await self._read(r, self.new_primary_out)

    def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        self.hb_server.close()
        self.out_server.close()


class FakeSecondary(FakeQmp):
    """Also answers the virtio queries, with its NIC enabled or (old QEMU) disabled."""

    def __init__(self, nic_disabled: bool) -> None:
        super().__init__()
        self.nic_disabled = nic_disabled

    def answer(self, w: asyncio.StreamWriter, msg: dict[str, Any]) -> None:
        cmd = msg["execute"]
        if cmd not in ("x-query-virtio", "x-query-virtio-status", "query-rx-filter"):
            super().answer(w, msg)
            return
        self.commands.append((cmd, msg.get("arguments")))
        ret: Any = [{"name": "virtio-net", "path": "/machine/peripheral/net0/virtio-backend"}]
        if cmd == "x-query-virtio-status":
            ret = {"name": "virtio-net", "disabled": self.nic_disabled}
        elif cmd == "query-rx-filter":
            ret = [{"name": "net0", "main-mac": "52:54:00:15:00:02"}]
        w.write(json.dumps({"return": ret, "id": msg["id"]}).encode() + b"\r\n")


def run_settings(d: Path, **extra: Any) -> RunSettings:
    """`run`'s settings for the scripted QEMUs' sockets in ``d``."""
    return RunSettings(
        primary_in=parse_endpoint(f"unix:{d}/pin,server"),
        secondary_in=parse_endpoint(f"unix:{d}/sin,server"),
        outdev=parse_endpoint(f"unix:{d}/out,server"),
        qmp=parse_endpoint(f"unix:{d}/pqmp"),
        secondary_qmp=parse_endpoint(f"unix:{d}/sqmp"),
        **extra,
    )


def supervisor(d: Path) -> FailoverSupervisor:
    settings = run_settings(d)
    failover = FailoverSettings(
        PERIOD, MISSES, ("f1",), ("red0",), ("m0",), None,
        heartbeat_dev=parse_endpoint(f"unix:{d}/hb"), guest_ip=GUEST_IP,
        secondary_outdev=parse_endpoint(f"unix:{d}/sout"),
    )
    return FailoverSupervisor(Config(compare_timeout=60.0, min_checkpoint_interval=0.0),
                              settings, failover)


@pytest.mark.parametrize(("dies", "nic_disabled"),
                         [("primary", False), ("secondary", False), ("primary", True)])
def test_dead_data_path_with_live_qmp_fails_over(
    sockdir: Path, dies: str, nic_disabled: bool
) -> None:
    async def main() -> tuple[dict[str, Any], FakeQmp, FakeQmp]:
        pri_qmp, sec_qmp = FakeQmp(), FakeSecondary(nic_disabled)
        servers = [await asyncio.start_unix_server(pri_qmp.serve, f"{sockdir}/pqmp"),
                   await asyncio.start_unix_server(sec_qmp.serve, f"{sockdir}/sqmp")]
        guests = Guests(sockdir)
        sup = supervisor(sockdir)
        await sup.start()
        await guests.start()
        hb = sup.heartbeats
        await until(lambda: all(st.answers >= 3 for st in hb.state.values()), "armed paths")
        # ordinary traffic goes through the core; the probe answers never do
        flow = segments(b"x" * 300)
        guests.sin.write(encode_frames([(f, 0) for f in flow], False))
        await until(lambda: sup.secondary_in.frames_in > len(flow), "secondary flow")
        guests.pin.write(encode_frames([(f, 0) for f in flow], False))
        await until(lambda: len(guests.outdev) == len(flow), "released flow")
        assert all(probe_reply_seq(d, o) is None for d, o in guests.outdev)
        # the guest's network dies; its QEMU keeps answering QMP
        guests.alive[dies] = False
        phase = "promoted" if dies == "primary" else "primary_alone"
        await until(lambda: sup.phase.value == phase and sup._sequence is not None
                    and sup._sequence.done(), phase)
        if dies == "primary":  # the new primary's output goes out through colo-proxy
            more = segments(b"y" * 300, dport=40001)
            guests.sin.write(encode_frames([(f, 0) for f in more], False))
            await until(lambda: len(guests.new_primary_out) == len(more), "new primary output")
            assert [d for d, _ in guests.new_primary_out] == more
        report = await sup.shutdown()
        guests.close()
        for server in servers:
            server.close()
        return report, pri_qmp, sec_qmp

    report, pri_qmp, sec_qmp = asyncio.run(main())
    fo: dict[str, Any] = report["failover"]
    assert [(x["peer"], x["via"]) for x in fo["losses"]] == [(dies, "data")]
    assert fo["heartbeats"][dies]["lost"] and fo["heartbeats"][dies]["data"]["lost"]
    steps = [s["step"] for s in fo["steps"]]
    if nic_disabled:  # reported, not hidden: the new primary will not send anything
        at = [s["step"] for s in fo["steps"]].index("secondary: virtio devices enabled")
        last = fo["steps"].pop(at)
        assert last["step"] == "secondary: virtio devices enabled" and not last["ok"]
        assert last["result"] == ["virtio-net /machine/peripheral/net0/virtio-backend"]
    assert all(s["ok"] for s in fo["steps"]), fo["steps"]
    sec_cmds = [c for c, _ in sec_qmp.commands if c != "query-status"]
    if dies == "primary":
        assert steps == ["primary: stop (fence)", "secondary: nbd-server-stop",
                         "secondary: x-colo-lost-heartbeat", "secondary: f2 status on",
                         "secondary: f3 status on", "secondary: object-del f1",
                         "secondary: chardev-remove red0", "secondary: virtio devices enabled",
                         "secondary: query-rx-filter (its NICs)", "secondary: set_link net0 up",
                         "secondary: announce-self", "primary: stop (fence, COLO over)"]
        assert ("stop", None) in pri_qmp.commands
        # a checkpoint may have copied the primary's down link into its NIC
        assert ("set_link", {"name": "net0", "up": True}) in sec_qmp.commands
        assert ("qom-set", {"path": "/objects/f2", "property": "status", "value": "on"}) \
            in sec_qmp.commands
        # the redirector towards colo-proxy stays: the new primary's output comes through it
        assert ("object-del", {"id": "f2"}) not in sec_qmp.commands
        assert report["supervisor"]["failover_secondary_passed"] >= 4
        assert report["secondary_outdev"]["frames_out"] == 4
    else:
        assert steps == ["primary: x-colo-lost-heartbeat", "primary: object-del m0"]
        assert "x-colo-lost-heartbeat" not in sec_cmds
    assert report["supervisor"]["data_probe_replies"] > 0


def test_a_secondary_that_never_answers_the_data_path_is_reported(
    sockdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> dict[str, Any]:
        pri_qmp, sec_qmp = FakeQmp(), FakeSecondary(False)
        servers = [await asyncio.start_unix_server(pri_qmp.serve, f"{sockdir}/pqmp"),
                   await asyncio.start_unix_server(sec_qmp.serve, f"{sockdir}/sqmp")]
        guests = Guests(sockdir)
        guests.alive["secondary"] = False  # a mute NIC from the start: never armed
        sup = supervisor(sockdir)
        await sup.start()
        await guests.start()
        await until(lambda: sup.mute_secondary, "the mute secondary reported")
        report = await sup.shutdown()
        guests.close()
        for server in servers:
            server.close()
        return report

    report = asyncio.run(main())
    fo = report["failover"]
    assert fo["secondary_data_path_mute"] is True and fo["phase"] == "protected"
    assert not fo["losses"]  # never armed, so never lost: reported instead
    assert "a failover to it would leave a primary that sends nothing" in caplog.text
