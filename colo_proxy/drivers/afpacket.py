"""One network interface as a packet port: a TPACKET_V3 receive ring and raw sends.

Theory of operation
-------------------
A :class:`PacketPort` is an ``AF_PACKET``/``SOCK_RAW`` socket bound to one
interface for every protocol, in promiscuous mode, with
``PACKET_IGNORE_OUTGOING`` so what the proxy sends there is not read back.
Reception uses a ``PACKET_RX_RING`` of ``TPACKET_V3`` blocks mapped into our
memory: the kernel fills a block with many frames and hands it over
(``TP_STATUS_USER``) when it is full or its retire timer expires.  On
readability the port walks every block it owns, copies each frame out,
gives the block back (``TP_STATUS_KERNEL``) and calls ``on_frames`` once
with the whole batch, so the core sees one ``feed_many`` per wake-up.

What the kernel did to a frame on the way is undone before anyone sees it:

* the outer 802.1Q/802.1ad tag was stripped into ``tp_vlan_tci``: it is put
  back, so flows keep their VLAN;
* a frame whose sender offloads checksums (``TP_STATUS_CSUMNOTREADY``) gets
  its TCP/UDP checksum computed (:mod:`colo_proxy.core.checksum`);
* a GSO super-frame (bigger than the interface MTU allows) cannot be sent
  on and cannot be compared segment by segment: it is dropped, counted and
  logged once with the fix (offloads off on that interface);
* a frame cut short by the ring (``tp_snaplen < tp_len``) is dropped and
  counted.

Sends go through a mapped transmit ring (:mod:`.afpacket_tx`): a batch is
copied into its slots and handed over with one ``send()``.  Frames the
interface cannot carry (over its MTU) are dropped and counted before the
ring.  When the ring is full the rest waits in a bounded queue; when the
device pushes back (``ENOBUFS``, ``EAGAIN``) the filled slots stay
filled; both are retried after a short delay.  Beyond the bound, output is
dropped and counted.  Reading never waits for writing.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import mmap
import os
import socket
import struct
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from colo_proxy.core.checksum import complete_checksum
from colo_proxy.core.framing import Frame
from colo_proxy.drivers.afpacket_tx import RETRY_ERRNOS, TxRing
from colo_proxy.errors import ConfigError, TransportError

log = logging.getLogger(__name__)

SOL_PACKET = 263
PACKET_ADD_MEMBERSHIP = 1
PACKET_RX_RING = 5
PACKET_STATISTICS = 6
PACKET_VERSION = 10
PACKET_IGNORE_OUTGOING = 23
PACKET_MR_PROMISC = 1
TPACKET_V3 = 2
ETH_P_ALL = 0x0003
SIOCGIFFLAGS = 0x8913
SIOCGIFMTU = 0x8921
IFF_UP = 0x1

TP_STATUS_KERNEL = 0
TP_STATUS_USER = 1 << 0
TP_STATUS_CSUMNOTREADY = 1 << 3
TP_STATUS_VLAN_VALID = 1 << 4
TP_STATUS_VLAN_TPID_VALID = 1 << 6
TP_STATUS_GSO_TCP = 1 << 8

RETRY_DELAY = 0.0005
"""Seconds before retrying output the kernel could not take yet."""

MAX_RETRY_DELAY = 0.5
"""The retry delay doubles up to this while sends fail (an interface that is down)."""

VLAN_HEADROOM = 8
"""Bytes beyond MTU + 14 a frame may have: two VLAN tags (QinQ)."""

_REQ3 = struct.Struct("=7I")
_STATS3 = struct.Struct("=3I")
_U32 = struct.Struct("=I")
_BLOCK = struct.Struct("=III")  # block_status, num_pkts, offset_to_first_pkt (at +8)
_FRAME = struct.Struct("=IIIIIIHHIIH")  # tpacket3_hdr up to tp_vlan_tpid
_IFREQ_INT = struct.Struct("16si20x")
_VLAN = struct.Struct("!HH")

OnFrames = Callable[[list[Frame]], None]


@dataclass(frozen=True, slots=True)
class RingSpec:
    """Receive ring geometry: ``block_count`` blocks of ``block_size`` bytes."""

    block_size: int = 1 << 20
    block_count: int = 16
    retire_ms: int = 2
    """A partly filled block is handed over after this long (the latency floor)."""

    def validate(self) -> None:
        """Reject geometries the kernel would refuse, with a clear message."""
        page = mmap.PAGESIZE
        if self.block_size < page or self.block_size % page or self.block_size > 1 << 26:
            raise ConfigError(
                f"ring block size {self.block_size}: must be a multiple of {page} up to 64 MiB"
            )
        if not 2 <= self.block_count <= 4096:
            raise ConfigError(f"ring block count {self.block_count}: must be 2..4096")
        if not 1 <= self.retire_ms <= 1000:
            raise ConfigError(f"ring retire timeout {self.retire_ms} ms: must be 1..1000")


@dataclass(slots=True)
class PortStats:
    """Counters of one packet port."""

    frames_in: int = 0
    bytes_in: int = 0
    blocks: int = 0
    frames_out: int = 0
    bytes_out: int = 0
    vlan_reinserted: int = 0
    checksums_completed: int = 0
    checksums_not_completed: int = 0
    gso_dropped: int = 0
    truncated_dropped: int = 0
    ring_packets: int = 0
    ring_drops: int = 0
    ring_freezes: int = 0
    send_deferred: int = 0
    send_errors: int = 0
    send_oversize: int = 0
    send_overflow_dropped: int = 0
    socket_errors: int = 0


def parse_block(
    ring: memoryview, base: int, max_frame: int, stats: PortStats, out: list[Frame]
) -> bool:
    """Copy the frames of the block at ``base`` into ``out``; False if the kernel owns it.

    Does not hand the block back: the caller does, once it holds the copies.
    Returns True when the block was the user's (even if every frame in it
    had to be dropped).
    """
    status, count, first = _BLOCK.unpack_from(ring, base + 8)
    if not status & TP_STATUS_USER:
        return False
    stats.blocks += 1
    at = base + first
    unpack = _FRAME.unpack_from
    for _ in range(count):
        nxt, _s, _ns, snaplen, length, tp_status, mac, _net, _hash, tci, tpid = unpack(ring, at)
        start = at + mac
        at += nxt
        if snaplen < length:
            stats.truncated_dropped += 1
            continue
        if length > max_frame or tp_status & TP_STATUS_GSO_TCP:
            stats.gso_dropped += 1
            continue
        if tp_status & TP_STATUS_VLAN_VALID:
            if not tp_status & TP_STATUS_VLAN_TPID_VALID or not tpid:
                tpid = 0x8100
            data = (
                bytes(ring[start : start + 12])
                + _VLAN.pack(tpid, tci & 0xFFFF)
                + bytes(ring[start + 12 : start + length])
            )
            stats.vlan_reinserted += 1
        else:
            data = bytes(ring[start : start + length])
        if tp_status & TP_STATUS_CSUMNOTREADY:
            fixed = complete_checksum(data)
            if isinstance(fixed, bytes):
                data = fixed
                stats.checksums_completed += 1
            else:
                stats.checksums_not_completed += 1
        stats.bytes_in += len(data)
        out.append((data, 0))
    return True


class PacketPort:
    """An interface the proxy reads whole batches from and writes frames to."""

    def __init__(
        self,
        name: str,
        ifname: str,
        on_frames: OnFrames | None,
        ring: RingSpec | None = None,
        max_pending: int = 64 * 1024 * 1024,
    ) -> None:
        self.name = name
        self.ifname = ifname
        self.stats = PortStats()
        self.mtu = 0
        self._on_frames = on_frames
        self._ring_spec = ring or RingSpec()
        self._max_pending = max_pending
        self._sock: socket.socket | None = None
        self._map: mmap.mmap | None = None
        self._view: memoryview | None = None
        self._block = 0
        self._max_frame = 0
        self._pending: deque[bytes] = deque()
        self._pending_bytes = 0
        self._tx: TxRing | None = None
        self._send_limit = 0
        self._reading = False
        self._retry: asyncio.TimerHandle | None = None
        self._retry_delay = RETRY_DELAY
        self._gso_logged = False
        self._overflowing = False

    # ---- life cycle -------------------------------------------------------------------

    def open(self) -> None:
        """Create the socket and ring; ConfigError/TransportError say what is wrong."""
        spec = self._ring_spec
        spec.validate()
        if not self.ifname or len(self.ifname) > 15 or "/" in self.ifname:
            raise ConfigError(f"{self.name}: {self.ifname!r} is not a valid interface name")
        try:
            ifindex = socket.if_nametoindex(self.ifname)
        except OSError:
            raise ConfigError(f"{self.name}: no interface named {self.ifname!r}") from None
        try:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        except PermissionError as err:
            raise TransportError(
                f"{self.name}: opening a packet socket needs root or CAP_NET_RAW ({err})"
            ) from err
        try:
            self._setup(sock, ifindex, spec)
        except OSError as err:
            sock.close()
            self._unmap()
            if self._tx is not None:
                self._tx.close()
                self._tx = None
            raise TransportError(f"{self.name}: cannot set up {self.ifname}: {err}") from err
        self._sock = sock
        if not self._interface_up():
            log.warning("%s: interface %s is down: nothing will pass", self.name, self.ifname)
        log.info(
            "%s: %s (mtu %d), ring %d x %d KiB, retire %d ms",
            self.name, self.ifname, self.mtu, spec.block_count, spec.block_size >> 10,
            spec.retire_ms,
        )

    def _setup(self, sock: socket.socket, ifindex: int, spec: RingSpec) -> None:
        sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V3)
        frame_size = 2048
        req = _REQ3.pack(
            spec.block_size, spec.block_count, frame_size,
            spec.block_size // frame_size * spec.block_count, spec.retire_ms, 0, 0,
        )
        sock.setsockopt(SOL_PACKET, PACKET_RX_RING, req)
        size = spec.block_size * spec.block_count
        self._map = mmap.mmap(sock.fileno(), size, mmap.MAP_SHARED,
                              mmap.PROT_READ | mmap.PROT_WRITE)
        self._view = memoryview(self._map)
        sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
        mreq = struct.pack("iHH8s", ifindex, PACKET_MR_PROMISC, 0, b"")
        sock.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP, mreq)
        sock.bind((self.ifname, ETH_P_ALL))
        sock.setblocking(False)
        self.mtu = self._ioctl_int(sock, SIOCGIFMTU)
        self._max_frame = self.mtu + 14 + VLAN_HEADROOM
        self._send_limit = self.mtu + 14
        self._tx = TxRing(self.ifname, self.mtu)

    def _ioctl_int(self, sock: socket.socket, request: int) -> int:
        ifreq = _IFREQ_INT.pack(self.ifname.encode(), 0)
        value: int = _IFREQ_INT.unpack(fcntl.ioctl(sock.fileno(), request, ifreq))[1]
        return value

    def _interface_up(self) -> bool:
        assert self._sock is not None
        return bool(self._ioctl_int(self._sock, SIOCGIFFLAGS) & IFF_UP)

    def start(self) -> None:
        """Start reading (needs the running loop); an output-only port reads nothing."""
        assert self._sock is not None, "open() first"
        if self._on_frames is not None:
            asyncio.get_running_loop().add_reader(self._sock.fileno(), self._readable)
            self._reading = True

    def stop_reading(self) -> None:
        """Read nothing more; sending still works (shutdown flushes through it)."""
        if self._reading and self._sock is not None:
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
        self._reading = False

    def close(self) -> None:
        """Stop reading and writing; output still queued is counted as dropped."""
        if self._sock is None:
            return
        self._collect_ring_stats()
        self.stop_reading()
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        self.stats.send_overflow_dropped += self.pending_frames
        self._pending.clear()
        self._pending_bytes = 0
        if self._tx is not None:
            self._tx.close()
            self._tx = None
        self._sock.close()
        self._sock = None
        self._unmap()

    def _unmap(self) -> None:
        if self._view is not None:
            self._view.release()
            self._view = None
        if self._map is not None:
            with contextlib.suppress(BufferError):
                self._map.close()
            self._map = None

    # ---- receiving --------------------------------------------------------------------

    def _readable(self) -> None:
        """Take every block the kernel handed over; one on_frames call for all of them."""
        view = self._view
        if view is None or self._on_frames is None:
            return
        spec = self._ring_spec
        frames: list[Frame] = []
        stats = self.stats
        gso_before = stats.gso_dropped
        for taken in range(spec.block_count):  # noqa: B007 - read after the loop
            base = self._block * spec.block_size
            if not parse_block(view, base, self._max_frame, stats, frames):
                break
            _U32.pack_into(view, base + 8, TP_STATUS_KERNEL)
            self._block = (self._block + 1) % spec.block_count
        else:
            taken = spec.block_count
        if not taken:
            self._socket_error()
        if stats.gso_dropped != gso_before and not self._gso_logged:
            self._gso_logged = True
            log.error(
                "%s: dropped a frame larger than %s's MTU (%d): segmentation offload is on "
                "at its sender; turn it off there and on this interface, e.g. "
                "`ethtool -K %s tso off gso off gro off` (counted as gso_dropped)",
                self.name, self.ifname, self.mtu, self.ifname,
            )
        if frames:
            stats.frames_in += len(frames)
            self._on_frames(frames)

    def _socket_error(self) -> None:
        """Woken with no block ready: read (and so clear) a pending socket error.

        An interface that goes away leaves ``ENETDOWN`` on the socket; until it
        is read, the socket stays readable and the loop would spin.
        """
        if self._sock is None:
            return
        code = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            self.stats.socket_errors += 1
            log.error("%s: %s: %s (it must come back up for traffic to pass; restart the "
                      "proxy if it was re-created)", self.name, self.ifname, os.strerror(code))

    def _collect_ring_stats(self) -> None:
        """Add the kernel's counters (reading them resets them) to ours."""
        if self._sock is None:
            return
        try:
            raw = self._sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, _STATS3.size)
        except OSError:
            return
        packets, drops, freezes = _STATS3.unpack(raw)
        self.stats.ring_packets += packets
        self.stats.ring_drops += drops
        self.stats.ring_freezes += freezes

    # ---- sending ----------------------------------------------------------------------

    @property
    def pending_frames(self) -> int:
        """Output not yet taken by the kernel (queued here or filled in the ring)."""
        unsent = self._tx.unsent() if self._tx is not None else 0
        return len(self._pending) + unsent

    def send(self, frames: Sequence[Frame]) -> None:
        """Queue frames on the transmit ring and hand them to the kernel with one send()."""
        ring = self._tx
        if ring is None:
            self.stats.send_errors += len(frames)
            return
        if self._pending:
            self._queue(frames)
        else:
            put, stats, limit = ring.put, self.stats, self._send_limit
            for index, (data, offset) in enumerate(frames):
                frame = data[offset:] if offset else data
                size = len(frame)
                if size > limit and not (size <= limit + 4 and frame[12:14] == b"\x81\x00"):
                    self._refuse(size)
                    continue
                if size < 14:
                    self._refuse(size)
                    continue
                if not put(frame):
                    self._queue(frames[index:])
                    break
                stats.frames_out += 1
                stats.bytes_out += size
        self._kick(ring)

    def _refuse(self, size: int) -> None:
        """A frame the interface cannot carry (over its MTU, or a runt): counted, logged once."""
        self.stats.send_oversize += 1
        if self.stats.send_oversize == 1:
            log.error("%s: a %d-byte frame does not fit %s (mtu %d): dropped (counted as "
                      "send_oversize)", self.name, size, self.ifname, self.mtu)

    def _kick(self, ring: TxRing) -> None:
        err = ring.kick()
        if err is None:
            self._retry_delay = RETRY_DELAY
        elif err.errno not in RETRY_ERRNOS:
            self._send_failed(err)
            self._retry_delay = min(self._retry_delay * 2, MAX_RETRY_DELAY)
        if self._pending or ring.busy():
            self._arm()

    def _queue(self, frames: Sequence[Frame]) -> None:
        """The ring is full: keep the rest in order, within the bound."""
        for data, offset in frames:
            frame = data[offset:] if offset else data
            if self._pending_bytes + len(frame) > self._max_pending:
                self.stats.send_overflow_dropped += 1
                if not self._overflowing:
                    self._overflowing = True
                    log.error("%s: output queue full (%d bytes): dropping output (counted)",
                              self.name, self._pending_bytes)
                continue
            self._pending.append(frame)
            self._pending_bytes += len(frame)
            self.stats.send_deferred += 1

    def _arm(self) -> None:
        """Retry shortly: the kernel frees slots as the device takes frames."""
        if self._retry is None and self._tx is not None:
            self._retry = asyncio.get_running_loop().call_later(self._retry_delay, self._drain)

    def _drain(self) -> None:
        self._retry = None
        ring = self._tx
        if ring is None:
            return
        pending, stats = self._pending, self.stats
        while pending and ring.put(pending[0]):
            frame = pending.popleft()
            self._pending_bytes -= len(frame)
            stats.frames_out += 1
            stats.bytes_out += len(frame)
        if not pending:
            self._overflowing = False
        self._kick(ring)

    def _send_failed(self, err: OSError) -> None:
        self.stats.send_errors += 1
        if self.stats.send_errors in (1, 10, 100, 1000) or self.stats.send_errors % 10000 == 0:
            log.error("%s: sending on %s failed (%d so far; frames stay queued): %s",
                      self.name, self.ifname, self.stats.send_errors, err)

    def counters(self) -> dict[str, int]:
        """Counters for stats and the shutdown report (ring counters refreshed)."""
        self._collect_ring_stats()
        out = {k: getattr(self.stats, k) for k in PortStats.__dataclass_fields__}
        out["pending_frames"] = self.pending_frames
        if self._tx is not None:
            out["tx_wrong_format"] = self._tx.wrong_format
        out["mtu"] = self.mtu
        return out
