"""Load the pure-Python modules even where the compiled ones are installed (benchmarks).

Call force_pure_core() before anything imports a compiled module
(colo_proxy.core.COMPILED_MODULES): from then on they load from their .py
files, so one checkout can measure both builds side by side.
``python -m colo_proxy.testing.purecore ARGS`` is ``colo-proxy ARGS`` on the
pure build.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from colo_proxy.core import COMPILED_MODULES


class _PreferSource(importlib.abc.MetaPathFinder):
    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in COMPILED_MODULES:
            return None
        name = fullname.rsplit(".", 1)[1]
        for folder in path or ():
            source = Path(folder) / f"{name}.py"
            if source.exists():
                return importlib.util.spec_from_file_location(fullname, source)
        return None


def force_pure_core() -> None:
    """Make later imports of colo_proxy.core.* use the .py files."""
    loaded = [m for m in sys.modules if m in COMPILED_MODULES]
    if loaded:
        raise RuntimeError(f"compiled-build modules already imported: {loaded}")
    sys.meta_path.insert(0, _PreferSource())


if __name__ == "__main__":
    force_pure_core()
    from colo_proxy.cli import main

    sys.argv[0] = "colo-proxy"
    sys.exit(main())
