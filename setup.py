"""Build hook: compile the typed core (and run's chardev path) with mypyc when it can, else pure.

The same .py files either way (as black and mypy ship).  COLO_PROXY_PURE=1, a
missing C compiler or a missing mypyc gives the pure build, which passes every
test too.  Metadata lives in pyproject.toml.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
import sysconfig
from pathlib import Path

from setuptools import setup

COMPILED = [
    "colo_proxy/core/checkpoint.py",
    "colo_proxy/core/checksum.py",
    "colo_proxy/core/config.py",
    "colo_proxy/core/datagram.py",
    "colo_proxy/core/events.py",
    "colo_proxy/core/fastparse.py",
    "colo_proxy/core/flows.py",
    "colo_proxy/core/flowtable.py",
    "colo_proxy/core/fragments.py",
    "colo_proxy/core/general.py",
    "colo_proxy/core/framing.py",
    "colo_proxy/core/heartbeat.py",
    "colo_proxy/core/held.py",
    "colo_proxy/core/ledger.py",
    "colo_proxy/core/masks.py",
    "colo_proxy/core/packet.py",
    "colo_proxy/core/policy.py",
    "colo_proxy/core/proxy.py",
    "colo_proxy/core/reassembly.py",
    "colo_proxy/core/rewrite.py",
    "colo_proxy/core/rules.py",
    "colo_proxy/core/seq.py",
    "colo_proxy/core/tcp.py",
    "colo_proxy/core/tcp_resync.py",
    "colo_proxy/core/tcp_uncompared.py",
    "colo_proxy/core/tcpside.py",
    "colo_proxy/core/verdicts.py",
    "colo_proxy/core/xen_notify.py",
    # the chardev path of `colo-proxy run` around the core: endpoints, channels, record codec
    "colo_proxy/drivers/endpoints.py",
    "colo_proxy/drivers/qemu_socket.py",
    # the per-read path of the live hosts around the core (feed, drain, send, timer)
    "colo_proxy/runtime/framepath.py",
]
"""The modules mypyc compiles (listed, so a new module is a decision, not an accident;
keep colo_proxy.core.COMPILED_MODULES in step).  Not the runtime hosts: CoreHost and
Supervisor are subclassed by interpreted classes (Bridge, FailoverSupervisor), which
a compiled class forbids; their per-read work lives in runtime/framepath.py, compiled."""


def _why_pure() -> str | None:
    if os.environ.get("COLO_PROXY_PURE", "") not in ("", "0"):
        return "COLO_PROXY_PURE is set"
    if "sdist" in sys.argv:
        return "source distribution"
    if ("editable_wheel" in sys.argv or "develop" in sys.argv) and not os.environ.get(
        "COLO_PROXY_COMPILE"
    ):
        return "editable install (COLO_PROXY_COMPILE=1 compiles in place)"
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    if shutil.which(shlex.split(cc)[0]) is None:
        return f"no C compiler ({cc})"
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not headers.exists():
        return f"no Python headers ({headers}: install python3-dev)"
    try:
        import mypyc.build  # noqa: F401
    except ImportError:
        return "mypyc is not installed"
    return None


def _ext_modules() -> list[object]:
    why = _why_pure()
    if why is not None:
        print(f"colo-proxy: pure Python build ({why})", file=sys.stderr)
        return []
    from mypyc.build import mypycify

    here = Path(__file__).parent
    missing = [m for m in COMPILED if not (here / m).exists()]
    if missing:
        raise SystemExit(f"setup.py: modules to compile are missing: {missing}")
    print("colo-proxy: compiling the core with mypyc", file=sys.stderr)
    return list(mypycify(COMPILED, opt_level="3", debug_level="0"))


setup(ext_modules=_ext_modules())
