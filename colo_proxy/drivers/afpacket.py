"""One network interface as a packet port: a TPACKET_V3 receive ring and raw sends.

Theory of operation
-------------------
A :class:`PacketPort` is an ``AF_PACKET``/``SOCK_RAW`` socket bound to one
interface for every protocol, in promiscuous mode, with
``PACKET_IGNORE_OUTGOING`` so what the proxy sends there is not read back.
Reception uses a ``PACKET_RX_RING`` mapped into our memory, by default in
``TPACKET_V2`` layout: one fixed-size slot per frame, handed over
(``TP_STATUS_USER``) and the socket woken as soon as the frame is there.  On
readability the port walks every slot it owns, copies each frame out, gives
the slot back (``TP_STATUS_KERNEL``) and calls ``on_frames`` once with the
whole batch, so the core sees one ``feed_many`` per wake-up.  At low load
that is one frame per wake-up, with no added latency; at high load frames
pile up while the core works and the next wake-up takes them all: the batch
grows with the load by itself.

Why not ``TPACKET_V3`` (still there: ``RingSpec(version=3)``): its blocks are
handed over only when full or when the block retire timer fires, and the
timer (1 ms at least) is paid at every hop: 3 ms per round trip through the
bridge, where a plain bridge takes 0.1 ms.

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

That is without ``vnet``.  With ``vnet=True`` (``PACKET_VNET_HDR``, the
default of bridge mode where the kernel has it) offloads need not be off:
each frame comes with its ``virtio_net_hdr`` (:mod:`.vnet`) and is handed on
as ``(header + frame, VNET_LEN)``.  A frame with an open checksum keeps it
open (``NEEDS_CSUM``; whoever receives it finishes it), and a TCP GSO
super-frame is taken whole: the core compares it as the byte range it is.
Slots stay sized for the MTU, so a super-frame does not fit one: the ring
gets its head (``TP_STATUS_COPY``) and, with ``PACKET_COPY_THRESH``, the
kernel queues the whole frame on the socket, where it is read (``recv``)
when its slot comes up, so frames keep their order.  The socket's receive
buffer (``copy_buffer``, 32 MiB) bounds that memory: beyond it the kernel
only fills the slot, and the cut frame is dropped and counted
(``truncated_dropped``).  Super-frames of other kinds (UDP GSO) are dropped
and counted (``gso_dropped``).

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
import logging
import mmap
import os
import socket
import struct
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from colo_proxy.core.checksum import complete_checksum
from colo_proxy.core.framing import Frame
from colo_proxy.drivers import vnet as vnethdr
from colo_proxy.drivers.afpacket_tx import RETRY_ERRNOS, TxRing
from colo_proxy.drivers.links import link_info
from colo_proxy.drivers.vnet import TCP_GSO, VNET_LEN
from colo_proxy.errors import ConfigError, TransportError

log = logging.getLogger(__name__)

SOL_PACKET = 263
PACKET_ADD_MEMBERSHIP = 1
PACKET_RX_RING = 5
PACKET_STATISTICS = 6
PACKET_COPY_THRESH = 7
PACKET_VERSION = 10
PACKET_VNET_HDR = 15
PACKET_IGNORE_OUTGOING = 23
SO_RCVBUFFORCE = 33
PACKET_MR_PROMISC = 1
TPACKET_V2 = 1
TPACKET_V3 = 2
ETH_P_ALL = 0x0003

TP_STATUS_KERNEL = 0
TP_STATUS_USER = 1 << 0
TP_STATUS_COPY = 1 << 1
TP_STATUS_LOSING = 1 << 2
TP_STATUS_CSUMNOTREADY = 1 << 3
TP_STATUS_VLAN_VALID = 1 << 4
TP_STATUS_VLAN_TPID_VALID = 1 << 6
TP_STATUS_CSUM_VALID = 1 << 7
TP_STATUS_GSO_TCP = 1 << 8
VNET_PASSED = TP_STATUS_CSUMNOTREADY | TP_STATUS_CSUM_VALID | TP_STATUS_GSO_TCP
"""Status bits a vnet socket's frame may carry and still be taken as is (its header says it)."""
COPY_MAX = 65536 + 512
"""The largest frame (vnet header included) read from the socket queue: IP's 64 KiB limit."""

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
_REQ2 = struct.Struct("=4I")
_FRAME2 = struct.Struct("=IIIHHIIHH")  # tpacket2_hdr up to tp_vlan_tpid
V2_MAC_OFFSET = 80
"""Where the kernel puts a frame's network header in a V2 slot (MAC header before it)."""
_VLAN = struct.Struct("!HH")

