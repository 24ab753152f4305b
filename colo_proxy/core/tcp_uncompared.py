"""TCP flows not compared now: mc (held until the next checkpoint) or passthrough.

Also the check that moves a TLS or SSH connection there from its first
bytes.  Positions are still followed on both sides, so a flow can compare
again after a checkpoint (tcp_resync.close_gap).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from colo_proxy.core.flows import MODE_COMPARE, MODE_PASSTHROUGH, FlowHost, Rel
from colo_proxy.core.held import NEED_NONE, HeldFrame
from colo_proxy.core.packet import TCP_FIN, TCP_RST, TCP_SYN, TcpHeader
from colo_proxy.core.policy import encrypted_kind
from colo_proxy.core.tcpside import TcpSide

if TYPE_CHECKING:
    from colo_proxy.core.tcp import TcpFlow


def sniff(flow: TcpFlow, host: FlowHost, head: bytes, now: float) -> None:
    """The primary's first payload: a TLS or SSH connection can never match."""
    flow.sniff = False
    what = encrypted_kind(head)
    if what is not None:
        mode = host.encrypted(flow, what, now)
        if mode != MODE_COMPARE:
            flow.mode = mode
            flow.mc_gap = True


def follow(me: TcpSide, flags: int, stop: int) -> None:
    """A side's position and close, kept though its bytes are not compared."""
    if stop > me.high:
        me.high = stop
    if flags & TCP_FIN and me.fin is None:
        me.fin = stop
    if flags & TCP_RST and me.rst is None:
        me.rst = stop


def primary_uncompared(
    flow: TcpFlow, host: FlowHost, hdr: TcpHeader, data: bytes, end: int, rel: Rel, flen: int,
    now: float,
) -> None:
    """mc (held until the next checkpoint) or passthrough (released now), uncompared.

    The positions are still followed, so the flow can compare again after a
    checkpoint (the secondary then starts from the primary's position).
    """
    flags = hdr.flags
    me = flow.side_of(host, hdr, True)
    off = flow.learn(me, flow.sec, hdr, data)
    plen = end - hdr.payload
    stop = off + plen
    follow(me, flags, stop)
    if flags & (TCP_FIN | TCP_RST):
        flow.closed = True
    ack = flow.ack_offset(me, hdr)
    flow.mc_gap = True
    if flow.mode == MODE_PASSTHROUGH:
        host.count("frames_passthrough")
        host.release_unheld(rel)
        return
    host.count("frames_held_mc")
    flow.queue.append(HeldFrame(stop, ack, NEED_NONE, rel, now, off, plen, flen))
    host.hold(flow, flen)


def secondary_uncompared(
    flow: TcpFlow, host: FlowHost, hdr: TcpHeader, data: bytes, end: int
) -> None:
    """The secondary's segment of a flow not compared now: positions only, then dropped."""
    flags = hdr.flags
    host.count("secondary_frames_dropped_uncompared_mode")
    me = flow.side_of(host, hdr, False)
    if not flags & TCP_SYN and not flow.space_ok:
        if me.isn < 0 or flow.pri.isn < 0:
            return
        flow._decide_space(host, hdr.seq)
    off = flow.learn(me, flow.pri, hdr, data)
    flow.ack_offset(me, hdr)
    follow(me, flags, off + end - hdr.payload)
    flow.mc_gap = True
