"""FollowPolicy on its own: settings name it without loading qemu.qmp (`run` without --qmp)."""

from __future__ import annotations

import enum


class FollowPolicy(enum.Enum):
    """Which STOP/RESUME pairs are fed to the core as checkpoints."""

    NONE = "none"
    COLO = "colo"
    ALWAYS = "always"
