"""The sans-IO comparison core (compiled with mypyc when the build could; see setup.py)."""

from __future__ import annotations

import importlib
import importlib.machinery

_CORE = (
    "checkpoint", "checksum", "config", "datagram", "events", "fastparse", "flows", "flowtable",
    "fragments", "framing", "general", "heartbeat", "held", "ledger", "masks", "packet", "policy",
    "proxy", "reassembly", "rewrite", "rules", "seq", "tcp", "tcp_resync", "tcp_uncompared",
    "tcpside", "verdicts", "xen_notify",
)

COMPILED_MODULES = (
    *(f"{__name__}.{name}" for name in _CORE),
    "colo_proxy.drivers.endpoints",
    "colo_proxy.drivers.qemu_socket",
    "colo_proxy.runtime.framepath",
)
"""The modules setup.py compiles (keep in step with its COMPILED list): every core module,
the chardev drivers of `colo-proxy run` and the hosts' per-read path."""


def compiled_modules() -> dict[str, bool]:
    """For each compiled-build module: whether the loaded copy is a compiled extension."""
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    out = {}
    for name in COMPILED_MODULES:
        module = importlib.import_module(name)
        out[name] = str(getattr(module, "__file__", "")).endswith(suffixes)
    return out


def build_kind() -> str:
    """"compiled" (every listed module is an extension), "pure", or "mixed"."""
    loaded = set(compiled_modules().values())
    if loaded == {True}:
        return "compiled"
    return "pure" if loaded == {False} else "mixed"
