"""The run supervisor without QEMU: notify_dev (Xen) checkpoints, resets, shutdown modes.

The test plays the harness/Xen side over unix sockets: it writes primary and
secondary records, reads outdev and notify_dev.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from colo_proxy.core.config import Config
from colo_proxy.core.events import Side
from colo_proxy.core.proxy import CoreFault
from colo_proxy.core.xen_notify import encode_message
from colo_proxy.drivers.endpoints import parse_endpoint
from colo_proxy.runtime.supervisor import RunSettings, ShutdownMode, Supervisor
from tests.fakes import RecordPeer, Runner, until

scapy_all = pytest.importorskip("scapy.all")


def segments(payload: bytes, dport: int = 40000) -> list[bytes]:
    ether, ip, tcp = scapy_all.Ether, scapy_all.IP, scapy_all.TCP
    head = ether() / ip(src="10.0.0.1", dst="10.0.0.2")
    out = [head / tcp(sport=80, dport=dport, flags="SA", seq=99, ack=500)]
    for off in range(0, len(payload), 100):
        out.append(
            head / tcp(sport=80, dport=dport, flags="PA", seq=100 + off, ack=501)
            / payload[off : off + 100]
        )  # fmt: skip
    return [bytes(f) for f in out]


def make_supervisor(d: Path, vnet: bool, mode: ShutdownMode) -> Supervisor:
    settings = RunSettings(
        primary_in=parse_endpoint(f"unix:{d}/pin,server"),
        secondary_in=parse_endpoint(f"unix:{d}/sin,server"),
        outdev=parse_endpoint(f"unix:{d}/out,server"),
        notify_dev=parse_endpoint(f"unix:{d}/ntf,server"),
        vnet_hdr=vnet,
        on_shutdown=mode,
    )
    return Supervisor(Config(compare_timeout=60.0, min_checkpoint_interval=0.0), settings)


@pytest.mark.parametrize("vnet", [False, True], ids=["plain", "vnet"])
def test_xen_notify_checkpoint_cycle(sockdir: Path, vnet: bool, run_loop: Runner) -> None:
    payload = bytes(range(256)) * 4
    bad = bytearray(payload)
    bad[500] ^= 1
    pri, sec = segments(payload), segments(bytes(bad))

    async def main() -> None:
        sup = make_supervisor(sockdir, vnet, ShutdownMode.REPORT)
        await sup.start()
        peer = RecordPeer(sockdir, vnet)
        await peer.connect()
        peer.ntf_w.write(encode_message("COLO_USERSPACE_PROXY_INIT"))
        await until(lambda: peer.notify_text == ["COLO_COMPARE_GET_XEN_INIT"], "init reply")
        peer.sin.write(peer.frames(sec))
        await peer.sin.drain()
        await until(lambda: sup.secondary_in.frames_in == len(sec), "secondary fed")
        peer.pin.write(peer.frames(pri))
        await peer.pin.drain()
        await until(lambda: "DO_CHECKPOINT" in peer.notify_text, "checkpoint request")
        released = len(peer.out_frames)
        assert 1 <= released < len(pri)  # the SYN-ACK and the segments before offset 500
        assert [d[o:] for d, o in peer.out_frames] == pri[:released]
        # a broken primary stream: reset and counted; nothing held is lost
        peer.pin.write(struct.pack(">II", 1 << 30, 0))
        await until(lambda: sup.primary_in.framing_errors == 1, "framing error")
        assert sup.proxy.held_frames() == len(pri) - released
        # Xen says the checkpoint is done (with the vnet word when vnet is on)
        word = struct.pack(">I", 0) if vnet else b""
        msg = encode_message("COLO_CHECKPOINT")
        peer.ntf_w.write(msg[:4] + word + msg[4:])
        await until(lambda: len(peer.out_frames) == len(pri), "flush")
        assert [d[o:] for d, o in peer.out_frames] == pri
        if vnet:
            assert {o for _, o in peer.out_frames} == {12}
        sup.stop()
        report = await sup.shutdown()
        assert report["supervisor"]["notify_checkpoints_done"] == 1  # type: ignore[index]
        assert report["primary_in"]["framing_errors"] == 1  # type: ignore[index]
        for w in (peer.pin, peer.sin, peer.ntf_w):
            w.close()

    run_loop(main())


@pytest.mark.parametrize("mode", list(ShutdownMode))
def test_shutdown_reports_or_flushes_held_frames(
    sockdir: Path, mode: ShutdownMode, run_loop: Runner
) -> None:
    pri = segments(b"x" * 300)

    async def main() -> None:
        sup = make_supervisor(sockdir, False, mode)
        await sup.start()
        peer = RecordPeer(sockdir, False)
        await peer.connect()
        peer.pin.write(peer.frames(pri))  # no secondary at all: everything is held
        await peer.pin.drain()
        await until(lambda: sup.proxy.held_frames() == len(pri), "held")
        report = await sup.shutdown()
        shutdown = report["shutdown"]
        assert isinstance(shutdown, dict)
        assert shutdown["held_frames_at_stop"] == len(pri)
        if mode is ShutdownMode.FLUSH:
            await until(lambda: len(peer.out_frames) == len(pri), "flushed frames")
            assert shutdown["held_frames_not_released"] == 0
        else:
            assert shutdown["held_frames_not_released"] == len(pri)
            assert peer.out_frames == []

    run_loop(main())


class FeedManyOverride:
    """The real core with feed_many replaced: a compiled Proxy's methods cannot be
    patched, so the driver gets this stand-in instead (same in both builds)."""

    def __init__(self, real: object, feed_many: object) -> None:
        self._real = real
        self.feed_many = feed_many

    def __getattr__(self, name: str) -> object:
        return getattr(self._real, name)


def test_core_exception_costs_one_frame_not_the_connection(sockdir: Path, run_loop: Runner) -> None:
    frames = segments(b"y" * 500)

    async def main() -> None:
        sup = make_supervisor(sockdir, False, ShutdownMode.REPORT)
        real_feed_many = sup.proxy.feed_many
        poison = frames[2]

        def feed_many(side: Side, batch: list[tuple[bytes, int]], now: float) -> None:
            """The core failing on the poisoned frame, as Proxy.feed_many reports it."""
            for i, (data, offset) in enumerate(batch):
                if data[offset:] == poison:
                    real_feed_many(side, batch[:i], now)
                    raise CoreFault(i)
            real_feed_many(side, batch, now)

        sup.proxy = FeedManyOverride(sup.proxy, feed_many)  # type: ignore[assignment]
        await sup.start()
        peer = RecordPeer(sockdir, False)
        await peer.connect()
        peer.sin.write(peer.frames(frames))
        peer.pin.write(peer.frames(frames))
        await until(lambda: sup.counters["core_errors"] == 2, "both poisoned frames counted")
        await until(lambda: sup.primary_in.frames_in == len(frames), "all frames read")
        assert sup.primary_in.channel.connected and sup.primary_in.channel.stats.resets == 0
        assert sup.proxy.stats()["primary_frames"] == len(frames) - 1
        await sup.shutdown()

    run_loop(main())


def test_core_fault_after_the_batch_is_counted_and_reading_goes_on(
    sockdir: Path, run_loop: Runner
) -> None:
    frames = segments(b"z" * 500)

    async def main() -> None:
        sup = make_supervisor(sockdir, False, ShutdownMode.REPORT)
        real_feed_many = sup.proxy.feed_many

        def feed_many(side: Side, batch: list[tuple[bytes, int]], now: float) -> None:
            """Every frame fed, then the per-flow comparison fails (CoreFault(-1))."""
            real_feed_many(side, batch, now)
            if side is Side.SECONDARY:
                raise CoreFault(-1)

        sup.proxy = FeedManyOverride(sup.proxy, feed_many)  # type: ignore[assignment]
        await sup.start()
        peer = RecordPeer(sockdir, False)
        await peer.connect()
        peer.pin.write(peer.frames(frames))
        await until(lambda: sup.primary_in.frames_in == len(frames), "primary read")
        peer.sin.write(peer.frames(frames))
        await until(lambda: sup.secondary_in.frames_in == len(frames), "secondary read")
        await until(lambda: sup.counters["core_errors"] >= 1, "fault counted")
        assert sup.secondary_in.channel.connected
        assert sup.proxy.stats()["secondary_frames"] == len(frames)
        await sup.shutdown()

    run_loop(main())


def test_passthrough_after_colo_exit_releases_held_and_later_frames(
    sockdir: Path, run_loop: Runner
) -> None:
    first, later = segments(b"a" * 300), segments(b"b" * 300, dport=40001)

    async def main() -> None:
        sup = make_supervisor(sockdir, False, ShutdownMode.REPORT)
        await sup.start()
        peer = RecordPeer(sockdir, False)
        await peer.connect()
        peer.pin.write(peer.frames(first))  # no secondary: all held
        await until(lambda: sup.proxy.held_frames() == len(first), "held")
        assert peer.out_frames == []
        sup._colo_exit({"mode": "secondary", "reason": "error"})  # not ours: still held
        assert sup.passthrough_reason is None
        sup._colo_exit({"mode": "primary", "reason": "request"})
        await until(lambda: len(peer.out_frames) == len(first), "held frames released")
        peer.sin.write(peer.frames(later))
        peer.pin.write(peer.frames(later))
        await until(lambda: len(peer.out_frames) == len(first) + len(later), "passed through")
        assert [d for d, _ in peer.out_frames] == first + later
        await until(lambda: sup.counters["passthrough_secondary_dropped"] == len(later), "dropped")
        report = await sup.shutdown()
        assert report["passthrough"] == "COLO ended on the primary (reason request)"

    run_loop(main())
