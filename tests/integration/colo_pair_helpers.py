"""The real COLO pair for tests: skip (or, in CI, fail) when its parts are missing.

The pair itself is ``tools/colo_pair.py``; the patched QEMU comes from
``tools/build_colo_qemu.sh`` (``COLO_QEMU``) and the guest from
``tools/colo_guest.sh`` (``COLO_GUEST_DIR``).
"""

from __future__ import annotations

import os
import shutil
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

import pytest

from tests.tools_loader import load_tool

cp: ModuleType = load_tool("colo_pair")


def missing() -> str | None:
    """Why the real pair cannot run here, or None."""
    if os.geteuid() != 0:
        return "the COLO pair needs root (network namespace, taps)"
    if shutil.which("ip") is None:
        return "iproute2 (ip) not installed"
    if cp.colo_qemu() is None:
        return ("no COLO-capable QEMU: run tools/build_colo_qemu.sh and set COLO_QEMU "
                f"(looked at {os.environ.get('COLO_QEMU') or cp.DEFAULT_QEMU})")
    if cp.guest_dir() is None:
        return "no guest kernel/initramfs: run tools/colo_guest.sh (or set COLO_GUEST_DIR)"
    return None


def require_pair() -> None:
    """Skip with the reason; in CI (CI=true) the pair must run, so fail instead."""
    reason = missing()
    if reason is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI must run the COLO pair tests: {reason}")
    pytest.skip(reason)


@contextmanager
def running_pair(**opts: Any) -> Iterator[Any]:
    """A started pair with a booted guest; always stopped and removed."""
    require_pair()
    # pure COLO: these tests show the loop (a divergence makes a checkpoint); the hybrid
    # policy would move the guest's service to mc after a few, and the VM to MC periods
    opts.setdefault("proxy_extra", ["--policy", "colo"])
    pair = cp.ColoPair(cp.PairOptions(cp.colo_qemu(), cp.guest_dir(), **opts))
    keep = False
    try:
        pair.start()
        pair.wait_guest(180)
        yield pair
    except BaseException:
        print_tail(pair)
        keep = os.environ.get("COLO_PAIR_KEEP") == "1"
        raise
    finally:
        pair.stop()
        if keep:  # for a post-mortem: logs, consoles, images
            print(f"COLO_PAIR_KEEP: left {pair.w}")
        else:
            pair.cleanup()


def print_tail(pair: Any) -> None:
    """On failure, the end of every log (pytest shows it)."""
    for name in ("proxy", "primary", "secondary", "agent"):
        print(f"---- {name}.log ----\n{pair.log(name)[-3000:]}")
    print(f"---- primary console ----\n{pair.console('primary')[-1500:]}")


def checkpoint_figures(events: list[dict[str, Any]]) -> dict[str, float]:
    """Checkpoints (STOP -> RESUME pairs, QEMU's own timestamps) and their durations."""
    durations = []
    stop_t = None
    for ev in events:
        if ev["event"] == "STOP":
            stop_t = ev["t"]
        elif ev["event"] == "RESUME" and stop_t is not None:
            durations.append(ev["t"] - stop_t)
            stop_t = None
    if not durations:
        return {"checkpoints": 0}
    return {
        "checkpoints": len(durations),
        "duration_median_ms": round(statistics.median(durations) * 1000, 1),
        "duration_max_ms": round(max(durations) * 1000, 1),
    }


def image_records(path: str) -> dict[int, int]:
    """Sector -> record number, for every sector 1.. the guest's disk writer filled."""
    out = {}
    with open(path, "rb") as f:
        f.seek(512)
        sector = 1
        while data := f.read(512):
            if data.startswith(b"record "):
                out[sector] = int(data[7:15])
            sector += 1
    return out


def record_holes(records: dict[int, int]) -> list[int]:
    """Records missing below the newest: writes the guest made that the disk lost."""
    if not records:
        return []
    assert all(sector == n for sector, n in records.items()), "records in the wrong sectors"
    return sorted(set(range(1, max(records.values()) + 1)) - set(records.values()))


VIRTIO_FIX = "0004-virtio-loaded-device-is-enabled-unless-stream-says-so.patch"


def qemu_has_virtio_fix() -> bool:
    """Whether the QEMU in use was built with tools/patches/0004 (its build stamp says)."""
    qemu = cp.colo_qemu()
    if qemu is None:
        return False
    stamp = os.path.join(os.path.dirname(os.path.dirname(qemu)), "stamp")
    try:
        with open(stamp) as f:
            return VIRTIO_FIX in f.read()
    except OSError:
        return False


def stuck_nic(pair: Any, role: str = "secondary") -> str | None:
    """Evidence that QEMU stopped serving the VM's virtio-net queues, or None.

    Seen on this pair in about 4 of 10 takeovers before tools/patches/0004: the
    guest keeps queueing TX buffers (its avail index moves) while QEMU's
    last-avail index stays put, because the device was left *disabled* by a
    checkpoint (``x-query-virtio-status`` says so): a COLO secondary whose guest
    had bus mastering off at a checkpoint kept the flag, as the migration
    stream only ever sets it.
    """
    mon = pair.mons[role]
    nets = [d["path"] for d in mon.cmd("x-query-virtio") if d["name"] == "virtio-net"]
    if not nets:
        return None

    def tx() -> dict[str, Any]:
        st: dict[str, Any] = mon.cmd("x-query-virtio-queue-status", path=nets[0], queue=1)
        return st

    first = tx()
    time.sleep(3)
    later = tx()
    if (later["last-avail-idx"] == first["last-avail-idx"]
            and later["shadow-avail-idx"] > later["last-avail-idx"]):
        disabled = mon.cmd("x-query-virtio-status", path=nets[0]).get("disabled")
        return (f"{role} virtio-net TX queue not served: QEMU last-avail-idx "
                f"{later['last-avail-idx']}, guest avail-idx {later['shadow-avail-idx']}, "
                f"device disabled: {disabled}")
    return None


def broken_nic(pair: Any, role: str) -> str | None:
    """Evidence that QEMU marked the VM's virtio-net *broken* (``virtio_error()``), or None.

    Seen once in 34 link-off takeovers on this pair: the new primary's QEMU logged
    "virtio: zero sized buffers are not allowed" and "Guest moved used index from 256
    to 0" (its last-avail index and the ring in guest memory disagree); a broken device
    serves no queue, so the new primary sent nothing.  Not investigated to its cause.
    """
    mon = pair.mons[role]
    nets = [d["path"] for d in mon.cmd("x-query-virtio") if d["name"] == "virtio-net"]
    if not nets or not mon.cmd("x-query-virtio-status", path=nets[0]).get("broken"):
        return None
    said = [x for x in pair.log(role).splitlines() if "virtio" in x or "index" in x]
    return f"{role} virtio-net marked broken by QEMU; its log: {said[-4:]}"
