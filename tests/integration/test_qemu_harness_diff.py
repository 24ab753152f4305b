"""Side by side with QEMU's own colo-compare through the shared harness.

For a few quick cases: ``harness.py gen``, ``harness.py run`` with QEMU's
colo-compare, ``harness.py run --impl cmd`` starting ``colo-proxy run``
exactly as the harness README says, then ``harness.py diff`` (same released
packets, both or neither requesting a checkpoint).  The full comparison,
with the cases where colo-proxy deliberately differs, is
``tools/bench_qemu.py --kind behaviour``.  Skipped when the harness is not
checked out next to the repository (set COLO_HARNESS to its harness.py).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.qemu_helpers import needs_qemu

REPO = Path(__file__).resolve().parents[2]
HARNESS = Path(
    os.environ.get(
        "COLO_HARNESS", REPO.parent / "shared" / "bench" / "colo-compare-harness" / "harness.py"
    )
)

pytestmark = [
    pytest.mark.integration,
    needs_qemu,
    pytest.mark.skipif(not HARNESS.exists(), reason=f"colo-compare harness not found at {HARNESS}"),
]

PROXY = (
    "{python} -m colo_proxy.cli run --primary-in unix:{primary_in},server "
    "--secondary-in unix:{secondary_in},server --outdev unix:{outdev},server "
    "--notify-dev unix:{notify_dev},server --vnet-hdr {vnet}"
)

CASES = [
    # name, gen args, run args (both implementations)
    ("divergence_autockpt", "--proto tcp --conns 1 --bytes 144800 --seg 1448 --diverge 0:72400",
     "--wait-ms 4000 --auto-checkpoint"),
    ("divergence_vnet12", "--proto tcp --conns 2 --bytes 28960 --seg 1448 --diverge 0:14480",
     "--wait-ms 4000 --auto-checkpoint --vnet-hdr-len 12"),
    # TCP: colo-compare's UDP matching makes spurious requests when timing varies (LIFO)
    ("tcp_noise_init", "--proto tcp --conns 2 --bytes 14480 --seg 1448 --sec-header-noise",
     "--wait-ms 1000 --notify-init"),
]  # fmt: skip


def harness(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, str(HARNESS), *args], capture_output=True, text=True, env=env,
        timeout=120, cwd=REPO,
    )  # fmt: skip


@pytest.mark.parametrize(("name", "gen", "run"), CASES, ids=[c[0] for c in CASES])
def test_same_verdicts_as_colo_compare(tmp_path: Path, name: str, gen: str, run: str) -> None:
    res = harness("gen", "--out", str(tmp_path), *shlex.split(gen))
    assert res.returncode == 0, res.stderr
    qemu_json, proxy_json = tmp_path / "qemu.json", tmp_path / "proxy.json"
    res = harness("run", "--dir", str(tmp_path), "--json", str(qemu_json), *shlex.split(run))
    assert res.returncode == 0, res.stderr
    res = harness("run", "--dir", str(tmp_path), "--json", str(proxy_json), *shlex.split(run),
                  "--impl", "cmd", "--cmd", PROXY)  # fmt: skip
    assert res.returncode == 0, res.stderr
    proxy = json.loads(proxy_json.read_text())
    assert proxy["verdict"].startswith(("match", "held")), proxy["impl_stderr_tail"]
    diff = harness("diff", str(qemu_json), str(proxy_json))
    assert diff.returncode == 0, diff.stdout + "\n" + "\n".join(proxy["impl_stderr_tail"])
    if "--notify-init" in run:
        assert proxy["notify_init"]["reply"] == "COLO_COMPARE_GET_XEN_INIT"
