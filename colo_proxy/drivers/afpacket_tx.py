"""A PACKET_TX_RING (TPACKET_V2) for one interface: many frames, one send() per batch.

Why: one ``send()`` per frame costs a system call each, the largest single
cost of bridge mode.  With a mapped transmit ring the frames of a batch are
copied into free slots and one empty ``send(MSG_DONTWAIT)`` hands them all
to the kernel.

Slots cycle through ``AVAILABLE`` (ours) -> ``SEND_REQUEST`` (we filled it)
-> ``SENDING`` -> ``AVAILABLE`` (the kernel freed the skb).  The kernel
walks slots in ring order from where it stopped, as we fill them, so both
sides stay in step.  A send the device refuses (``ENOBUFS``: a full veth or
queue; ``EAGAIN``: socket memory) leaves the slot at ``SEND_REQUEST``: the
next kick retries it, so the ring itself is the retry buffer.
``PACKET_LOSS`` makes the kernel skip a malformed slot instead of stopping
the whole ring on it; oversized and runt frames are refused before they
reach the ring and counted by the caller.

The socket is separate from the receive socket (a socket has one TPACKET
version, and this one never receives: protocol 0).

With ``vnet=True`` (``PACKET_VNET_HDR``) every slot starts with a 10-byte
``virtio_net_hdr`` (:mod:`.vnet`): a frame whose checksum the sender left
to the hardware, or a GSO super-frame, goes out with its flags and the
kernel (or the receiving veth/tap) finishes it.  Slots stay sized for the
MTU; a frame too big for a slot (a super-frame) is sent whole by
:meth:`TxRing.send_big` on a second socket, after the ring was emptied,
so the interface still gets frames in the order they were put.
"""

from __future__ import annotations

import errno
import mmap
import socket
import struct

SOL_PACKET = 263
PACKET_LOSS = 14
PACKET_TX_RING = 13
PACKET_VERSION = 10
PACKET_VNET_HDR = 15
TPACKET_V2 = 1
VNET_LEN = 10
"""sizeof(struct virtio_net_hdr): the prefix of every frame on a vnet socket."""

TP_STATUS_AVAILABLE = 0
TP_STATUS_SEND_REQUEST = 1
TP_STATUS_WRONG_FORMAT = 4

DATA_OFFSET = 32
"""Where frame data starts in a slot: TPACKET2_HDRLEN - sizeof(sockaddr_ll)."""

_REQ = struct.Struct("=4I")
_U32 = struct.Struct("=I")
_STATUS_LEN = struct.Struct("=II")  # tp_status, tp_len
RETRY_ERRNOS = frozenset((errno.EAGAIN, errno.ENOBUFS, errno.EINTR))


def slot_size(mtu: int, vnet: bool = False) -> int:
    """The smallest power-of-two slot, at least 2 KiB, holding a frame of this MTU."""
    need = DATA_OFFSET + mtu + 14 + 8 + (VNET_LEN if vnet else 0)
    size = 2048
    while size < need:
        size *= 2
    return size


class TxRing:
    """The mapped transmit ring of one interface."""

    def __init__(
        self, ifname: str, mtu: int, ring_bytes: int = 4 << 20, vnet: bool = False
    ) -> None:
        self.vnet = vnet
        self.slot = slot_size(mtu, vnet)
        block = max(self.slot, 1 << 16)
        blocks = max(1, ring_bytes // block)
        self.slots = blocks * block // self.slot
        self.max_data = self.slot - DATA_OFFSET
        self.wrong_format = 0
        self._head = 0
        self._big: socket.socket | None = None
        self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        try:
            if vnet:
                self._sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
                self._big = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
                self._big.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
                self._big.bind((ifname, 0))
            self._sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V2)
            self._sock.setsockopt(SOL_PACKET, PACKET_LOSS, 1)
            self._sock.setsockopt(
                SOL_PACKET, PACKET_TX_RING, _REQ.pack(block, blocks, self.slot, self.slots)
            )
            self._map = mmap.mmap(self._sock.fileno(), block * blocks, mmap.MAP_SHARED,
                                  mmap.PROT_READ | mmap.PROT_WRITE)
            self._sock.bind((ifname, 0))
        except OSError:
            self._sock.close()
            if self._big is not None:
                self._big.close()
            raise
        self._view = memoryview(self._map)

    def put(self, frame: bytes) -> bool:
        """Copy a frame into the next slot; False when the ring is full (slot not ours yet)."""
        view, at = self._view, self._head * self.slot
        status = _U32.unpack_from(view, at)[0]
        if status != TP_STATUS_AVAILABLE:
            if status != TP_STATUS_WRONG_FORMAT:
                return False
            self.wrong_format += 1
        end = at + DATA_OFFSET + len(frame)
        view[at + DATA_OFFSET : end] = frame
        # status and length at once: the kernel looks at the slot only at the next send()
        _STATUS_LEN.pack_into(view, at, TP_STATUS_SEND_REQUEST, len(frame))
        self._head = (self._head + 1) % self.slots
        return True

    def kick(self) -> OSError | None:
        """Ask the kernel to send every filled slot; the error if it stopped early."""
        try:
            self._sock.send(b"", socket.MSG_DONTWAIT)
        except OSError as err:
            return err
        return None

    def send_big(self, frame: bytes) -> OSError | None:
        """Send one frame too big for a slot (vnet: header included) after the ring's.

        The ring is kicked first and must be empty afterwards: otherwise the
        big frame would overtake frames put before it.  Returns the error
        (``EAGAIN`` when the ring still holds frames): the caller keeps it.
        """
        err = self.kick()
        if err is not None:
            return err
        if self.busy() or self._big is None:
            return OSError(errno.EAGAIN, "ring not empty yet")
        try:
            self._big.send(frame, socket.MSG_DONTWAIT)
        except OSError as big_err:
            return big_err
        return None

    def busy(self) -> bool:
        """Whether a filled slot still waits for the kernel (a kick is owed)."""
        before = (self._head - 1) % self.slots * self.slot
        return bool(_U32.unpack_from(self._view, before)[0] & TP_STATUS_SEND_REQUEST)

    def unsent(self) -> int:
        """Filled slots the kernel has not taken yet (a scan: for shutdown and stats)."""
        view, unpack = self._view, _U32.unpack_from
        return sum(
            1 for at in range(0, self.slots * self.slot, self.slot)
            if unpack(view, at)[0] == TP_STATUS_SEND_REQUEST
        )

    def close(self) -> None:
        """Unmap and close (frames not yet sent are lost; the caller counts them first)."""
        self._view.release()
        self._map.close()
        self._sock.close()
        if self._big is not None:
            self._big.close()
