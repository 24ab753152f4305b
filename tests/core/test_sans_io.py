"""The core stays sans-IO: it imports nothing that touches sockets, files or clocks."""

from __future__ import annotations

import ast
from pathlib import Path

CORE = Path(__file__).resolve().parents[2] / "colo_proxy" / "core"
FORBIDDEN = {
    "asyncio", "socket", "select", "selectors", "time", "os", "io", "subprocess", "threading",
    "uvloop", "dpkt", "scapy", "pyroute2", "qemu", "random", "datetime", "logging", "pathlib",
}


def test_core_imports_no_io_or_clock_modules() -> None:
    offenders = []
    for path in sorted(CORE.glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                if name.split(".")[0] in FORBIDDEN:
                    offenders.append(f"{path.name}: {name}")
    assert offenders == []
    assert len(list(CORE.glob("*.py"))) >= 8
