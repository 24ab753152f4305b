"""The deciding modules stay sans-IO: no sockets, files, clocks or event loops."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import colo_proxy.disk as disk

SANS_IO = ["buffers.py", "extents.py", "nbd_proto.py", "qmp_proto.py", "gate.py"]
FORBIDDEN = {"os", "io", "socket", "asyncio", "select", "selectors", "time", "threading",
             "subprocess", "tempfile", "shutil", "pathlib", "fcntl", "mmap", "uvloop", "qemu"}


@pytest.mark.parametrize("name", SANS_IO)
def test_module_imports_no_io(name: str) -> None:
    tree = ast.parse((Path(disk.__file__).parent / name).read_text())
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
            if node.module.startswith("colo_proxy.disk."):
                assert node.module.rsplit(".", 1)[1] + ".py" in SANS_IO, node.module
    assert not imported & FORBIDDEN, imported & FORBIDDEN
