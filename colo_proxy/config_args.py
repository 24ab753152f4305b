"""Every core Config field as a command-line flag, merged over a TOML file.

One helper for all subcommands, so `replay` and `run` accept the same
thresholds spelled the same way: `--compare-timeout 2.5` on the command line
is `compare_timeout = 2.5` in the file (top level or in a [core] table).
Flags override the file; unknown keys and bad values are ConfigErrors.
"""

from __future__ import annotations

import argparse
import tomllib
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from colo_proxy.core.config import CHOICES, Config
from colo_proxy.errors import ConfigError

_DEST_PREFIX = "cfg_"


def _field_doc(name: str) -> str:
    """The attribute docstring of a Config field, for --help."""
    import inspect

    source = inspect.getsource(Config)
    marker = f"    {name}:"
    at = source.find(marker)
    if at < 0:
        return ""
    rest = source[at:].split("\n", 2)
    if len(rest) > 1 and rest[1].strip().startswith('"""'):
        return rest[1].strip().strip('"')
    return ""


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """Add --config FILE.toml and one flag per Config field."""
    parser.add_argument("--config", metavar="FILE.toml",
                        help="settings file; flags given on the command line win")
    group = parser.add_argument_group("thresholds and limits (seconds, bytes)")
    for f in fields(Config):
        default = f.default if f.default is not MISSING else None
        if f.name in CHOICES:
            group.add_argument(
                "--" + f.name.replace("_", "-"), dest=_DEST_PREFIX + f.name, default=None,
                choices=CHOICES[f.name], help=f"{_field_doc(f.name)} (default {default})",
            )
            continue
        kind = float if f.type == "float" else int
        group.add_argument(
            "--" + f.name.replace("_", "-"), dest=_DEST_PREFIX + f.name, type=kind,
            default=None, metavar="N", help=f"{_field_doc(f.name)} (default {default})",
        )


def read_toml(path: str) -> dict[str, Any]:
    """A whole TOML document; unreadable or invalid files are ConfigErrors."""
    try:
        with Path(path).open("rb") as fh:
            return tomllib.load(fh)
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err.strerror or err}") from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from err


def load_toml(path: str) -> dict[str, Any]:
    """The settings in a TOML file: the [core] table if there is one, else the top level."""
    data = read_toml(path)
    core = data.get("core", data)
    if not isinstance(core, dict):
        raise ConfigError(f"{path}: [core] must be a table")
    return core


def config_from_args(args: argparse.Namespace, extra_keys: frozenset[str] = frozenset()) -> Config:
    """Build the Config from --config (if any) and the flags.

    `extra_keys` are top-level TOML keys the subcommand itself handles (for
    example endpoints for `run`); they are ignored here rather than rejected.
    """
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        values.update(
            {k: v for k, v in load_toml(args.config).items() if k not in extra_keys}
        )
    for f in fields(Config):
        flag = getattr(args, _DEST_PREFIX + f.name, None)
        if flag is not None:
            values[f.name] = flag
    return Config.from_mapping(values)
