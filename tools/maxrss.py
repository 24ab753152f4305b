#!/usr/bin/env python3
"""Run a command and write its peak resident set size to a file.

    python3 tools/maxrss.py --out FILE [--] CMD [ARG ...]

SIGTERM, SIGINT and SIGHUP received by this wrapper are forwarded to the
child, and the wrapper waits for it to exit.  FILE then gets one JSON object:
``ru_maxrss_kib`` is ``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`` (KiB on
Linux; the largest RSS of the waited-for child), plus the child's CPU seconds
and exit status.  The wrapper exits with the child's status (128 + N if the
child was killed by signal N).  On Linux the child gets SIGKILL if the wrapper
itself dies first (PR_SET_PDEATHSIG), so it is never left behind.

The harness's ``--qemu WRAPPER`` needs a single executable; tools/bench_vs_colo_compare.py
writes a two-line shell script that ``exec``s this file around qemu-system-x86_64.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import resource
import signal
import subprocess
import sys
from types import FrameType

PR_SET_PDEATHSIG = 1
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _die_with_parent() -> None:
    """preexec_fn: SIGKILL this child when the wrapper goes away."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def run(cmd: list[str], out: str) -> int:
    child: list[subprocess.Popen[bytes]] = []
    pending: list[int] = []

    def forward(signum: int, _frame: FrameType | None) -> None:
        if child:
            if child[0].poll() is None:
                child[0].send_signal(signum)
        else:
            pending.append(signum)

    for forwarded in FORWARDED:
        signal.signal(forwarded, forward)
    child.append(subprocess.Popen(cmd, preexec_fn=_die_with_parent))
    for signum in pending:
        child[0].send_signal(signum)
    rc = child[0].wait()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    record = {
        "ru_maxrss_kib": usage.ru_maxrss,
        "cpu_user_s": round(usage.ru_utime, 3),
        "cpu_system_s": round(usage.ru_stime, 3),
        "returncode": rc,
        "cmd": cmd[0],
    }
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f)
        f.write("\n")
    os.replace(tmp, out)
    return 128 - rc if rc < 0 else rc


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="where to write the JSON record")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="the command to run")
    args = p.parse_args()
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        p.error("no command given")
    return run(cmd, args.out)


if __name__ == "__main__":
    sys.exit(main())
