"""Which frames of a capture did the guest send?

tcpdump on a tap device records both directions.  The proxy compares only
guest output; client frames are input.  `--guest` names the guest by IP or
MAC; without it we infer the guest when the capture leaves no doubt.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable

from colo_proxy.core.packet import IpPacket, parse_ip
from colo_proxy.errors import ConfigError, InputError

_U16 = struct.Struct("!H")


def parse_guest(text: str) -> bytes:
    """An IPv4/IPv6 address or a MAC address, as raw bytes (4, 16 or 6 long)."""
    try:
        return ipaddress.ip_address(text).packed
    except ValueError:
        pass
    parts = text.replace("-", ":").split(":")
    if len(parts) == 6 and all(len(p) == 2 for p in parts):
        try:
            return bytes(int(p, 16) for p in parts)
        except ValueError:
            pass
    raise ConfigError(f"--guest: {text!r} is neither an IP nor a MAC address")


class GuestFilter:
    """Tells guest output from client input, by address."""

    def __init__(self, guest: bytes | None) -> None:
        self.guest = guest
        self._macs: set[bytes] = set()
        if guest is not None and len(guest) == 6:
            self._macs.add(guest)

    def is_guest(self, frame: bytes) -> bool:
        """True when the guest sent this frame (always True without a guest set)."""
        guest = self.guest
        if guest is None:
            return True
        src_mac = frame[6:12]
        if len(guest) == 6:
            return src_mac == guest
        ip = parse_ip(frame, 0)
        if isinstance(ip, IpPacket):
            if ip.src == guest:
                self._macs.add(src_mac)
                return True
            return False
        return src_mac in self._macs


def infer_guest(frames: Iterable[bytes], limit: int = 5000) -> bytes | None:
    """The guest's IP if the capture shows it unambiguously, else None.

    One source address: a guest-only capture, no filtering needed (None).
    Several: the single address that sends TCP SYN-ACKs is the guest (a
    server VM).  Otherwise the operator must say.
    """
    sources: set[bytes] = set()
    synack_senders: set[bytes] = set()
    for n, frame in enumerate(frames):
        if n >= limit:
            break
        ip = parse_ip(frame, 0)
        if not isinstance(ip, IpPacket):
            continue
        sources.add(ip.src)
        if ip.proto == 6 and ip.frag_id < 0 and ip.l4_end - ip.l4 >= 14:
            flags = frame[ip.l4 + 13]
            if flags & 0x12 == 0x12:
                synack_senders.add(ip.src)
    if len(sources) <= 1:
        return None
    if len(synack_senders) == 1:
        return next(iter(synack_senders))
    names = ", ".join(sorted(str(ipaddress.ip_address(s)) for s in sources)[:6])
    raise InputError(f"the capture holds frames from several hosts ({names}); pass --guest ADDR")
