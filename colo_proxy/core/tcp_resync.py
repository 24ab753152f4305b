"""What a checkpoint did to the secondary, per TCP flow (see tcp.py's theory of operation).

After a checkpoint every held primary frame goes out and each flow takes
one of three answers: reset (the secondary is a copy of the primary at the
primary's position, a real COLO pair), continues (it goes on in its own
state: compare on at both sides' own offsets) or, in auto mode, undecided
until the secondary's next segment or bytes show which (decide_after_checkpoint,
continued_evidently); an undecided flow with no evidence of its own adopts
what other flows found (adopt_vote).  The flow's mode from the hybrid policy
is applied here too: mc and passthrough flows only follow positions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from colo_proxy.core.flows import MODE_COMPARE, MODE_MC, MODE_PASS, MODE_UNDECIDED, FlowHost
from colo_proxy.core.packet import TCP_SYN, TcpHeader
from colo_proxy.core.seq import unwrap
from colo_proxy.core.tcpside import MIDSTREAM_FIT, NO_STASH, NO_TIMES, TcpSide

if TYPE_CHECKING:
    from colo_proxy.core.tcp import TcpFlow


def decide_after_checkpoint(flow: TcpFlow, host: FlowHost, hdr: TcpHeader, now: float) -> None:
    """The secondary's first segment since the checkpoint: did the checkpoint reset it?

    Reset: it resumed at the primary's position, in the primary's sequence
    space.  Continues: it goes on at its own position in its own space, or
    sends its own SYN.  Whichever position the sequence number lies nearer
    decides (ties: reset, as on a real COLO pair, where both coincide).
    """
    s, p = flow.sec, flow.pri
    reset = abs(unwrap(hdr.seq - p.isn - 1, flow.ck_pos) - flow.ck_pos)
    if hdr.flags & TCP_SYN:
        own = -1
    elif s.isn >= 0:
        own_pos = max(s.high, s.stream.end)
        own = abs(unwrap(hdr.seq - s.isn - 1, own_pos) - own_pos)
    else:
        own = MIDSTREAM_FIT
    if reset == own:  # both answers put it at the same place: nothing learnt for others
        reset_to_primary(flow)
        return
    decided(flow, host, now, "reset" if reset < own else "continues")


def decided(flow: TcpFlow, host: FlowHost, now: float, answer: str) -> None:
    """Apply the answer for this flow; other undecided flows may adopt it (adopt_vote)."""
    host.secondary_vote = answer
    if answer == "reset":
        host.count("tcp_secondary_reset_by_checkpoint")
        reset_to_primary(flow)
    else:
        host.count("tcp_secondary_continues_after_checkpoint")
        continue_own(flow, host, now)


def adopt_vote(flow: TcpFlow, host: FlowHost, now: float) -> None:
    """Undecided with no evidence of its own: take the answer other flows found.

    A checkpoint is one event for the whole VM, so what the flows that did
    hear from the secondary found holds for one that did not (one whose
    secondary had sent everything before the checkpoint).
    """
    if flow.mode == MODE_UNDECIDED and host.secondary_vote is not None:
        host.count("tcp_secondary_answer_adopted")
        decided(flow, host, now, host.secondary_vote)


def continued_evidently(flow: TcpFlow, host: FlowHost, now: float) -> bool:
    """Undecided, but the primary's new output equals what the secondary sent on its own.

    A secondary that ran ahead may have sent all its output before the
    checkpoint, so no later segment of its own can decide.  If the bytes
    the primary sent since the checkpoint (past ck_pos) equal the
    secondary's at its own offsets, or a FIN the primary sent since then
    sits where the secondary's does, it went on.  Bytes from before the
    checkpoint prove nothing: a reset secondary sent them too.
    """
    if flow.mode != MODE_UNDECIDED:
        return False
    p, s = flow.pri, flow.sec
    pb, sb = p.stream.buf, s.stream.buf
    i = max(0, flow.ck_pos - p.stream.base)
    k = min(len(pb), len(sb), i + 64) - i
    agrees = k > 0 and pb[i : i + k] == sb[i : i + k] and (k >= 8 or s.fin is not None)
    fin = not flow.ck_fin and p.fin is not None and p.fin == s.fin
    if not agrees and not fin:
        return False
    decided(flow, host, now, "continues")
    return False  # _continue ran progress


def release_all(flow: TcpFlow, host: FlowHost) -> None:
    """Everything queued goes out, in order (a checkpoint covers it); its waits are counted."""
    if flow.queue:
        run = flow.queue[flow.qh:]
        flow.queue, flow.qh = [], 0
        for e in run:
            host.waited(flow, e.time, 1)
        host.release_run(flow, run)


def after_checkpoint(flow: TcpFlow, host: FlowHost, now: float, grace: float, mode: str) -> None:
    """After a checkpoint: release everything held, then reset, continue or decide later."""
    release_all(flow, host)
    flow.q_ooo = False
    p, s = flow.pri, flow.sec
    flow.ck_pos = max(p.high, p.stream.end, p.stream.base)
    flow.ck_ack = p.ack_max
    flow.ck_fin = p.fin is not None
    target = host.flow_mode(flow, now)
    if target >= MODE_MC:  # not compared from now: positions are followed
        flow.mode = target
        flow.diverged = False
        flow.mc_gap = True
        flow.sec_times, flow.th = NO_TIMES, 0
        flow.stash, flow.stash_bytes = NO_STASH, 0
        return
    if flow.mode == MODE_PASS:
        return
    if flow.mode >= MODE_MC:
        flow.mode = MODE_COMPARE
        host.count("tcp_flows_back_to_compare")
    if flow.mc_gap:
        close_gap(flow, mode)
    if mode != "reset" and p.stream.buffered > host.max_sec_buffer:
        forget_uncompared(flow, host)
    if mode == "reset":
        reset_to_primary(flow)
    elif mode == "continues" or p.isn < 0:
        continue_own(flow, host, now)
    elif (
        not flow.diverged and s.isn == p.isn and s.stream.end == flow.ck_pos
        and not s.stream.ooo and not flow.sec_times
    ):
        reset_to_primary(flow)  # in step: both answers are the same
    else:
        flow.mode = MODE_UNDECIDED
        flow.diverged = False  # frozen by the mode now, not by the divergence
        flow.progress(host, now)  # what both sides sent already may show it went on


def close_gap(flow: TcpFlow, mode: str) -> None:
    """Output went by uncompared: compare on from where both sides are now.

    A reset secondary starts at ck_pos anyway; one that went on is compared
    from the furthest position either side reached (offsets correspond).
    """
    flow.mc_gap = False
    flow.skipping = False
    flow.mask_ctx = b""
    if mode == "reset":
        return
    p, s = flow.pri, flow.sec
    pos = max(flow.ck_pos, s.high, s.stream.end)
    p.stream.skip_to(pos)
    s.stream.skip_to(pos)
    flow.sec_times, flow.th = NO_TIMES, 0


def forget_uncompared(flow: TcpFlow, host: FlowHost) -> None:
    """The primary ran far ahead of a silent secondary: compare on from ck_pos only.

    Its bytes were released by the checkpoint; keeping them for a secondary
    that may never send its copy would grow without bound.
    """
    p, s = flow.pri, flow.sec
    host.count("tcp_bytes_left_uncompared_over_limit", flow.ck_pos - p.stream.base)
    p.stream.skip_to(flow.ck_pos)
    s.stream.skip_to(flow.ck_pos)
    flow.skipping = False
    flow._trim_times(flow.ck_pos)


def reset_to_primary(flow: TcpFlow) -> None:
    """The checkpoint made the secondary a copy of the primary (at ck_pos)."""
    flow.mode = MODE_COMPARE
    flow.diverged = flow.skipping = flow.close_div = False
    flow.sec_times, flow.th = NO_TIMES, 0
    flow.space_ok = True
    flow.stash, flow.stash_bytes = NO_STASH, 0
    p = flow.pri
    if p.isn < 0:
        flow.sec = TcpSide()
        return
    pos = flow.ck_pos
    p.stream.skip_to(pos)  # bytes since the checkpoint stay, to compare
    s = flow.sec
    s.isn, s.peer_isn = p.isn, p.peer_isn
    s.ack_max, s.high = flow.ck_ack, pos
    s.fin = p.fin if p.fin is not None and p.fin <= pos else None
    s.rst = p.rst if p.rst is not None and p.rst <= pos else None
    s.syn_opts = p.syn_opts
    s.stream.reset(pos)
    if p.syn_opts is not None:
        flow.hs_ok = True


def continue_own(flow: TcpFlow, host: FlowHost, now: float) -> None:
    """The secondary went on in its own state: compare on from where both are."""
    flow.diverged = False
    if flow.close_div:
        flow.mode = MODE_PASS  # the two connections closed differently: nothing to compare
        host.count("tcp_flows_passed_after_close_divergence")
        release_all(flow, host)
        return
    flow.mode = MODE_COMPARE
    if flow.pri.syn_opts is not None and flow.sec.syn_opts is not None:
        flow.hs_ok = True  # a handshake difference was reported once
    flow.progress(host, now)
