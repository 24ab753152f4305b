"""Which core is loaded: the compiled build must really be the compiled one.

CI sets COLO_PROXY_EXPECT_COMPILED=1 after building the core with mypyc, and
COLO_PROXY_EXPECT_COMPILED=0 for its pure run; unset, either build passes.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from colo_proxy import __version__
from colo_proxy.cli import main
from colo_proxy.core import COMPILED_MODULES, build_kind, compiled_modules

ROOT = Path(__file__).resolve().parents[2]


def test_the_compiled_list_matches_setup_py() -> None:
    listed = re.findall(r'"(colo_proxy/[\w/]+)\.py"', (ROOT / "setup.py").read_text())
    assert sorted(path.replace("/", ".") for path in listed) == sorted(COMPILED_MODULES)
    core = {p.stem for p in (ROOT / "colo_proxy" / "core").glob("*.py")} - {"__init__"}
    assert {f"colo_proxy.core.{name}" for name in core} <= set(COMPILED_MODULES)


@pytest.mark.skipif("COLO_PROXY_EXPECT_COMPILED" not in os.environ,
                    reason="COLO_PROXY_EXPECT_COMPILED not set (CI sets it)")
def test_the_expected_build_is_loaded() -> None:
    want = os.environ["COLO_PROXY_EXPECT_COMPILED"] not in ("", "0")
    loaded = compiled_modules()
    assert loaded == dict.fromkeys(COMPILED_MODULES, want), loaded


def test_version_says_which_core(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"colo-proxy {__version__} ({build_kind()} core)"


def test_the_pure_launcher_loads_no_compiled_module() -> None:
    """`python -m colo_proxy.testing.purecore` (the benchmarks' pure build) is pure anywhere."""
    res = subprocess.run(
        [sys.executable, "-m", "colo_proxy.testing.purecore", "--version"],
        capture_output=True, text=True, cwd=ROOT, check=True,
    )
    assert res.stdout.strip() == f"colo-proxy {__version__} (pure core)"
