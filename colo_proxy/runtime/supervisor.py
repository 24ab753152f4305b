"""The live proxy between QEMU's chardevs: record channels and notify_dev around the core.

Theory of operation
-------------------
:class:`~colo_proxy.runtime.host.CoreHost` owns the core, QMP, the disk link,
timers, divergence logging and shutdown; this module adds only the ports of
``colo-proxy run``.  A chunk read from ``primary_in`` or ``secondary_in`` is
decoded into records and fed to the core at once; released frames become
one write to ``outdev`` (buffered by the transport, never awaited, so
reading never waits on writing).

Without ``--qmp`` (Xen COLO, or the benchmark harness), checkpoint requests
go to ``notify_dev`` as ``DO_CHECKPOINT``, and ``COLO_CHECKPOINT`` from the
peer is a completed checkpoint.

At shutdown ``outdev`` is drained with a time limit and whatever it could
not deliver is reported.
"""

# No `from __future__ import annotations`: RunSettings' annotations stay objects, so
# run_cli.keys_of (typing.get_type_hints) need not compile and evaluate each at start-up.
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from colo_proxy.core.config import Config
from colo_proxy.core.events import CheckpointRequest, Side
from colo_proxy.core.framing import Frame
from colo_proxy.core.xen_notify import NotifyDecoder, NotifyKind, do_checkpoint, init_reply
from colo_proxy.drivers.endpoints import Endpoint
from colo_proxy.drivers.qemu_socket import Channel, RecordChannel
from colo_proxy.drivers.qmp_follow import FollowPolicy
from colo_proxy.runtime.host import CoreHost, ShutdownMode, print_report

__all__ = ["RunSettings", "ShutdownMode", "Supervisor", "print_report"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RunSettings:
    """Everything `colo-proxy run` needs besides the core Config."""

    primary_in: Endpoint
    secondary_in: Endpoint
    outdev: Endpoint
    notify_dev: Endpoint | None = None
    vnet_hdr: bool = False
    qmp: Endpoint | None = None
    secondary_qmp: Endpoint | None = None
    disk_qmp: Endpoint | None = None
    disk_tls_creds: Path | None = None
    qmp_tls_creds: Path | None = None
    """TLS (QEMU tls-creds-x509 client layout) to the QEMUs' QMP (--qmp, --secondary-qmp)."""
    qmp_follow: FollowPolicy = FollowPolicy.COLO
    qmp_request_timeout: float = 5.0
    outdev_buffer: int = 64 * 1024 * 1024
    on_shutdown: ShutdownMode = ShutdownMode.REPORT
    stats_interval: float = 0.0


class Supervisor(CoreHost):
    """The core between QEMU's record channels (``colo-proxy run``)."""

    REQUEST_ROUTES = "--qmp nor --notify-dev"

    def __init__(
        self, config: Config, settings: RunSettings, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__(config, settings, clock)
        self.settings = settings
        self.counters.update({
            "requests_to_notify_dev": 0,
            "notify_checkpoints_done": 0,
            "notify_unknown_messages": 0,
            "notify_errors": 0,
            "outdev_dropped_frames": 0,
        })  # fmt: skip
        vnet = settings.vnet_hdr
        self.outdev = RecordChannel("outdev", settings.outdev, vnet, None, settings.outdev_buffer)
        path = self._path
        cls = type(self)
        if (cls._feed is CoreHost._feed and cls._after is CoreHost._after
                and cls._send_released is Supervisor._send_released):
            # reads go straight to the compiled path, released frames straight to outdev
            on_primary, on_secondary = path.feed_primary, path.feed_secondary
            path.send = self.outdev.send
        else:  # a subclass adds to the per-read work: through its methods
            on_primary, on_secondary = self._primary, self._secondary
        self.primary_in = RecordChannel("primary_in", settings.primary_in, vnet, on_primary)
        self.secondary_in = RecordChannel(
            "secondary_in", settings.secondary_in, vnet, on_secondary
        )
        self.outdev.channel.throttles = [self.primary_in.channel, self.secondary_in.channel]
        self.notify: Channel | None = None
        self._notify_decoder = NotifyDecoder()
        self._notify_owed = False
        if settings.notify_dev is not None:
            self.notify = Channel(
                "notify_dev",
                settings.notify_dev,
                on_data=self._notify_data,
                on_connect=self._notify_connected,
                on_disconnect=self._notify_decoder.reset,
            )

    # ---- ports --------------------------------------------------------------------------

    async def _open_ports(self) -> None:
        await self.outdev.channel.start()
        if self.notify is not None:
            await self.notify.start()
        await self.primary_in.channel.start()
        await self.secondary_in.channel.start()

    async def _close_inputs(self) -> None:
        await self.primary_in.channel.close()
        await self.secondary_in.channel.close()

    async def _close_outputs(self) -> dict[str, object]:
        unsent = self.outdev.channel.buffered_bytes()
        await self.outdev.channel.close()
        if self.notify is not None:
            await self.notify.close()
        return {"outdev_bytes_buffered_at_close": unsent}

    def _send_released(self, frames: list[Frame]) -> None:
        self.outdev.send(frames)  # what it drops, outdev counts (dropped_frames)

    def stats(self) -> dict[str, object]:
        self.counters["outdev_dropped_frames"] = self.outdev.dropped_frames
        return super().stats()

    def _port_stats(self) -> dict[str, object]:
        out: dict[str, object] = {
            rc.name: rc.counters() for rc in (self.primary_in, self.secondary_in, self.outdev)
        }
        if self.notify is not None:
            out["notify_dev"] = {
                k: getattr(self.notify.stats, k) for k in self.notify.stats.__dataclass_fields__
            }
        return out

    def _primary(self, frames: list[Frame]) -> None:
        self._feed(Side.PRIMARY, frames)

    def _secondary(self, frames: list[Frame]) -> None:
        self._feed(Side.SECONDARY, frames)

    # ---- notify_dev (Xen COLO) -----------------------------------------------------------

    def _route_request(self, request: CheckpointRequest) -> bool:
        if self.notify is None:
            return False
        self.counters["requests_to_notify_dev"] += 1
        if self.notify.connected:
            self.notify.write(do_checkpoint())
        else:
            self._notify_owed = True
            log.warning("notify_dev not connected: checkpoint request sent when it is")
        return True

    def _notify_connected(self) -> None:
        self._notify_decoder.reset()
        if self._notify_owed and self.notify is not None:
            self._notify_owed = False
            self.notify.write(do_checkpoint())

    def _notify_data(self, data: bytes) -> None:
        assert self.notify is not None
        for message in self._notify_decoder.feed(data):
            if message.kind is NotifyKind.INIT:
                self.notify.write(init_reply())
            elif message.kind is NotifyKind.CHECKPOINT_DONE:
                self.counters["notify_checkpoints_done"] += 1
                self._checkpoint_done()
            else:
                self.counters["notify_unknown_messages"] += 1
                log.warning("notify_dev: unsupported instruction %r", message.text)
        if self._notify_decoder.error is not None:
            self.counters["notify_errors"] += 1
            self.notify.reset(self._notify_decoder.error)
            self._notify_decoder.reset()