OnFrames = Callable[[list[Frame]], None]


def rx_slot_size(mtu: int) -> int:
    """The smallest power-of-two V2 slot, at least 2 KiB, holding a frame of this MTU."""
    need = V2_MAC_OFFSET + mtu + VLAN_HEADROOM
    size = 2048
    while size < need:
        size *= 2
    return size


@dataclass(frozen=True, slots=True)
class RingSpec:
    """Receive ring geometry: ``block_count`` blocks of ``block_size`` bytes."""

    block_size: int = 1 << 20
    block_count: int = 16
    retire_ms: int = 2
    """V3 only: a partly filled block is handed over after this long (the latency floor)."""
    version: int = 2
    """TPACKET_V2 (a slot per frame, woken per frame) or V3 (blocks, a retire timer)."""

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
        if self.version not in (2, 3):
            raise ConfigError(f"ring version {self.version}: must be 2 or 3 (TPACKET_V2/V3)")


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
    ring_losses_seen: int = 0
    """Frames that arrived flagged TP_STATUS_LOSING: the ring dropped frames just before."""
    ring_freezes: int = 0
    super_frames_in: int = 0
    """TCP GSO/GRO super-frames received whole (vnet only)."""
    super_frames_copied: int = 0
    """Frames too big for a slot, read whole from the socket queue (vnet only)."""
    csum_partial_in: int = 0
    """Frames passed on with their checksum left open (vnet: NEEDS_CSUM)."""
    super_frames_out: int = 0
    send_deferred: int = 0
    send_errors: int = 0
    send_oversize: int = 0
    send_overflow_dropped: int = 0
    socket_errors: int = 0
    reopens: int = 0


def _take(
    ring: memoryview, start: int, length: int, tp_status: int, tci: int, tpid: int,
    stats: PortStats, out: list[Frame],
) -> None:
    """Copy one frame out of the ring, undoing what the kernel did to it."""
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


def _usable(snaplen: int, length: int, tp_status: int, max_frame: int, stats: PortStats) -> bool:
    """False (counted) for a GSO super-frame (cut short by a V2 slot too) or a truncated frame."""
    if length > max_frame or tp_status & TP_STATUS_GSO_TCP:
        stats.gso_dropped += 1
        return False
    if snaplen < length:
        stats.truncated_dropped += 1
        return False
    return True


