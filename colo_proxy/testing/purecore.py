"""Load the pure-Python core even where the compiled one is installed (benchmarks).

Call force_pure_core() before anything imports colo_proxy.core: from then
on its modules load from their .py files, so one checkout can measure both
builds side by side.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType


class _PreferSource(importlib.abc.MetaPathFinder):
    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if not fullname.startswith("colo_proxy.core."):
            return None
        name = fullname.rsplit(".", 1)[1]
        for folder in path or ():
            source = Path(folder) / f"{name}.py"
            if source.exists():
                return importlib.util.spec_from_file_location(fullname, source)
        return None


def force_pure_core() -> None:
    """Make later imports of colo_proxy.core.* use the .py files."""
    loaded = [m for m in sys.modules if m.startswith("colo_proxy.core.")]
    if loaded:
        raise RuntimeError(f"core modules already imported: {loaded}")
    sys.meta_path.insert(0, _PreferSource())
