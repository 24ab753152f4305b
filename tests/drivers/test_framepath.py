"""run's per-read path (runtime/framepath.py): who gets the reads, what is counted, what a
plain start imports.

Reads of a plain Supervisor go straight to the compiled FramePath; a subclass
that adds to ``_feed`` (FailoverSupervisor does) must still see every read;
outdev's drops still reach the supervisor's counters; and a start without
--qmp, failover or observing flags loads none of their modules (the start-up
CPU of the paced benchmark case is mostly imports).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

from colo_proxy.core.events import Side
from colo_proxy.core.framing import Frame
from colo_proxy.drivers.endpoints import parse_endpoint
from colo_proxy.runtime.supervisor import RunSettings, ShutdownMode, Supervisor
from tests.drivers.test_supervisor import make_supervisor, segments
from tests.fakes import RecordPeer, Runner, until


class CountingSupervisor(Supervisor):
    """A subclass adding to _feed, as FailoverSupervisor does."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.seen: list[tuple[Side, int]] = []

    def _feed(self, side: Side, frames: list[Frame]) -> None:
        self.seen.append((side, len(frames)))
        super()._feed(side, frames)


def test_plain_supervisor_reads_go_to_the_compiled_path(sockdir: Path) -> None:
    sup = make_supervisor(sockdir, False, ShutdownMode.REPORT)
    path = sup._path
    assert sup.primary_in._on_frames == path.feed_primary
    assert sup.secondary_in._on_frames == path.feed_secondary
    assert path.send == sup.outdev.send


def test_a_subclass_that_adds_to_feed_sees_every_read(sockdir: Path, run_loop: Runner) -> None:
    frames = segments(b"q" * 300)

    async def main() -> None:
        plain = make_supervisor(sockdir, False, ShutdownMode.REPORT)
        sup = CountingSupervisor(plain.proxy.config, plain.settings)
        await sup.start()
        peer = RecordPeer(sockdir, False)
        await peer.connect()
        peer.pin.write(peer.frames(frames))
        peer.sin.write(peer.frames(frames))
        await until(lambda: len(peer.out_frames) == len(frames), "all released")
        assert sum(n for side, n in sup.seen if side is Side.PRIMARY) == len(frames)
        assert sum(n for side, n in sup.seen if side is Side.SECONDARY) == len(frames)
        await sup.shutdown()

    run_loop(main())


def test_outdev_drops_are_counted_by_the_supervisor(sockdir: Path, run_loop: Runner) -> None:
    frames = segments(b"d" * 1000)

    async def main() -> None:
        d = sockdir
        settings = RunSettings(
            primary_in=parse_endpoint(f"unix:{d}/pin,server"),
            secondary_in=parse_endpoint(f"unix:{d}/sin,server"),
            outdev=parse_endpoint(f"unix:{d}/out,server"),
            outdev_buffer=200,  # no outdev peer: the pending queue holds one small frame
        )
        plain = make_supervisor(sockdir, False, ShutdownMode.REPORT)
        sup = Supervisor(plain.proxy.config, settings)
        await sup.start()
        peer = RecordPeer(sockdir, False)  # only primary_in and secondary_in connected
        _, pin = await asyncio.open_unix_connection(f"{d}/pin")
        _, sin = await asyncio.open_unix_connection(f"{d}/sin")
        for n, frame in enumerate(frames, 1):  # one read per frame: each release one write
            pin.write(peer.frames([frame]))
            sin.write(peer.frames([frame]))
            await until(lambda n=n: sup.proxy.stats()["released_frames"] == n,  # type: ignore[misc]
                        "released")
        assert sup.outdev.dropped_frames > 0
        report = await sup.shutdown()
        counters = report["supervisor"]
        assert isinstance(counters, dict)
        assert counters["outdev_dropped_frames"] == sup.outdev.dropped_frames
        assert sup.outdev.dropped_frames + sup.outdev.frames_out == len(frames)
        pin.close()
        sin.close()

    run_loop(main())


PLAIN_START = """
import asyncio, json, sys
from colo_proxy.cli import build_parser
from colo_proxy.config_args import config_from_args
from colo_proxy.live_obs import attach
from colo_proxy.runtime import run_cli
from colo_proxy.runtime.supervisor import Supervisor

argv = ["run", "--primary-in", "unix:{d}/p,server", "--secondary-in", "unix:{d}/s,server",
        "--outdev", "unix:{d}/o,server", "--notify-dev", "unix:{d}/n,server"]
args = build_parser(argv).parse_args(argv)
values = run_cli.run_values(args)
config = config_from_args(args, extra_keys=frozenset(run_cli.RUN_KEYS) | {{"run"}})
assert run_cli.failover_settings(values) is None

async def build() -> None:
    attach(Supervisor(config, run_cli.settings_from_values(values)), values)

asyncio.run(build())
print(json.dumps(sorted(sys.modules)))
"""

NOT_AT_START = ("qemu.qmp", "tomllib", "colo_proxy.observe", "colo_proxy.runtime.failover",
                "colo_proxy.core.heartbeat", "colo_proxy.drivers.qmp",
                "colo_proxy.runtime.disk_link")


def test_a_plain_run_start_imports_no_qmp_failover_toml_or_observer(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-c", PLAIN_START.format(d=tmp_path)],
                         capture_output=True, text=True, check=True)
    loaded = set(json.loads(res.stdout.splitlines()[-1]))
    assert "colo_proxy.runtime.framepath" in loaded
    assert sorted(m for m in NOT_AT_START if m in loaded) == []