def parse_block(
    ring: memoryview, base: int, max_frame: int, stats: PortStats, out: list[Frame]
) -> bool:
    """Copy the frames of the V3 block at ``base`` into ``out``; False if the kernel owns it.

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
        if _usable(snaplen, length, tp_status, max_frame, stats):
            _take(ring, at + mac, length, tp_status, tci, tpid, stats, out)
        at += nxt
    return True


def parse_slots(
    ring: memoryview, head: int, slots: int, slot: int, max_frame: int, stats: PortStats,
    out: list[Frame], raw: mmap.mmap | None = None,
) -> int:
    """Copy every frame of the V2 slots the user owns from ``head`` on; the new head.

    Each slot is handed back (``TP_STATUS_KERNEL``) as soon as its frame is
    copied; at most ``slots`` frames per call, so one call never loops forever
    behind a fast sender.  ``raw`` is the ring's mmap, if any: slicing it
    copies a frame into a ``bytes`` in one step.  The common frame (whole, no
    tag, checksum done) is taken inline: this loop runs for every frame.
    """
    unpack, give_back, append = _FRAME2.unpack_from, _U32.pack_into, out.append
    taken = 0
    for _ in range(slots):
        at = head * slot
        tp_status, length, snaplen, mac, _net, _sec, _nsec, tci, tpid = unpack(ring, at)
        if not tp_status & TP_STATUS_USER:
            break
        if tp_status == TP_STATUS_USER and snaplen == length and length <= max_frame:
            start = at + mac
            append((raw[start : start + length] if raw is not None
                    else bytes(ring[start : start + length]), 0))
            taken += length
        else:
            if tp_status & TP_STATUS_LOSING:
                stats.ring_losses_seen += 1
            if _usable(snaplen, length, tp_status, max_frame, stats):
                _take(ring, at + mac, length, tp_status, tci, tpid, stats, out)
        give_back(ring, at, TP_STATUS_KERNEL)
        head = head + 1 if head + 1 < slots else 0
    stats.bytes_in += taken
    return head


def parse_slots_vnet(
    ring: memoryview, head: int, slots: int, slot: int, stats: PortStats, out: list[Frame],
    raw: mmap.mmap, recv: Callable[[], bytes | None],
) -> int:
    """:func:`parse_slots` for a vnet socket: frames as ``(virtio_net_hdr + frame, VNET_LEN)``.

    The kernel wrote each frame's header just before its MAC header.  A slot
    flagged ``TP_STATUS_COPY`` holds only the head of a frame too big for it:
    the whole frame is the next one on the socket queue (``recv``).
    """
    unpack, give_back, append = _FRAME2.unpack_from, _U32.pack_into, out.append
    taken = supers = partial = 0
    for _ in range(slots):
        at = head * slot
        tp_status, length, snaplen, mac, _net, _sec, _nsec, tci, tpid = unpack(ring, at)
        if not tp_status & TP_STATUS_USER:
            break
        start = at + mac
        if tp_status & TP_STATUS_CSUMNOTREADY:
            partial += 1
        if (tp_status & ~VNET_PASSED == TP_STATUS_USER and snaplen == length
                and ring[start - 9] & 0x7F in TCP_GSO):
            append((raw[start - VNET_LEN : start + length], VNET_LEN))
            taken += length
            if tp_status & TP_STATUS_GSO_TCP:
                supers += 1
        else:
            if tp_status & TP_STATUS_LOSING:
                stats.ring_losses_seen += 1
            data: bytes | None = None
            if tp_status & TP_STATUS_COPY:
                data = recv()
                if data is not None and len(data) != length + VNET_LEN:
                    stats.truncated_dropped += 1
                    data = None
                elif data is not None:
                    stats.super_frames_copied += 1
            elif snaplen < length:
                stats.truncated_dropped += 1
            else:
                data = raw[start - VNET_LEN : start + length]
            if data is not None:
                if data[1] & 0x7F not in TCP_GSO:
                    stats.gso_dropped += 1
                else:
                    if tp_status & TP_STATUS_GSO_TCP:
                        supers += 1
                    if tp_status & TP_STATUS_VLAN_VALID:
                        data = _with_tag(data, tp_status, tci, tpid)
                        stats.vlan_reinserted += 1
                    append((data, VNET_LEN))
                    taken += len(data) - VNET_LEN
        give_back(ring, at, TP_STATUS_KERNEL)
        head = head + 1 if head + 1 < slots else 0
    stats.bytes_in += taken
    stats.super_frames_in += supers
    stats.csum_partial_in += partial
    return head


def _with_tag(data: bytes, tp_status: int, tci: int, tpid: int) -> bytes:
    """A vnet frame with the VLAN tag the kernel stripped put back (its header moved by 4)."""
    if not tp_status & TP_STATUS_VLAN_TPID_VALID or not tpid:
        tpid = 0x8100
    mac = VNET_LEN + 12
    return (vnethdr.shifted(data[:VNET_LEN], 4) + data[VNET_LEN:mac]
            + _VLAN.pack(tpid, tci & 0xFFFF) + data[mac:])


def busy_poll(ports: Sequence[PacketPort], budget: float, limit: float) -> int:
    """Read the ports' rings without sleeping for ``budget`` seconds after the last frame.

    Why: a round trip through the bridge is three wake-ups of the proxy
    (request, the primary's answer, the secondary's), and waking a sleeping
    process costs tens of microseconds each, more on a virtual machine.  Right
    after a frame, the next one of the same exchange is usually microseconds
    away: looking at the rings for a short while catches it without sleeping.
    ``limit`` bounds the whole call so timers and QMP still run.  A look that
    finds nothing yields the CPU (``sched_yield``): on a loaded machine the
    answer we wait for often needs this very CPU (a guest, the client, their
    softirqs), and spinning would only delay it.  Returns the number of reads
    that found frames.
    """
    clock, pause = time.perf_counter, os.sched_yield
    start = last = clock()
    found = 0
    while True:
        now = clock()
        if now - last > budget or now - start > limit:
            return found
        idle = True
        for port in ports:
            if port.ready():
                port.read()
                found += 1
                idle = False
                last = clock()
        if idle:
            pause()


_VNET_WORKS: list[bool] = []


def vnet_supported() -> bool:
    """Whether this kernel gives a TPACKET_V2 receive ring and a TX ring virtio_net_hdrs.

    Asked once (a throwaway socket, no interface): where it fails, bridge mode
    falls back to needing offloads off.
    """
    if not _VNET_WORKS:
        try:
            with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0) as sock:
                sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V2)
                sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
                sock.setsockopt(SOL_PACKET, PACKET_COPY_THRESH, 1)
                page = mmap.PAGESIZE
                sock.setsockopt(SOL_PACKET, PACKET_RX_RING, _REQ2.pack(page, 2, 2048,
                                                                       page // 2048 * 2))
            _VNET_WORKS.append(True)
        except OSError as err:
            log.info("packet sockets here take no virtio_net_hdr with a ring (%s)", err)
            _VNET_WORKS.append(False)
    return _VNET_WORKS[0]


class PacketPort:
    """An interface the proxy reads whole batches from and writes frames to."""

    def __init__(
        self,
        name: str,
        ifname: str,
        on_frames: OnFrames | None,
        ring: RingSpec | None = None,
        max_pending: int = 64 * 1024 * 1024,
        vnet: bool = False,
        copy_buffer: int = 32 * 1024 * 1024,
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
        self._slot = 0
        self._slots = 0
        self.ifindex = 0
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
        self.vnet = vnet and self._ring_spec.version == 2
        """Frames carry their virtio_net_hdr (offloads accepted); V2 rings only."""
        self._copy_buffer = copy_buffer

    # ---- life cycle -------------------------------------------------------------------

    def open(self) -> None:
        """Create the socket and ring; ConfigError/TransportError say what is wrong."""
        spec = self._ring_spec
        spec.validate()
        if not self.ifname or len(self.ifname) > 15 or "/" in self.ifname:
            raise ConfigError(f"{self.name}: {self.ifname!r} is not a valid interface name")
        info = link_info(self.ifname)
        if info is None:
            raise ConfigError(f"{self.name}: no interface named {self.ifname!r}")
        self.ifindex, self.mtu = info.index, info.mtu
        try:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        except PermissionError as err:
            raise TransportError(
                f"{self.name}: opening a packet socket needs root or CAP_NET_RAW ({err})"
            ) from err
        try:
            self._setup(sock, info.index, spec)
        except OSError as err:
            sock.close()
            self._unmap()
            if self._tx is not None:
                self._tx.close()
                self._tx = None
            raise TransportError(f"{self.name}: cannot set up {self.ifname}: {err}") from err
        self._sock = sock
        if not info.up:
            log.warning("%s: interface %s is down: nothing will pass", self.name, self.ifname)
        layout = (f"{self._slots} slots of {self._slot} bytes (TPACKET_V2"
                  f"{', vnet_hdr: offloads accepted' if self.vnet else ''})" if spec.version == 2
                  else f"{spec.block_count} x {spec.block_size >> 10} KiB blocks, retire "
                       f"{spec.retire_ms} ms (TPACKET_V3)")
        log.info("%s: %s (index %d, mtu %d), ring %s", self.name, self.ifname, info.index,
                 self.mtu, layout)

    def _setup(self, sock: socket.socket, ifindex: int, spec: RingSpec) -> None:
        self._block = 0
        if spec.version == 2:
            self._slot = rx_slot_size(self.mtu)
            if spec.block_size % self._slot:
                raise ConfigError(f"{self.name}: ring block size {spec.block_size} is not a "
                                  f"multiple of the {self._slot}-byte slot MTU {self.mtu} needs")
            self._slots = spec.block_size // self._slot * spec.block_count
            sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V2)
            if self.vnet:  # before the ring: the kernel refuses it after
                sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
                sock.setsockopt(SOL_PACKET, PACKET_COPY_THRESH, 1)
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, self._copy_buffer)
            req = _REQ2.pack(spec.block_size, spec.block_count, self._slot, self._slots)
        else:
            frame_size = 2048
            sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V3)
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
        self._max_frame = self.mtu + 14 + VLAN_HEADROOM
        self._send_limit = self.mtu + 14
        self._tx = TxRing(self.ifname, self.mtu, vnet=self.vnet)

    def reopen(self) -> None:
        """Close and open again (the interface came back, was re-created or changed MTU).

        Counters carry on; output still queued for the old socket is counted
        as dropped, as at close.  Raises like :meth:`open`.
        """
        reading = self._reading
        self.close()
        self.open()
        self.stats.reopens += 1
        if reading:
            self.start()

    @property
    def is_open(self) -> bool:
        return self._sock is not None

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
        if spec.version == 2:
            head, losses = self._block, stats.ring_losses_seen
            if self.vnet and self._map is not None:
                self._block = parse_slots_vnet(view, head, self._slots, self._slot, stats,
                                               frames, self._map, self._recv_copy)
            else:
                self._block = parse_slots(view, head, self._slots, self._slot,
                                          self._max_frame, stats, frames, self._map)
            if self._block == head and not frames:
                self._socket_error()
            else:
                stats.blocks += 1
            if stats.ring_losses_seen != losses:
                # count the drops now: reading the counters clears the flag, so the next
                # flagged frame marks a new loss, and ring_drops tells the owner at once
                self._collect_ring_stats()
            self._after_read(frames, gso_before)
            return
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
        self._after_read(frames, gso_before)

    def _after_read(self, frames: list[Frame], gso_before: int) -> None:
        stats = self.stats
        if stats.gso_dropped != gso_before and not self._gso_logged and self.vnet:
            self._gso_logged = True
            log.error("%s: dropped a super-frame that is not TCP (UDP GSO) from %s: turn "
                      "tx-udp-segmentation off at its sender (counted as gso_dropped)",
                      self.name, self.ifname)
        elif stats.gso_dropped != gso_before and not self._gso_logged:
            self._gso_logged = True
            log.error(
                "%s: dropped a frame larger than %s's MTU (%d): segmentation offload is on "
                "at its sender; turn it off there and on this interface, e.g. "
                "`ethtool -K %s tso off gso off gro off` (counted as gso_dropped)",
                self.name, self.ifname, self.mtu, self.ifname,
            )
        if frames and self._on_frames is not None:
            stats.frames_in += len(frames)
            self._on_frames(frames)

    def _recv_copy(self) -> bytes | None:
        """The whole frame of a ``TP_STATUS_COPY`` slot, from the socket queue."""
        if self._sock is None:
            return None
        try:
            return self._sock.recv(COPY_MAX, socket.MSG_DONTWAIT)
        except OSError:
            self.stats.socket_errors += 1
            return None

    def ready(self) -> bool:
        """Whether a frame waits in the ring (V2: one memory read, no system call)."""
        view = self._view
        if view is None or self._ring_spec.version != 2 or not self._reading:
            return False
        return bool(_U32.unpack_from(view, self._block * self._slot)[0] & TP_STATUS_USER)

    def read(self) -> None:
        """Take what the ring holds now, as a wake-up would."""
        self._readable()

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
            log.error("%s: %s: %s (traffic passes again once it is back up; a re-created "
                      "interface is re-opened)", self.name, self.ifname, os.strerror(code))

    def _collect_ring_stats(self) -> None:
        """Add the kernel's counters (reading them resets them) to ours."""
        if self._sock is None:
            return
        try:
            raw = self._sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, _STATS3.size)
        except OSError:
            return
        packets, drops, freezes = _STATS3.unpack(raw.ljust(_STATS3.size, b"\0"))
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
        elif self.vnet:
            self._send_vnet(ring, frames)
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

    def _send_vnet(self, ring: TxRing, frames: Sequence[Frame]) -> None:
        """:meth:`send` with a virtio_net_hdr before each frame (its own, or zeros)."""
        stats, limit, slot_max = self.stats, self._send_limit, ring.max_data
        put, zero = ring.put, vnethdr.ZERO
        for index, (data, offset) in enumerate(frames):
            frame = data if offset == VNET_LEN else zero + (data[offset:] if offset else data)
            size = len(frame) - VNET_LEN
            if size > limit and not frame[1] and not (
                size <= limit + 4 and frame[VNET_LEN + 12 : VNET_LEN + 14] == b"\x81\x00"
            ):
                self._refuse(size)  # over the MTU and not a super-frame
                continue
            if size < 14:
                self._refuse(size)
                continue
            if len(frame) <= slot_max:
                if not put(frame):
                    self._queue(frames[index:])
                    return
            else:
                err = ring.send_big(frame)
                if err is not None:
                    if err.errno in RETRY_ERRNOS:
                        self._queue(frames[index:])
                        return
                    self._send_failed(err)
                    continue
                stats.super_frames_out += 1
            stats.frames_out += 1
            stats.bytes_out += size

    def _wire(self, data: bytes, offset: int) -> bytes:
        """A frame as this port's ring takes it (vnet: its header, or zeros, in front)."""
        bare = data[offset:] if offset else data
        if self.vnet:
            return data if offset == VNET_LEN else vnethdr.ZERO + bare
        return bare

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
            frame = self._wire(data, offset)
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
        while pending and self._put_queued(ring, pending[0]):
            frame = pending.popleft()
            self._pending_bytes -= len(frame)
            stats.frames_out += 1
            stats.bytes_out += len(frame)
        if not pending:
            self._overflowing = False
        self._kick(ring)

    def _put_queued(self, ring: TxRing, frame: bytes) -> bool:
        """One queued frame to the kernel; False when it must wait (ring full, pushback)."""
        if len(frame) <= ring.max_data:
            return ring.put(frame)
        err = ring.send_big(frame)
        if err is not None and err.errno in RETRY_ERRNOS:
            return False
        if err is not None:
            self._send_failed(err)  # dropped: it never will go (counted as a send error)
        else:
            self.stats.super_frames_out += 1
        return True

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
